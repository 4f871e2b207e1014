"""``deformable train detect``: the library's detectors on generated scenes or COCO-format data.

    deformable train detect [--data scenes|PATH] [--model NAME] [--roi-pool mdeform] [--mimic] ...
    deformable train detect --ablation --out DIR      # DCNv2's ablation at CPU scale

``--data scenes`` (the default) generates the COCO-format scene set (digits and shapes of widely
varying scale and aspect, :mod:`deformable.data.scenes`) into ``OUT/data`` once. ``--data PATH``
reads ``PATH/annotations_train.json`` with images in ``PATH/train/`` and
``PATH/annotations_val.json`` with ``PATH/val/`` (the layout the generator writes). Evaluation
is pycocotools' COCOeval (AP, AP50, AP75, APs, APm, APl) after every epoch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import fields, replace

import torch

from deformable.data import DataError
from deformable.data.coco import CocoDetection, collate
from deformable.engine import TrainConfig, distributed, load_checkpoint
from deformable.engine.classification import train_loop
from deformable.engine.detection import COCO_METRICS, detection_loss, evaluate_coco

DETECTORS = ("fasterrcnn_resnet18_fpn", "fasterrcnn_resnet50_fpn", "rfcn_resnet18", "rfcn_resnet50")
ROI_POOLS = ("align", "deform", "mdeform")

#: DCNv2's ablation (its Table 1 / 3 at CPU scale): name -> (deform_stages, modulated, roi_pool, mimic)
ABLATION = {
    "regular": ((), False, "align", False),
    "dcnv1 conv3-5": ((3, 4, 5), False, "align", False),
    "dcnv2 conv3-5": ((3, 4, 5), True, "align", False),
    "+ mdeform RoI pooling": ((3, 4, 5), True, "mdeform", False),
    "+ feature mimicking": ((3, 4, 5), True, "mdeform", True),
}


def build_detector(spec: dict) -> torch.nn.Module:
    """The detector a checkpoint's ``model_spec`` describes."""
    from deformable.models import detection

    size = spec["image_size"]
    common = dict(num_classes=spec["num_classes"], deform_stages=tuple(spec["deform_stages"]),
                  modulated=spec["modulated"], min_size=size, max_size=size)  # fmt: skip
    if spec["model"].startswith("rfcn"):
        return getattr(detection, spec["model"])(**common)
    mimic = False
    if spec["mimic"]:
        # the paper's 224-pixel crops of 32 RoIs per image cost ~2.7x its backbone's pixels on
        # 1000x600 images; crops scaled to the image keep the ratio (64 / 8: 2x at 128x128)
        mimic = detection.FeatureMimicking(crop_size=spec.get("mimic_crop_size", 224),
                                           rois_per_image=spec.get("mimic_rois_per_image", 32))  # fmt: skip
    # CPU-scale settings: fewer proposals and sampled RoIs than torchvision's COCO defaults
    return getattr(detection, spec["model"])(
        **common, roi_pool=spec["roi_pool"], mimic=mimic, rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
        box_batch_size_per_image=128, box_detections_per_img=50)  # fmt: skip


def load_detection_data(source: str, data_root: str, *, limit: int | None = None,
                        scenes: tuple[int, int] = (600, 150), size: int = 128):  # fmt: skip
    """(train, val, folder) for ``--data``: 'scenes' (generated once into ``data_root/data``) or
    a COCO-format folder."""
    if source == "scenes":
        from deformable.data.scenes import generate_scenes

        source = os.path.join(data_root, "data")
        if distributed.rank_and_world()[0] == 0:  # one process writes, the others wait for it
            for split, count in zip(("train", "val"), scenes):
                if not os.path.exists(os.path.join(source, f"annotations_{split}.json")):
                    generate_scenes(source, split, count, size=size)
        distributed.barrier()
    elif not os.path.isdir(source):
        raise DataError(f"--data {source!r}: no such folder (or use --data scenes)")
    train = CocoDetection(os.path.join(source, "train"), os.path.join(source, "annotations_train.json"))
    val = CocoDetection(os.path.join(source, "val"), os.path.join(source, "annotations_val.json"))
    if train.categories != val.categories:
        raise DataError(f"{source!r}: the train and val annotation files list different categories")
    if limit is not None:
        train = torch.utils.data.Subset(train, range(min(limit, len(train))))
    return train, val, source


def _train_one(spec: dict, config: TrainConfig, data: str, data_root: str, out: str, *,
               resume: bool, limit, progress: bool) -> dict:  # fmt: skip
    train, val, source = load_detection_data(data, data_root, limit=limit, size=spec["image_size"])
    spec = dict(spec, num_classes=val.num_classes, classes=val.categories)  # --limit cuts train only
    return train_loop(lambda: build_detector(spec), train, val, config, out, loss=detection_loss,
                      evaluate=evaluate_coco, collate_fn=collate, resume=resume, progress=progress,
                      extra_state={"model_spec": spec, "data": source})  # fmt: skip


def _fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}"


