"""DCNv2's ablation of Faster R-CNN (or Mask R-CNN) at CPU scale: regular, DCNv1 and DCNv2
backbones, modulated deformable RoI pooling, and R-CNN feature mimicking (the paper's Tables 1
and 3), each setting trained once per seed by :func:`deformable.experiments.runs.train_detector`,
then a table (mean ± std over seeds; box and, for a Mask R-CNN, mask metrics) and a figure of the
validation AP per epoch.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace

import torch

from deformable.engine import TrainConfig, distributed
from deformable.engine.detection import COCO_METRICS, MASK_METRICS
from deformable.experiments.runs import train_detector

__all__ = ["ABLATION", "ablation_table", "plot_ablation", "run_ablation"]

#: DCNv2's ablation (its Table 1 / 3 at CPU scale): name -> (deform_stages, modulated, roi_pool, mimic)
ABLATION = {
    "regular": ((), False, "align", False),
    "dcnv1 conv3-5": ((3, 4, 5), False, "align", False),
    "dcnv2 conv3-5": ((3, 4, 5), True, "align", False),
    "+ mdeform RoI pooling": ((3, 4, 5), True, "mdeform", False),
    "+ feature mimicking": ((3, 4, 5), True, "mdeform", True),
}



def run_ablation(spec: dict, data: str, config: TrainConfig, out: str, *, seeds: int = 1,
                 limit: int | None = None, resume: bool = False, progress: bool = True,
                 device: torch.device | str = "cpu", workers: int | None = None) -> str:  # fmt: skip
    """Train every setting of :data:`ABLATION` (on top of ``spec``) ``seeds`` times, seeds
    ``config.seed``, ``config.seed + 1``, ..., every setting once before any is repeated; each run
    in ``out/run<i>`` (``out/run<i>-seed<s>`` for the repeats). Writes ``out/ablation.md`` and
    ``out/ablation.png`` (box AP and AP50 per epoch; box and mask AP for a Mask R-CNN); returns
    the table. With ``resume=True`` finished runs are kept."""
    results: dict[str, list[dict]] = {}
    for offset in range(seeds):
        seed = config.seed + offset
        for index, (name, (stages, modulated, roi_pool, mimic)) in enumerate(ABLATION.items()):
            run_spec = dict(spec, deform_stages=list(stages), modulated=modulated, roi_pool=roi_pool,
                            mimic=mimic)  # fmt: skip
            print(f"[{index + 1}/{len(ABLATION)}] {name}, seed {seed}", file=sys.stderr)
            folder = f"run{index}" if offset == 0 else f"run{index}-seed{seed}"
            results.setdefault(name, []).append(train_detector(
                run_spec, data, replace(config, seed=seed), os.path.join(out, folder), data_root=out,
                limit=limit, resume=resume, progress=progress, device=device, workers=workers))  # fmt: skip
    table = ablation_table(results)
    if distributed.rank_and_world()[0] == 0:
        described = f"seed {config.seed}" if seeds == 1 else \
            f"seeds {config.seed}-{config.seed + seeds - 1} (mean ± std)"
        masks = _has_masks(results)
        plot_ablation(results, os.path.join(out, "ablation.png"),
                      metrics=("AP", "mask_AP") if masks else ("AP", "AP50"))  # fmt: skip
        kind = "box and mask" if masks else "box"
        with open(os.path.join(out, "ablation.md"), "w") as f:
            f.write(f"# DCNv2 ablation at CPU scale\n\n{spec['model']}, {config.epochs} epochs, {described}, "
                    f"COCO {kind} metrics (%) on the validation scenes.\n\n{table}\n\n"
                    f"![validation AP per epoch](ablation.png)\n")  # fmt: skip
    return table


def percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}"


def _cell(values: list[float]) -> str:
    """One run's value, or mean ± sample std over several (in %; NaN as —)."""
    if len(values) == 1 or any(math.isnan(v) for v in values):
        return percent(values[0]) if len(values) == 1 else "—"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _has_masks(results: dict[str, list[dict]]) -> bool:
    return all(f"val_{MASK_METRICS[0]}" in h for histories in results.values() for h in histories)


def ablation_table(results: dict[str, list[dict]]) -> str:
    """The markdown table of the final COCO metrics of each setting (box, then mask metrics when
    every run has them: ``mask AP``, ...), and its training seconds per epoch: ``results`` maps a
    setting to the histories of its runs (one per seed)."""
    metrics = COCO_METRICS + (MASK_METRICS if _has_masks(results) else ())
    header = "| setting | " + " | ".join(m.replace("_", " ") for m in metrics) + " | s / epoch |"
    lines = [header, "|---" * (len(metrics) + 2) + "|"]
    for name, histories in results.items():
        cells = [_cell([h[f"val_{m}"][-1] for h in histories]) for m in metrics]
        seconds = [s for h in histories for s in h["seconds"]]
        cells.append(f"{sum(seconds) / len(seconds):.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ablation(results: dict[str, list[dict]], path: str, metrics: tuple[str, str] = ("AP", "AP50")) -> None:
    """Two validation ``metrics`` (box AP and AP50 by default; ``mask_AP``, ... are a Mask
    R-CNN's mask metrics) per epoch of each setting (mean over seeds, band: min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, histories in results.items():
        for metric, ax in zip(metrics, axes):
            curves = torch.tensor([h[f"val_{metric}"] for h in histories]) * 100
            epochs = list(range(1, curves.shape[1] + 1))
            (line,) = ax.plot(epochs, curves.mean(0).tolist(), marker="o", ms=3, label=name)
            if len(histories) > 1:
                ax.fill_between(epochs, curves.min(0).values.tolist(), curves.max(0).values.tolist(),
                                color=line.get_color(), alpha=0.15)  # fmt: skip
    seeds = len(next(iter(results.values())))
    band = f", band: min-max over {seeds} seeds" if seeds > 1 else ""
    for metric, ax in zip(metrics, axes):
        kind, name = ("mask", metric[len("mask_"):]) if metric.startswith("mask_") else ("box", metric)
        ax.set(title=f"validation {kind} {name}{band}", xlabel="epoch", ylabel=f"COCO {kind} {name} (%)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
