"""``deformable bench-roi``: speed of deformable RoI pooling against torchvision's RoIAlign, in
one run (:mod:`deformable.benchmarks.roi`)."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from deformable.benchmarks import roi, timing
from deformable.commands import positive, run_command, write_json
from deformable.engine.devices import resolve_device


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deformable bench-roi", description=roi.__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda|cuda:N",
                        help="where to time (default: cpu); on cuda: float32 and bfloat16, CUDA "
                             "events and peak memory")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    positive(parser, args, "repeats")
    device = resolve_device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{timing.cpu_name()}, {torch.get_num_threads()} threads")  # fmt: skip
    rounds = "" if device.type == "cuda" else f"smallest of {timing.CPU_ROUNDS} rounds' "
    print(f"torch {torch.__version__}, {where}; {rounds}median of {args.repeats}; ratios "
          "against torchvision in this run", file=sys.stderr)  # fmt: skip
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    rows = roi.run(roi.QUICK if args.quick else roi.FULL, args.repeats, device, dtypes)
    print(roi.markdown(rows))
    write_json(args.json, rows)
    return 0 if all(math.isfinite(r.get("fwdbwd_x", 1.0)) for r in rows) else 1


def main(argv=None) -> int:
    return run_command("deformable bench-roi", _bench, argv)


if __name__ == "__main__":
    raise SystemExit(main())
