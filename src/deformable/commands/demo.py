"""``deformable demo``: does deformable convolution buy accuracy? Measured on transformed digits.

Trains DigitNet in four variants (regular, DCNv1, DCNv2, spatial transformer) under one budget
and writes a report (:mod:`deformable.experiments.digits`).
"""

from __future__ import annotations

import argparse
import os
import sys

from deformable.commands import add_device_argument, positive, run_command
from deformable.engine.devices import resolve_device
from deformable.experiments.digits import DigitsConfig, run, table
from deformable.models.digitnet import VARIANTS


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deformable demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="deformable-demo", help="report folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default {DigitsConfig.epochs})")
    parser.add_argument("--seeds", type=int, help=f"seeds per variant (default {DigitsConfig.seeds})")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs in --out and continue an interrupted one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    config = DigitsConfig(epochs=3, seeds=1, copies=2) if args.quick else DigitsConfig()
    positive(parser, args, "epochs", "seeds")
    for name in ("epochs", "seeds"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    print(f"deformable demo: {len(VARIANTS)} variants x {config.seeds} seed(s) x {config.epochs} "
          f"epoch(s) on {device} -> {args.out}", file=sys.stderr)  # fmt: skip
    rows = run(args.out, config, progress=not args.no_progress, resume=args.resume, device=device)
    print(table(rows))
    print(f"\nreport: {os.path.join(args.out, 'report.md')}")
    return 0


def main(argv=None) -> int:
    return run_command("deformable demo", _demo, argv)


if __name__ == "__main__":
    raise SystemExit(main())
