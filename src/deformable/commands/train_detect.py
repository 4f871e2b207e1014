"""``deformable train detect``: the library's detectors on generated scenes or COCO-format data.

    deformable train detect [--data scenes|PATH] [--model NAME] [--roi-pool mdeform] [--mimic] ...
    deformable train detect --ablation --out DIR      # DCNv2's ablation at CPU scale
    deformable train detect --ablation --model maskrcnn_resnet18_fpn --out DIR   # ... of Mask R-CNN

``--data scenes`` (the default) generates the COCO-format scene set (digits and shapes of widely
varying scale and aspect, :mod:`deformable.data.scenes`) into ``OUT/data`` once. ``--data PATH``
reads ``PATH/annotations_train.json`` with images in ``PATH/train/`` and
``PATH/annotations_val.json`` with ``PATH/val/`` (the layout the generator writes); a Mask R-CNN
needs every annotation's ``segmentation`` (polygons or RLE; the scenes have them). Evaluation
is pycocotools' COCOeval (AP, AP50, AP75, APs, APm, APl) after every epoch, of the boxes and, for
a Mask R-CNN, of the masks (``mask_AP``, ...).
"""

from __future__ import annotations

import argparse

from deformable.commands import (add_device_argument, add_train_config_arguments, positive, run_command,
                                 stage_list, train_config, train_or_ablate)  # fmt: skip
from deformable.engine.devices import resolve_device
from deformable.experiments.detection import run_ablation
from deformable.experiments.runs import train_detector
from deformable.models.build import DETECTORS, ROI_POOLS


def _train(argv: list[str]) -> int:
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
    add_device_argument(parser)
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (default: 0 on the CPU, "
                        "up to 4 with pinned memory on CUDA)")
    add_train_config_arguments(parser, epochs=12, batch_size=8, lr=1e-3)
    args = parser.parse_args(argv)
    config = train_config(parser, args)
    positive(parser, args, "seeds", "limit", "mimic-crop-size", "mimic-rois-per-image")
    positive(parser, args, "image-size", minimum=32)  # the FPN's five levels need a few pixels each
    positive(parser, args, "workers", minimum=0)
    device = resolve_device(args.device)
    if args.ablation and args.model.startswith("rfcn"):
        parser.error("--ablation trains the Faster / Mask R-CNN settings; choose a fasterrcnn or "
                     "maskrcnn --model")
    spec = {"task": "detect", "model": args.model, "deform_stages": stage_list(parser, args.deform_stages),
            "modulated": not args.v1, "roi_pool": args.roi_pool, "mimic": args.mimic,
            "mimic_crop_size": args.mimic_crop_size, "mimic_rois_per_image": args.mimic_rois_per_image,
            "image_size": args.image_size}  # fmt: skip
    options = dict(limit=args.limit, resume=args.resume, progress=not args.no_progress, device=device,
                   workers=args.workers)  # fmt: skip
    train_or_ablate(device, args.ablation,
                    lambda: run_ablation(spec, args.data, config, args.out, seeds=args.seeds, **options),
                    lambda: train_detector(spec, args.data, config, args.out, **options))  # fmt: skip
    return 0


def main(argv=None) -> int:
    return run_command("deformable train detect", _train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
