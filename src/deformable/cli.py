"""The ``deformable`` command line."""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module with a main(argv) function, one-line description)
COMMANDS = {
    "demo": ("deformable.demo", "train regular / DCNv1 / DCNv2 / STN on transformed digits, write a report"),
    "bench": ("deformable.bench", "speed and memory of deform_conv2d against its anchors"),
    "bench-roi": ("deformable.bench_roi", "speed of deformable RoI pooling against RoIAlign"),
    "bench-deploy": ("deformable.bench_deploy", "DCN ResNet-50 inference: PyTorch vs onnxruntime"),
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
    module = importlib.import_module(COMMANDS[parsed.command][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
