"""``deformable bench``: speed and memory of deform_conv2d against its anchors, in one run: on
the CPU (:mod:`deformable.benchmarks.conv`), or with ``--device cuda`` the GPU suite
(:mod:`deformable.benchmarks.gpu`)."""

from __future__ import annotations

import argparse
import sys

import torch

from deformable.benchmarks import conv, gpu, timing
from deformable.commands import positive, run_command, write_json
from deformable.engine.devices import resolve_device


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deformable bench", description=conv.__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda|cuda:N",
                        help="cpu: the CPU suite (default); cuda: the GPU suite (Triton, cuDNN, "
                             "torchvision's CUDA kernel; float32 and bfloat16; training steps)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--shapes", choices=list(conv.SHAPE_SETS), default="all",
                        help="DESIGN.md's five shapes (design), the hard regimes: few channels, "
                             "5x5, offset groups with dilation, batch-1 ResNet-50 maps (regimes), "
                             "both (all), or two tiny ones for a smoke run (quick)")
    parser.add_argument("--no-torchvision", action="store_true",
                        help="skip torchvision (its backward is slow on large shapes)")
    parser.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    positive(parser, args, "repeats")
    device = resolve_device(args.device)
    if device.type == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}; median of {args.repeats} "
              "(CUDA events); ratios against F.conv2d (cuDNN) in this run", file=sys.stderr)  # fmt: skip
        result = gpu.run(device, args.repeats, quick=args.shapes == "quick")
        print(gpu.markdown(result))
        write_json(args.json, result)
        return 0
    shapes = conv.SHAPE_SETS[args.shapes]
    print(f"torch {torch.__version__}, {timing.cpu_name()}, {torch.get_num_threads()} threads; "
          f"smallest of {timing.CPU_ROUNDS} rounds' medians of {args.repeats}; ratios against "
          "F.conv2d in this run", file=sys.stderr)  # fmt: skip
    rows = conv.run(shapes, args.repeats, not args.no_torchvision)
    print(conv.markdown(rows))
    write_json(args.json, rows)
    return 0


def main(argv=None) -> int:
    return run_command("deformable bench", _bench, argv)


if __name__ == "__main__":
    raise SystemExit(main())
