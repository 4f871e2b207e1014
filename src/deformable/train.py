"""``deformable train classify`` and ``deformable eval``: classifiers on bundled or your own data.

    deformable train classify [--data digits|PATH] [--model NAME] [--epochs N] [--out DIR] [--resume]
    deformable train detect [--data scenes|PATH] [--ablation] ...   (see deformable.train_detect)
    deformable eval --checkpoint DIR/last.pt [--data digits|PATH]

``--data digits`` (the default) is the bundled transformed-digits set; ``--data PATH`` an image
folder with ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``. A checkpoint is written after
every epoch; ``--resume`` continues an interrupted run with no finished epoch lost and the same
result as an uninterrupted one. Metrics go to ``DIR/metrics.csv`` and ``DIR/tensorboard``.
Data-parallel: start the same command with ``torchrun --nproc_per_node N -m deformable.cli ...``
(gloo on the CPU, nccl on GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

import torch
from torch import nn

from deformable.data import DataError, ImageFolderSplit, TransformedDigits
from deformable.engine import CheckpointError, TrainConfig, distributed, evaluate, fit, load_checkpoint

DIGITNET = ("digitnet-regular", "digitnet-dcnv1", "digitnet-dcnv2", "digitnet-stn")
RESNETS = ("resnet18", "resnet34", "resnet50")
MODELS = DIGITNET + RESNETS


class _Channels(torch.utils.data.Dataset):
    """Repeat a grayscale data set's channel to RGB (for the ResNets)."""

    def __init__(self, data, channels: int):
        self.data, self.channels = data, channels

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image, label = self.data[index]
        return image.expand(self.channels, -1, -1), label


def build_model(spec: dict) -> nn.Module:
    """The model a checkpoint's ``model_spec`` describes."""
    name = spec["model"]
    if name in DIGITNET:
        from deformable.demo import DigitNet

        return DigitNet(name.split("-")[1], num_classes=spec["num_classes"])
    from deformable import models

    return getattr(models, name)(deform_stages=tuple(spec["deform_stages"]), modulated=spec["modulated"],
                                 num_classes=spec["num_classes"])  # fmt: skip


def load_data(source: str, spec: dict, *, limit: int | None = None):
    """(train, val, classes) for ``--data``: 'digits' or an image-folder path."""
    channels = 1 if spec["model"] in DIGITNET else 3
    if source == "digits":
        train, val = TransformedDigits("train"), TransformedDigits("test")
        classes = [str(i) for i in range(10)]
        if channels != 1:
            train, val = _Channels(train, channels), _Channels(val, channels)
    else:
        if not os.path.isdir(source):
            raise DataError(f"--data {source!r}: no such folder (or use --data digits)")
        size = spec["image_size"]
        train = ImageFolderSplit(source, "train", size=size, channels=channels)
        val = ImageFolderSplit(source, "val", size=size, channels=channels, classes=train.classes)
        classes = train.classes
    if limit is not None:
        train = torch.utils.data.Subset(train, range(min(limit, len(train))))
    return train, val, classes


def train_main(argv) -> int:
    if argv[:1] == ["detect"]:
        from deformable import train_detect

        return train_detect.main(argv[1:])
    parser = argparse.ArgumentParser(prog="deformable train", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["classify", "detect"], help="what to train")
    parser.add_argument("--data", default="digits", help="'digits' (bundled) or an image folder")
    parser.add_argument("--model", choices=MODELS, default="digitnet-dcnv2")
    parser.add_argument("--deform-stages", type=int, nargs="*", default=[3, 4, 5],
                        help="ResNet stages (2-5) with deformable 3x3 convs")
    parser.add_argument("--modulated", action="store_true", help="DCNv2 layers in the ResNets")
    parser.add_argument("--image-size", type=int, default=64, help="image side for folders")
    parser.add_argument("--out", default="deformable-run", help="checkpoint and metrics folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--limit", type=int, help="train on the first N images only (smoke runs)")
    parser.add_argument("--no-progress", action="store_true")
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if config.epochs < 1 or config.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1")
    spec = {"model": args.model, "deform_stages": args.deform_stages, "modulated": args.modulated,
            "image_size": args.image_size}  # fmt: skip
    with distributed.session():
        train, val, classes = load_data(args.data, spec, limit=args.limit)
        spec["num_classes"] = len(classes)
        spec["classes"] = classes
        if args.resume and not os.path.exists(os.path.join(args.out, "last.pt")):
            print(f"deformable train: nothing to resume in {args.out!r}; starting afresh", file=sys.stderr)
        os.makedirs(args.out, exist_ok=True)
        fit(lambda: build_model(spec), train, val, config, args.out, resume=args.resume,
            progress=not args.no_progress, extra_state={"model_spec": spec, "data": args.data})  # fmt: skip
    return 0


def eval_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="deformable eval", description="Evaluate a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a last.pt written by deformable train")
    parser.add_argument("--data", help="'digits' or an image folder (default: the training data)")
    args = parser.parse_args(argv)
    state = load_checkpoint(args.checkpoint)
    if "model_spec" not in state:
        raise CheckpointError(f"checkpoint {args.checkpoint!r} was not written by deformable train")
    spec = state["model_spec"]
    if spec.get("task") == "detect":
        from deformable import train_detect

        print(train_detect.evaluate_checkpoint(state, args.data) + f", epoch {state['epoch'] + 1}")
        return 0
    model = build_model(spec)
    model.load_state_dict(state["model"])
    _, val, _ = load_data(args.data or state["data"], spec)
    metrics = evaluate(model, val)
    print(f"accuracy {100 * metrics['accuracy']:.2f}%  loss {metrics['loss']:.4f}  "
          f"({len(val)} images, epoch {state['epoch'] + 1})")  # fmt: skip
    return 0


def _guarded(fn, argv) -> int:
    """Bad data or checkpoints end in one clear line and exit code 2, not a traceback."""
    try:
        return fn(argv)
    except (DataError, CheckpointError) as exc:
        print(f"deformable: error: {exc}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    return _guarded(train_main, sys.argv[1:] if argv is None else argv)


def eval_command(argv=None) -> int:
    return _guarded(eval_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
