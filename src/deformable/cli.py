"""The ``deformable`` command line: dispatches to the command modules of
:mod:`deformable.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> ("module:function" taking argv and returning an exit code, one-line description)
COMMANDS = {
    "demo": ("deformable.commands.demo:main",
             "train regular / DCNv1 / DCNv2 / STN on transformed digits, write a report"),
    "train": ("deformable.commands.train:main",
              "train a classifier (digits, image folders) or a detector (scenes, COCO); resumable, DDP"),
    "eval": ("deformable.commands.evaluate:main", "evaluate a checkpoint of deformable train"),
    "explain": ("deformable.commands.explain:main",
                "draw where a node looks: sampling locations, receptive field, saliency region"),
    "bench": ("deformable.commands.bench:main", "speed and memory of deform_conv2d against its anchors"),
    "bench-roi": ("deformable.commands.bench_roi:main", "speed of deformable RoI pooling against RoIAlign"),
    "bench-deploy": ("deformable.commands.bench_deploy:main",
                     "DCN ResNet-50 inference: PyTorch vs onnxruntime"),
    "bench-train": ("deformable.commands.bench_train:main",
                    "the demo's training step: regular CNN vs DCNv1 / DCNv2, two memory formats"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="deformable",
        description="Deformable ConvNets v1/v2 for PyTorch.",
        epilog="Run 'deformable COMMAND --help' for a command's options.",
    )
    parser.add_argument("command", choices=list(COMMANDS),
                        help="; ".join(f"{name}: {text}" for name, (_, text) in COMMANDS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parsed = parser.parse_args(argv[:1])
    module, function = COMMANDS[parsed.command][0].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
