"""``deformable bench-deploy``: inference of a DCN ResNet-50 in PyTorch (our kernels) and in
onnxruntime (exported), in one run (:mod:`deformable.benchmarks.deploy`)."""

from __future__ import annotations

import argparse

from deformable.benchmarks import deploy
from deformable.commands import positive, run_command, write_json


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deformable bench-deploy", description=deploy.__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    positive(parser, args, "batch", "repeats")
    positive(parser, args, "size", minimum=32)
    row = deploy.run(args.batch, args.size, args.repeats)
    print(deploy.markdown(row))
    write_json(args.json, row)
    return 0


def main(argv=None) -> int:
    return run_command("deformable bench-deploy", _bench, argv)


if __name__ == "__main__":
    raise SystemExit(main())
