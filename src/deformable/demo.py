"""``deformable demo``: does deformable convolution buy accuracy? Measured on transformed digits.

The same small CNN is trained in four variants under one budget (data, epochs, optimiser,
seeds): regular convolutions; DCNv1 in its last two layers; DCNv2 (modulated) there; and a
spatial transformer in front of the regular CNN. The data are scikit-learn's handwritten digits
under random scale, rotation and aspect (:class:`deformable.data.TransformedDigits`), so the
geometric variation the papers target is the main difficulty.

Writes into ``--out``: ``report.md`` (the table and the figures), ``learning_curves.png``,
``sampling_locations.png`` (where a unit of the last layer looks, regular vs deformable, as in
the papers' figures), ``results.json`` and a checkpoint ``<variant>.pt`` per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from deformable.data import TransformedDigits
from deformable.nn import DeformConv2d, SpatialTransformer, param_groups

VARIANTS = ("regular", "dcnv1", "dcnv2", "stn")
LABELS = {"regular": "regular CNN", "dcnv1": "DCNv1 (last 2 layers)",
          "dcnv2": "DCNv2 (last 2 layers)", "stn": "spatial transformer + CNN"}  # fmt: skip
#: image pixels per feature pixel at the deformable layers, and the centre of feature pixel 0
FEATURE_STRIDE, FEATURE_ORIGIN = 4, 1.5  # for drawing the unit


class DigitNet(nn.Module):
    """conv16 - pool - conv32 - pool - conv64 - conv64 - average - fc, in one of ``VARIANTS``.

    The two last 3x3 convolutions are deformable in ``dcnv1`` / ``dcnv2``; ``stn`` puts a
    spatial transformer in front. Everything else is identical across variants.
    """

    def __init__(self, variant: str, num_classes: int = 10) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"DigitNet: variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        deform = variant in ("dcnv1", "dcnv2")

        def conv(cin: int, cout: int, deformable: bool) -> nn.Module:
            if deformable:
                return DeformConv2d(cin, cout, 3, padding=1, bias=False,
                                    modulated=variant == "dcnv2")  # fmt: skip
            return nn.Conv2d(cin, cout, 3, padding=1, bias=False)

        def block(cin: int, cout: int, deformable: bool = False) -> list[nn.Module]:
            return [conv(cin, cout, deformable), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.stn = SpatialTransformer(1) if variant == "stn" else None
        self.features = nn.Sequential(
            *block(1, 16), nn.MaxPool2d(2),
            *block(16, 32), nn.MaxPool2d(2),
            *block(32, 64, deform),
            *block(64, 64, deform),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(64, num_classes))  # fmt: skip

    @property
    def last_convs(self) -> tuple[nn.Module, nn.Module]:
        """The two convolutions at feature stride 4 (deformable in the dcn variants)."""
        return self.features[8], self.features[11]

    def forward(self, x: Tensor) -> Tensor:
        if self.stn is not None:
            x = self.stn(x)
        return self.classifier(self.features(x))


@dataclass
class DemoConfig:
    epochs: int = 8
    seeds: int = 3
    copies: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: train on the first N training images only (smoke tests); None: all
    train_limit: int | None = None


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / max(total, 1)


def train_variant(variant: str, seed: int, train_set, test_set, config: DemoConfig,
                  progress: bool = True) -> dict:  # fmt: skip
    """Train one variant with one seed; returns its history, model and timings."""
    torch.manual_seed(seed)
    model = DigitNet(variant)
    optimizer = torch.optim.AdamW(param_groups(model, lr=config.lr), lr=config.lr,
                                  weight_decay=config.weight_decay)  # fmt: skip
    steps = config.epochs * math.ceil(len(train_set) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=steps)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    test_loader = DataLoader(test_set, batch_size=256)
    history = {"train_loss": [], "test_accuracy": [], "epoch_seconds": []}
    for epoch in range(config.epochs):
        model.train()
        start, losses = time.perf_counter(), []
        bar = _progress(loader, len(loader), f"{variant} seed {seed} epoch {epoch + 1}/{config.epochs}",
                        progress)  # fmt: skip
        for images, labels in bar:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        history["epoch_seconds"].append(time.perf_counter() - start)
        history["train_loss"].append(statistics.fmean(losses))
        history["test_accuracy"].append(evaluate(model, test_loader))
    return {"model": model, "history": history,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


# --- where a unit looks ---------------------------------------------------------------------


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
    rows = []
    for variant, runs in results.items():
        mean, std = _mean_std([r["history"]["test_accuracy"][-1] for r in runs])
        rows.append({"variant": variant, "label": LABELS[variant], "accuracy_mean": mean,
                     "accuracy_std": std, "params": runs[0]["params"],
                     "seconds_per_epoch": statistics.fmean(
                         s for r in runs for s in r["history"]["epoch_seconds"]),
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
        epochs = range(1, len(runs[0]["history"]["train_loss"]) + 1)
        for key, ax in (("train_loss", ax_loss), ("test_accuracy", ax_acc)):
            curves = torch.tensor([r["history"][key] for r in runs])
            mean = curves.mean(0)
            line, = ax.plot(list(epochs), mean.tolist(), marker="o", ms=3, label=LABELS[variant])
            if len(runs) > 1:
                ax.fill_between(list(epochs), curves.min(0).values.tolist(), curves.max(0).values.tolist(),
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


def write_report(out: str, rows: list[dict], config: DemoConfig, elapsed: float) -> str:
    best_regular = next(r for r in rows if r["variant"] == "regular")
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
        + ", ".join(f"{r['label']} {100 * (r['accuracy_mean'] - best_regular['accuracy_mean']):+.2f} points"
                    for r in rows if r is not best_regular) + ".",  # fmt: skip
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


def run(out: str, config: DemoConfig, variants=VARIANTS, progress: bool = True) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    train_set = TransformedDigits("train", copies=config.copies)
    test_set = TransformedDigits("test", copies=config.copies)
    if config.train_limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(config.train_limit, len(train_set))))
    results: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in range(config.seeds):
            run_result = train_variant(variant, seed, train_set, test_set, config, progress)
            results.setdefault(variant, []).append(run_result)
            acc = run_result["history"]["test_accuracy"][-1]
            print(f"  {LABELS[variant]:28s} seed {seed}: test accuracy {100 * acc:.2f}%",
                  file=sys.stderr)  # fmt: skip
        first = results[variant][0]
        torch.save({"variant": variant, "state_dict": first["model"].state_dict(),
                    "config": asdict(config), "history": first["history"]},
                   os.path.join(out, f"{variant}.pt"))  # fmt: skip
    rows = summarise(results)
    plot_learning_curves(results, os.path.join(out, "learning_curves.png"))
    plot_sampling_locations({v: r[0]["model"] for v, r in results.items()}, test_set,
                            os.path.join(out, "sampling_locations.png"))  # fmt: skip
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": asdict(config), "rows": rows,
                   "histories": {v: [r["history"] for r in runs] for v, runs in results.items()}},
                  f, indent=2)  # fmt: skip
    write_report(out, rows, config, time.perf_counter() - start)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deformable demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="deformable-demo", help="report folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default {DemoConfig.epochs})")
    parser.add_argument("--seeds", type=int, help=f"seeds per variant (default {DemoConfig.seeds})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    config = DemoConfig(epochs=3, seeds=1, copies=2) if args.quick else DemoConfig()
    for name in ("epochs", "seeds"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name} must be >= 1, got {value}")
            setattr(config, name, value)
    print(f"deformable demo: {len(VARIANTS)} variants x {config.seeds} seed(s) x {config.epochs} "
          f"epoch(s) -> {args.out}", file=sys.stderr)  # fmt: skip
    rows = run(args.out, config, progress=not args.no_progress)
    print(table(rows))
    print(f"\nreport: {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
