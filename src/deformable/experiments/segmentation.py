"""Semantic segmentation runs and DCNv1's DeepLab ablation at CPU scale.

:func:`train_segmenter` trains one DeepLabV3 (:mod:`deformable.models.segmentation`) on the
generated scenes or a VOC-style folder (:mod:`deformable.data.segmentation`);
:func:`evaluate_segmenter` scores its checkpoint. :func:`run_ablation` trains the settings of
:data:`ABLATION` (regular, DCNv1 in conv5 as in DCNv1's DeepLab, DCNv1 and DCNv2 in conv3-5)
once per seed, then writes a table (mIoU mean ± std over seeds, per-class IoU) and a figure.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace

import torch

from deformable.data.folder import DataError
from deformable.data.segmentation import SegmentationFolder, segmentation_data, segmentation_scenes
from deformable.engine import TrainConfig, distributed
from deformable.engine import segmentation as engine
from deformable.models.build import build_segmenter

__all__ = ["ABLATION", "ablation_table", "class_table", "evaluate_segmenter", "plot_ablation",
           "run_ablation", "segmentation_folder", "train_segmenter"]  # fmt: skip

#: DCNv1's DeepLab ablation at CPU scale: name -> (deform_stages, modulated)
ABLATION = {
    "regular": ((), False),
    "dcnv1 conv5": ((5,), False),
    "dcnv1 conv3-5": ((3, 4, 5), False),
    "dcnv2 conv3-5": ((3, 4, 5), True),
}


def segmentation_folder(data: str, data_root: str, image_size: int | None,
                        scenes: tuple[int, int] = (600, 150)) -> str:  # fmt: skip
    """The VOC-style folder of ``--data``: ``scenes`` is generated into
    ``data_root/scenes-<size>px-<train>-<val>`` once (by one process under torchrun, the others
    waiting), anything else is a folder of the user's."""
    if data != "scenes":
        return data
    size = 96 if image_size is None else image_size
    folder = os.path.join(data_root, f"scenes-{size}px-{scenes[0]}-{scenes[1]}")
    if distributed.rank_and_world()[0] == 0:
        segmentation_scenes(folder, counts=scenes, size=size)
    distributed.barrier()
    return folder


def _check_batches(count: int, batch_size: int) -> None:
    # DeepLabV3's image-pooling branch normalises one value per channel and image: a training
    # batch of one image has nothing to normalise over, and BatchNorm refuses it
    per_process = math.ceil(count / distributed.rank_and_world()[1])
    if batch_size == 1 or per_process % batch_size == 1:
        raise DataError(f"{per_process} training images per process in batches of {batch_size} leave a "
                        "batch of one image, which DeepLabV3's image-pooling BatchNorm cannot train on: "
                        "choose another --batch-size (or --limit)")  # fmt: skip


def train_segmenter(spec: dict, data: str, config: TrainConfig, out: str, *, data_root: str | None = None,
                    scenes: tuple[int, int] = (600, 150), num_classes: int | None = None,
                    limit: int | None = None, resume: bool = False, progress: bool = True,
                    device: torch.device | str = "cpu", workers: int | None = None) -> dict:  # fmt: skip
    """Train the DeepLabV3 of ``spec`` (without ``num_classes``: the data decide) on ``data``
    (``scenes``, generated into ``data_root`` — default ``out`` — or a VOC-style folder, images
    resized to ``spec["image_size"]`` on their longer side when it is set) into ``out`` on
    ``device``; returns the history. Resumes from ``out/last.pt`` with ``resume=True``."""
    folder = segmentation_folder(data, out if data_root is None else data_root, spec["image_size"], scenes)
    train, val, classes = segmentation_data(folder, num_classes=num_classes, image_size=spec["image_size"])
    if limit is not None:
        train = torch.utils.data.Subset(train, range(min(limit, len(train))))
    _check_batches(len(train), config.batch_size)
    spec = dict(spec, num_classes=len(classes), classes=classes)
    return engine.fit(lambda: build_segmenter(spec), train, val, config, out, classes=classes,
                      resume=resume, progress=progress, extra_state={"model_spec": spec, "data": folder},
                      device=device, workers=workers)  # fmt: skip


def evaluate_segmenter(state: dict, data: str | None = None,
                       device: torch.device | str = "cpu") -> tuple[dict[str, float], int]:  # fmt: skip
    """``(scores, number of validation images)`` of a segmentation checkpoint on its validation
    data (or on the ``val`` split of the VOC-style folder ``data``), on ``device``."""
    spec = state["model_spec"]
    model = build_segmenter(spec)
    model.load_state_dict(state["model"])
    model.to(device)
    val = SegmentationFolder(data or state["data"], "val", num_classes=spec["num_classes"],
                             image_size=spec["image_size"])  # fmt: skip
    return engine.evaluate_segmentation(model, val, spec["classes"]), len(val)


