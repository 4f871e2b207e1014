"""The ``deformable`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="deformable",
        description="Deformable ConvNets v1/v2 for PyTorch.",
        epilog="Run 'deformable COMMAND --help' for a command's options.",
    )
    parser.add_argument("command", choices=["bench"], help="bench: speed and memory of the operators")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parsed = parser.parse_args(argv[:1])
    if parsed.command == "bench":
        from deformable import bench

        return bench.main(argv[1:])
    return 2  # unreachable: argparse rejects other commands


if __name__ == "__main__":
    raise SystemExit(main())
