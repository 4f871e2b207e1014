"""Does deformable convolution buy accuracy? The demo's experiment, on transformed digits.

The same small CNN (:class:`deformable.models.DigitNet`) is trained in four variants under one
budget (data, epochs, optimiser, seeds) by the one training loop
(:func:`deformable.engine.fit`): regular convolutions; DCNv1 in its last two layers; DCNv2
(modulated) there; and a spatial transformer in front of the regular CNN. The data are
scikit-learn's handwritten digits under random scale, rotation and aspect
(:class:`deformable.data.TransformedDigits`), so the geometric variation the papers target is
the main difficulty.

:func:`run` writes into its folder: ``report.md`` (the table and the figures),
``learning_curves.png``, ``sampling_locations.png`` (where a unit of the last layer looks,
regular vs deformable, as in the papers' figures), ``results.json``, a checkpoint
``<variant>.pt`` per variant (its first seed), and every run's folder under ``runs/``
(checkpoint, ``metrics.csv``, TensorBoard), from which an interrupted demo resumes.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from deformable.data import TransformedDigits
from deformable.engine import TrainConfig, fit, load_checkpoint, save_checkpoint
from deformable.models.digitnet import FEATURE_ORIGIN, FEATURE_STRIDE, LABELS, VARIANTS, DigitNet

__all__ = ["DigitsConfig", "run", "sampling_locations", "summarise", "table"]


@dataclass
class DigitsConfig:
    epochs: int = 8
    seeds: int = 3
    copies: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: train on the first N training images only (smoke tests); None: all
    train_limit: int | None = None


def model_spec(variant: str) -> dict:
    """The checkpoint description of a DigitNet variant (:mod:`deformable.models.build`)."""
    return {"model": f"digitnet-{variant}", "num_classes": 10, "classes": [str(i) for i in range(10)],
            "image_size": 40}  # fmt: skip


def train_variant(variant: str, seed: int, train_set, test_set, config: DigitsConfig, out: str, *,
                  progress: bool = True, resume: bool = False, device: torch.device | str = "cpu") -> dict:  # fmt: skip
    """Train one variant with one seed into ``out``; returns its history and parameter count."""
    train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                               weight_decay=config.weight_decay, seed=seed)  # fmt: skip
    history = fit(lambda: DigitNet(variant), train_set, test_set, train_config, out, resume=resume,
                  progress=progress, extra_state={"model_spec": model_spec(variant), "data": "digits",
                                                  "data_options": {"copies": config.copies}},
                  device=device)  # fmt: skip
    params = sum(p.numel() for p in DigitNet(variant).parameters())
    return {"history": history, "params": params}


@torch.no_grad()
def sampling_locations(model: DigitNet, image: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Image coordinates (y, x) [81, 2] and weights [81] of the 9 x 9 samples that the most
    active unit of the last layer reaches through the last two 3x3 layers, and that unit.

    :func:`deformable.analysis.sampling_locations` at the last ReLU, two layers deep.
    """
    from deformable import analysis

    return tuple(analysis.sampling_locations(model, image, "features.13", depth=2))


# --- report ---------------------------------------------------------------------------------