def run_ablation(spec: dict, data: str, config: TrainConfig, out: str, *, seeds: int = 1,
                 scenes: tuple[int, int] = (600, 150), num_classes: int | None = None,
                 limit: int | None = None, resume: bool = False, progress: bool = True,
                 device: torch.device | str = "cpu", workers: int | None = None) -> str:  # fmt: skip
    """Train every setting of :data:`ABLATION` (on top of ``spec``) ``seeds`` times, seeds
    ``config.seed``, ``config.seed + 1``, ..., every setting once before any is repeated; each
    run in ``out/run<i>`` (``out/run<i>-seed<s>`` for the repeats), generated scenes in ``out``.
    Writes ``out/ablation.md`` (the tables) and ``out/ablation.png``; returns the main table.
    With ``resume=True`` finished runs are kept and an interrupted one continues."""
    results: dict[str, list[dict]] = {}
    classes: list[str] = []
    for offset in range(seeds):
        seed = config.seed + offset
        for index, (name, (stages, modulated)) in enumerate(ABLATION.items()):
            run_spec = dict(spec, deform_stages=list(stages), modulated=modulated)
            print(f"[{index + 1}/{len(ABLATION)}] {name}, seed {seed}", file=sys.stderr)
            folder = os.path.join(out, f"run{index}" if offset == 0 else f"run{index}-seed{seed}")
            results.setdefault(name, []).append(train_segmenter(
                run_spec, data, replace(config, seed=seed), folder, data_root=out, scenes=scenes,
                num_classes=num_classes, limit=limit, resume=resume, progress=progress, device=device,
                workers=workers))  # fmt: skip
            classes = [k[len("val_IoU/"):] for k in results[name][-1] if k.startswith("val_IoU/")]
    table = ablation_table(results)
    if distributed.rank_and_world()[0] == 0:
        described = f"seed {config.seed}" if seeds == 1 else \
            f"seeds {config.seed}-{config.seed + seeds - 1} (mean ± std)"
        plot_ablation(results, classes, os.path.join(out, "ablation.png"))
        with open(os.path.join(out, "ablation.md"), "w") as f:
            f.write(f"# DCNv1 DeepLab ablation at CPU scale\n\n{spec['model']}, {config.epochs} epochs, "
                    f"{described}; scores (%) on the validation set after the last epoch.\n\n{table}\n\n"
                    f"Per-class IoU (%), mean over seeds:\n\n{class_table(results, classes)}\n\n"
                    f"![validation mIoU per epoch, per-class IoU](ablation.png)\n")  # fmt: skip
    return table


def _cell(values: list[float]) -> str:
    """One run's value in %, or mean ± sample std over several; NaN as —."""
    if not values or any(math.isnan(v) for v in values):
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def ablation_table(results: dict[str, list[dict]]) -> str:
    """The markdown table of each setting's final mIoU and pixel accuracy (mean ± std over its
    runs) and its seconds per epoch (training and validation): ``results`` maps a setting to the
    histories of its runs (one per seed)."""
    lines = ["| setting | mIoU | pixel accuracy | s / epoch |", "|---|---|---|---|"]
    for name, histories in results.items():
        seconds = [s for h in histories for s in h["seconds"]]
        cells = [_cell([h["val_mIoU"][-1] for h in histories]),
                 _cell([h["val_pixel_accuracy"][-1] for h in histories]),
                 f"{sum(seconds) / len(seconds):.0f}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _final_class_iou(histories: list[dict], name: str) -> float:
    values = [h[f"val_IoU/{name}"][-1] for h in histories]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def class_table(results: dict[str, list[dict]], classes: list[str]) -> str:
    """Markdown: one row per class, one column per setting, the final IoU (%) averaged over the
    setting's runs (NaN runs, where the class was in neither truth nor prediction, left out)."""
    lines = ["| class | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for name in classes:
        cells = [_final_class_iou(h, name) for h in results.values()]
        lines.append(f"| {name} | " + " | ".join("—" if math.isnan(v) else f"{100 * v:.1f}" for v in cells) + " |")
    return "\n".join(lines)


def plot_ablation(results: dict[str, list[dict]], classes: list[str], path: str) -> None:
    """Left: validation mIoU per epoch of each setting (mean over seeds, band: min-max). Right:
    the final IoU of each class per setting (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (curves_ax, bars_ax) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    width = 0.8 / len(results)
    for i, (name, histories) in enumerate(results.items()):
        curves = torch.tensor([h["val_mIoU"] for h in histories]) * 100
        epochs = list(range(1, curves.shape[1] + 1))
        (line,) = curves_ax.plot(epochs, curves.mean(0).tolist(), marker="o", ms=3, label=name)
        if len(histories) > 1:
            curves_ax.fill_between(epochs, curves.min(0).values.tolist(), curves.max(0).values.tolist(),
                                   color=line.get_color(), alpha=0.15)  # fmt: skip
        values = [100 * _final_class_iou(histories, c) for c in classes]
        bars_ax.bar([k + (i - (len(results) - 1) / 2) * width for k in range(len(classes))],
                    [0 if math.isnan(v) else v for v in values], width, color=line.get_color(), label=name)  # fmt: skip
    seeds = len(next(iter(results.values())))
    band = f", band: min-max over {seeds} seeds" if seeds > 1 else ""
    curves_ax.set(title=f"validation mIoU{band}", xlabel="epoch", ylabel="mIoU (%)")
    curves_ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    curves_ax.grid(alpha=0.3)
    curves_ax.legend(loc="upper left", fontsize=8)
    over = f" (mean over {seeds} seeds)" if seeds > 1 else ""
    bars_ax.set(title=f"IoU per class after the last epoch{over}", ylabel="IoU (%)")
    bars_ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    bars_ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
