"""``deformable train segment``: DeepLabV3 on a dilated deformable ResNet, on generated scenes or
a VOC-style folder.

    deformable train segment [--data scenes|PATH] [--model NAME] [--deform-stages 5] [--modulated] ...
    deformable train segment --ablation --seeds 3 --out DIR   # DCNv1's DeepLab ablation at CPU scale

``--data scenes`` (the default) generates the detection scenes with a class per pixel
(background 0, the 10 digits and 3 shapes 1..13) as a VOC-style folder under ``OUT`` once.
``--data PATH`` reads a VOC-style folder: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
(index or palette PNGs, 255 = ignore), ``ImageSets/Segmentation/train.txt`` and ``val.txt``, and
optionally ``classes.txt`` (class names, background first). mIoU, pixel accuracy and per-class
IoU on the validation set after every epoch.
"""

from __future__ import annotations

import argparse
import os
import sys

from deformable.commands import (add_device_argument, add_train_config_arguments, positive, run_command,
                                 stage_list, train_config, train_or_ablate)  # fmt: skip
from deformable.engine.devices import resolve_device
from deformable.experiments.segmentation import run_ablation, train_segmenter
from deformable.models.build import SEGMENTERS


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deformable train segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="scenes", help="'scenes' (generated) or a VOC-style folder")
    parser.add_argument("--model", choices=SEGMENTERS, default="deeplabv3_resnet18")
    parser.add_argument("--deform-stages", type=int, nargs="*", default=[5],
                        help="ResNet stages (2-5) with deformable 3x3 convs (DCNv1's DeepLab: 5)")
    parser.add_argument("--modulated", action="store_true", help="DCNv2 layers (offsets and masks)")
    parser.add_argument("--output-stride", type=int, choices=(8, 16), default=8,
                        help="8: layer3 and layer4 dilated (torchvision); 16: layer4 only (DCNv1)")
    parser.add_argument("--atrous-rates", type=int, nargs="+",
                        help="ASPP dilations (default: for the scenes 2 4 6 at stride 8, 1 2 3 at 16, "
                             "DeepLabV3's scaled to their small maps; for a folder DeepLabV3's, "
                             "12 24 36 at stride 8, 6 12 18 at 16)")
    parser.add_argument("--image-size", type=int,
                        help="scenes: their side (default 96); a folder: resize the longer side to this")
    parser.add_argument("--scenes", type=int, nargs=2, default=[600, 150], metavar=("TRAIN", "VAL"),
                        help="how many scenes to generate for training and validation")
    parser.add_argument("--num-classes", type=int,
                        help="a folder without classes.txt: its classes (default: largest mask index + 1)")
    parser.add_argument("--ablation", action="store_true",
                        help="train regular / DCNv1 conv5 / DCNv1 conv3-5 / DCNv2 conv3-5")
    parser.add_argument("--seeds", type=int, default=1,
                        help="with --ablation: runs per setting, seeds SEED, SEED+1, ... (mean ± std)")
    parser.add_argument("--out", default="deformable-segment", help="checkpoint and metrics folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/last.pt (with --ablation: keep finished runs)")
    parser.add_argument("--limit", type=int, help="train on the first N images only (smoke runs)")
    parser.add_argument("--no-progress", action="store_true")
    add_device_argument(parser)
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (default: 0 on the CPU, "
                        "up to 4 with pinned memory on CUDA)")
    # the CPU-scale setting measured for the README's ablation; the offset branches at 0.1x, as
    # AdamW at the base rate drove conv5's offsets to tens of pixels on a 12x12 map
    add_train_config_arguments(parser, epochs=10, batch_size=4, lr=2e-3, offset_lr_mult=0.1)
    args = parser.parse_args(argv)
    config = train_config(parser, args)
    positive(parser, args, "seeds", "limit", "num-classes")
    positive(parser, args, "image-size", minimum=32 if args.data == "scenes" else 1)
    positive(parser, args, "workers", minimum=0)
    if min(args.scenes) < 1 or (args.num_classes is not None and args.num_classes > 255):
        parser.error("--scenes must be >= 1, --num-classes at most 255 (255 is the ignore label)")
    if args.atrous_rates is not None and min(args.atrous_rates) < 1:
        parser.error("--atrous-rates must be >= 1")
    device = resolve_device(args.device)
    if args.data == "scenes":
        # 96-pixel scenes give 12x12 maps at stride 8: DeepLabV3's rates (made for 65x65 maps)
        # would read mostly padding
        args.image_size = 96 if args.image_size is None else args.image_size
        if args.atrous_rates is None:
            args.atrous_rates = [2, 4, 6] if args.output_stride == 8 else [1, 2, 3]
    spec = {"task": "segment", "model": args.model, "deform_stages": stage_list(parser, args.deform_stages),
            "modulated": args.modulated, "output_stride": args.output_stride,
            "atrous_rates": args.atrous_rates, "image_size": args.image_size}  # fmt: skip
    options = dict(scenes=tuple(args.scenes), num_classes=args.num_classes, limit=args.limit,
                   resume=args.resume, progress=not args.no_progress, device=device,
                   workers=args.workers)  # fmt: skip
    if args.resume and not args.ablation and not os.path.exists(os.path.join(args.out, "last.pt")):
        print(f"deformable train: nothing to resume in {args.out!r}; starting afresh", file=sys.stderr)
    train_or_ablate(device, args.ablation,
                    lambda: run_ablation(spec, args.data, config, args.out, seeds=args.seeds, **options),
                    lambda: train_segmenter(spec, args.data, config, args.out, **options))  # fmt: skip
    return 0


def main(argv=None) -> int:
    return run_command("deformable train segment", _train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