def _mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: final test accuracy (mean, std over seeds), parameters, s / epoch."""
    rows = []
    for variant, runs in results.items():
        mean, std = _mean_std([r["history"]["val_accuracy"][-1] for r in runs])
        rows.append({"variant": variant, "label": LABELS[variant], "accuracy_mean": mean,
                     "accuracy_std": std, "params": runs[0]["params"],
                     "seconds_per_epoch": statistics.fmean(
                         s for r in runs for s in r["history"]["seconds"]),
                     "seeds": len(runs)})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | test accuracy (mean ± std) | parameters | s / epoch |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['label']} | {100 * r['accuracy_mean']:.2f}% ± {100 * r['accuracy_std']:.2f} "
                     f"| {r['params']:,} | {r['seconds_per_epoch']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def plot_learning_curves(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, runs in results.items():
        epochs = list(range(1, len(runs[0]["history"]["train_loss"]) + 1))
        for key, ax in (("train_loss", ax_loss), ("val_accuracy", ax_acc)):
            curves = torch.tensor([r["history"][key] for r in runs])
            (line,) = ax.plot(epochs, curves.mean(0).tolist(), marker="o", ms=3, label=LABELS[variant])
            if len(runs) > 1:
                ax.fill_between(epochs, curves.min(0).values.tolist(), curves.max(0).values.tolist(),
                                color=line.get_color(), alpha=0.15)  # fmt: skip
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="test accuracy (band: min-max over seeds)", xlabel="epoch", ylabel="accuracy")
    ax_acc.legend(loc="lower right", fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pick_examples(test_set: TransformedDigits, count: int = 4) -> list[int]:
    """Test images spanning the scale range (smallest to largest), deterministically."""
    order = torch.argsort(test_set.scale)
    picks = torch.linspace(0, len(order) - 1, count).round().long()
    return [int(order[p]) for p in picks]


def plot_sampling_locations(models: dict[str, DigitNet], test_set: TransformedDigits,
                            path: str) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [v for v in ("regular", "dcnv1", "dcnv2") if v in models]
    examples = pick_examples(test_set)
    fig, axes = plt.subplots(len(examples), len(shown), squeeze=False,
                             figsize=(2.6 * len(shown), 2.6 * len(examples)))  # fmt: skip
    for row, index in enumerate(examples):
        image, label = test_set[index]
        for col, variant in enumerate(shown):
            ax = axes[row, col]
            points, weights, unit = sampling_locations(models[variant], image)
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.scatter(points[:, 1].numpy(), points[:, 0].numpy(), s=10, c="tab:red",
                       alpha=(0.25 + 0.75 * weights / weights.max().clamp_min(1e-6)).tolist(),
                       edgecolors="none")  # fmt: skip
            cy, cx = (u * FEATURE_STRIDE + FEATURE_ORIGIN for u in unit)
            ax.scatter([cx], [cy], s=40, marker="x", c="tab:green")
            ax.set_xlim(-0.5, image.shape[-1] - 0.5)
            ax.set_ylim(image.shape[-2] - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(LABELS[variant], fontsize=9)
            if col == 0:
                ax.set_ylabel(f"digit {label}, scale {test_set.scale[index]:.1f}", fontsize=8)
    fig.suptitle("The 81 samples a unit of the last layer reads (red; green x: the unit)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: str, rows: list[dict], config: DigitsConfig, elapsed: float) -> str:
    regular = next(r for r in rows if r["variant"] == "regular")
    lines = [
        "# deformable demo: transformed digits",
        "",
        "scikit-learn's handwritten digits on a 40x40 canvas under random scale (1-3.2x), "
        "rotation (±40°) and aspect (0.6-1.6); "
        f"{config.copies} transformed copies of each of the 1,347 training / 450 test digits. "
        f"Every variant: same CNN but the layer type, AdamW (lr {config.lr}, one-cycle), "
        f"batch {config.batch_size}, {config.epochs} epochs, {config.seeds} seed(s).",
        "",
        table(rows),
        "",
        "Accuracy difference against the regular CNN: "
        + ", ".join(f"{r['label']} {100 * (r['accuracy_mean'] - regular['accuracy_mean']):+.2f} points"
                    for r in rows if r is not regular) + ".",  # fmt: skip
        "",
        "![learning curves](learning_curves.png)",
        "",
        "![sampling locations](sampling_locations.png)",
        "",
        f"Total time {elapsed / 60:.1f} min on {torch.get_num_threads()} threads. "
        "Checkpoints: " + ", ".join(f"`{r['variant']}.pt`" for r in rows) + ".",
        "",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def run(out: str, config: DigitsConfig, variants=VARIANTS, *, progress: bool = True,
        resume: bool = False, device: torch.device | str = "cpu") -> list[dict]:  # fmt: skip
    """Train every variant with every seed into ``out`` on ``device`` and write the report;
    returns the rows of its table. With ``resume=True`` finished runs are kept and interrupted
    ones continued."""
    if "regular" not in variants:
        raise ValueError(f"variants must include 'regular' (the baseline), got {tuple(variants)}")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    train_set = TransformedDigits("train", copies=config.copies)
    test_set = TransformedDigits("test", copies=config.copies)
    if config.train_limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(config.train_limit, len(train_set))))
    results: dict[str, list[dict]] = {}
    models: dict[str, DigitNet] = {}
    for variant in variants:
        for seed in range(config.seeds):
            folder = os.path.join(out, "runs", f"{variant}-seed{seed}")
            result = train_variant(variant, seed, train_set, test_set, config, folder,
                                   progress=progress, resume=resume, device=device)  # fmt: skip
            results.setdefault(variant, []).append(result)
            accuracy = result["history"]["val_accuracy"][-1]
            print(f"  {LABELS[variant]:28s} seed {seed}: test accuracy {100 * accuracy:.2f}%",
                  file=sys.stderr)  # fmt: skip
        first = load_checkpoint(os.path.join(out, "runs", f"{variant}-seed0", "last.pt"))
        save_checkpoint(os.path.join(out, f"{variant}.pt"), first)  # durably, as the run's own
        models[variant] = DigitNet(variant)
        models[variant].load_state_dict(first["model"])
        models[variant].eval()
    rows = summarise(results)
    plot_learning_curves(results, os.path.join(out, "learning_curves.png"))
    plot_sampling_locations(models, test_set, os.path.join(out, "sampling_locations.png"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": asdict(config), "rows": rows,
                   "histories": {v: [r["history"] for r in runs] for v, runs in results.items()}},
                  f, indent=2)  # fmt: skip
    write_report(out, rows, config, time.perf_counter() - start)
    return rows