def _cell(values: list[float]) -> str:
    """One run's value, or mean ± sample std over several (in %; NaN as —)."""
    if len(values) == 1 or any(math.isnan(v) for v in values):
        return _fmt(values[0]) if len(values) == 1 else "—"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def ablation_table(results: dict[str, list[dict]]) -> str:
    """The markdown table of the final COCO metrics of each setting, and its training seconds per
    epoch: ``results`` maps a setting to the histories of its runs (one per seed)."""
    header = "| setting | " + " | ".join(COCO_METRICS) + " | s / epoch |"
    lines = [header, "|---" * (len(COCO_METRICS) + 2) + "|"]
    for name, histories in results.items():
        cells = [_cell([h[f"val_{m}"][-1] for h in histories]) for m in COCO_METRICS]
        seconds = [s for h in histories for s in h["seconds"]]
        cells.append(f"{sum(seconds) / len(seconds):.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ablation(results: dict[str, list[dict]], path: str) -> None:
    """Validation AP and AP50 per epoch of each setting (mean over seeds, band: min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, histories in results.items():
        for metric, ax in zip(("AP", "AP50"), axes):
            curves = torch.tensor([h[f"val_{metric}"] for h in histories]) * 100
            epochs = list(range(1, curves.shape[1] + 1))
            (line,) = ax.plot(epochs, curves.mean(0).tolist(), marker="o", ms=3, label=name)
            if len(histories) > 1:
                ax.fill_between(epochs, curves.min(0).values.tolist(), curves.max(0).values.tolist(),
                                color=line.get_color(), alpha=0.15)  # fmt: skip
    seeds = len(next(iter(results.values())))
    band = f", band: min-max over {seeds} seeds" if seeds > 1 else ""
    for metric, ax in zip(("AP", "AP50"), axes):
        ax.set(title=f"validation {metric}{band}", xlabel="epoch", ylabel=f"COCO box {metric} (%)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="deformable train detect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="scenes", help="'scenes' (generated) or a COCO-format folder")
    parser.add_argument("--model", choices=DETECTORS, default="fasterrcnn_resnet18_fpn")
    parser.add_argument("--deform-stages", type=int, nargs="*", default=[3, 4, 5])
    parser.add_argument("--v1", action="store_true", help="DCNv1 convs (no masks); default DCNv2")
    parser.add_argument("--roi-pool", choices=ROI_POOLS, default="mdeform")
    parser.add_argument("--mimic", action="store_true", help="R-CNN feature mimicking (training only)")
    parser.add_argument("--mimic-crop-size", type=int, default=64,
                        help="side of the crops feature mimicking feeds the backbone (paper: 224)")
    parser.add_argument("--mimic-rois-per-image", type=int, default=8,
                        help="foreground RoIs mimicked per image (paper: 32)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--ablation", action="store_true", help="train the five settings of DCNv2's ablation")
    parser.add_argument("--seeds", type=int, default=1,
                        help="with --ablation: runs per setting, seeds SEED, SEED+1, ... (mean ± std)")
    parser.add_argument("--out", default="deformable-detect")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--limit", type=int, help="train on the first N images only (smoke runs)")
    parser.add_argument("--no-progress", action="store_true")
    defaults = {"epochs": 12, "batch_size": 8, "lr": 1e-3}
    for f in fields(TrainConfig):
        default = defaults.get(f.name, f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=default)
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if config.epochs < 1 or config.batch_size < 1 or args.seeds < 1:
        parser.error("--epochs, --batch-size and --seeds must be >= 1")
    if args.mimic_crop_size < 1 or args.mimic_rois_per_image < 1:
        parser.error("--mimic-crop-size and --mimic-rois-per-image must be >= 1")
    spec = {"task": "detect", "model": args.model, "deform_stages": args.deform_stages,
            "modulated": not args.v1, "roi_pool": args.roi_pool, "mimic": args.mimic,
            "mimic_crop_size": args.mimic_crop_size, "mimic_rois_per_image": args.mimic_rois_per_image,
            "image_size": args.image_size}  # fmt: skip
    if args.ablation and args.model.startswith("rfcn"):
        parser.error("--ablation trains the Faster R-CNN settings; choose a fasterrcnn --model")
    os.makedirs(args.out, exist_ok=True)
    with distributed.session():  # under torchrun: data-parallel
        if not args.ablation:
            _train_one(spec, config, args.data, args.out, args.out, resume=args.resume, limit=args.limit,
                       progress=not args.no_progress)  # fmt: skip
            return 0
        results: dict[str, list[dict]] = {}
        for offset in range(args.seeds):  # every setting once before any is repeated
            seed = config.seed + offset
            for index, (name, (stages, modulated, roi_pool, mimic)) in enumerate(ABLATION.items()):
                run_spec = dict(spec, deform_stages=list(stages), modulated=modulated, roi_pool=roi_pool,
                                mimic=mimic)  # fmt: skip
                print(f"[{index + 1}/{len(ABLATION)}] {name}, seed {seed}", file=sys.stderr)
                folder = f"run{index}" if offset == 0 else f"run{index}-seed{seed}"
                results.setdefault(name, []).append(_train_one(
                    run_spec, replace(config, seed=seed), args.data, args.out,
                    os.path.join(args.out, folder), resume=args.resume, limit=args.limit,
                    progress=not args.no_progress))  # fmt: skip
        if distributed.rank_and_world()[0] == 0:
            table = ablation_table(results)
            seeds = f"seed {config.seed}" if args.seeds == 1 else \
                f"seeds {config.seed}-{config.seed + args.seeds - 1} (mean ± std)"
            plot_ablation(results, os.path.join(args.out, "ablation.png"))
            with open(os.path.join(args.out, "ablation.md"), "w") as f:
                f.write(f"# DCNv2 ablation at CPU scale\n\n{args.model}, {config.epochs} epochs, {seeds}, "
                        f"COCO box metrics (%) on the validation scenes.\n\n{table}\n\n"
                        f"![validation AP per epoch](ablation.png)\n")  # fmt: skip
            print(table)
    return 0


def evaluate_checkpoint(state: dict, data: str | None) -> str:
    spec = state["model_spec"]
    model = build_detector(spec)
    model.load_state_dict(state["model"])
    source = data or state["data"]
    val = CocoDetection(os.path.join(source, "val"), os.path.join(source, "annotations_val.json"))
    metrics = evaluate_coco(model, val)
    return "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()) + f"  ({len(val)} images)"
