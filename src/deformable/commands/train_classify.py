"""``deformable train classify``: a classifier on the bundled digits or your own image folder.

``--data digits`` (the default) is the bundled transformed-digits set; ``--data PATH`` an image
folder with ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``. Metrics go to
``OUT/metrics.csv`` and ``OUT/tensorboard``, the checkpoint to ``OUT/last.pt`` after every epoch.
"""

from __future__ import annotations

import argparse
import os
import sys

from deformable.commands import add_device_argument, add_train_config_arguments, positive, run_command, stage_list, train_config
from deformable.engine import distributed
from deformable.engine.devices import resolve_device
from deformable.experiments.runs import train_classifier
from deformable.models.build import CLASSIFIERS


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deformable train classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits", help="'digits' (bundled) or an image folder")
    parser.add_argument("--model", choices=CLASSIFIERS, default="digitnet-dcnv2")
    parser.add_argument("--deform-stages", type=int, nargs="*", default=[3, 4, 5],
                        help="ResNet stages (2-5) with deformable 3x3 convs")
    parser.add_argument("--modulated", action="store_true", help="DCNv2 layers in the ResNets")
    parser.add_argument("--image-size", type=int, default=64, help="image side for folders")
    parser.add_argument("--out", default="deformable-run", help="checkpoint and metrics folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--limit", type=int, help="train on the first N images only (smoke runs)")
    parser.add_argument("--no-progress", action="store_true")
    add_device_argument(parser)
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (default: 0 on the CPU, "
                        "up to 4 with pinned memory on CUDA)")
    add_train_config_arguments(parser)
    args = parser.parse_args(argv)
    config = train_config(parser, args)
    positive(parser, args, "limit", "image-size")
    positive(parser, args, "workers", minimum=0)
    device = resolve_device(args.device)
    spec = {"model": args.model, "deform_stages": stage_list(parser, args.deform_stages), "modulated": args.modulated,
            "image_size": args.image_size}  # fmt: skip
    if args.resume and not os.path.exists(os.path.join(args.out, "last.pt")):
        print(f"deformable train: nothing to resume in {args.out!r}; starting afresh", file=sys.stderr)
    with distributed.session(device):
        train_classifier(spec, args.data, config, args.out, limit=args.limit, resume=args.resume,
                         progress=not args.no_progress, device=device, workers=args.workers)  # fmt: skip
    return 0


def main(argv=None) -> int:
    return run_command("deformable train classify", _train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
