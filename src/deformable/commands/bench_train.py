"""``deformable bench-train``: training steps of the demo's DigitNet, regular against DCNv1 and
DCNv2, in NCHW and channels-last memory, in one run (:mod:`deformable.benchmarks.train`)."""

from __future__ import annotations

import argparse

from deformable.benchmarks import train
from deformable.commands import positive, run_command, write_json


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deformable bench-train",
                                     description=train.__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=40, help="image side (the demo's: 40)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    positive(parser, args, "batch", "repeats")
    positive(parser, args, "size", minimum=8)
    result = train.run(args.batch, args.size, args.repeats)
    print(train.markdown(result))
    write_json(args.json, result)
    return 0


def main(argv=None) -> int:
    return run_command("deformable bench-train", _bench, argv)


if __name__ == "__main__":
    raise SystemExit(main())
