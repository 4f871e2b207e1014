"""``deformable bench-roi``: speed of deformable RoI pooling against torchvision's RoIAlign, in
one run (:mod:`deformable.benchmarks.roi`)."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from deformable.benchmarks import roi
from deformable.commands import positive, run_command, write_json


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deformable bench-roi", description=roi.__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    positive(parser, args, "repeats")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.repeats}; ratios against torchvision in this run", file=sys.stderr)
    rows = roi.run(roi.QUICK if args.quick else roi.FULL, args.repeats)
    print(roi.markdown(rows))
    write_json(args.json, rows)
    return 0 if all(math.isfinite(r["fwdbwd_x"]) for r in rows) else 1


def main(argv=None) -> int:
    return run_command("deformable bench-roi", _bench, argv)


if __name__ == "__main__":
    raise SystemExit(main())
