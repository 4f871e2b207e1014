"""The ``deformable`` commands: one module per command, each parsing its arguments and calling
the library (:mod:`deformable.experiments`, :mod:`deformable.engine`,
:mod:`deformable.analysis`, :mod:`deformable.benchmarks`); :mod:`deformable.cli` dispatches.

A command holds no model, data set, metric or loop of its own. Input errors the library raises
(bad data, checkpoints, images, arguments) end here in one line and exit code 2
(:func:`run_command`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Callable

from deformable.analysis.loading import ExplainError
from deformable.data import DataError
from deformable.engine import CheckpointError, TrainConfig
from deformable.ops import KernelUnavailableError

__all__ = ["USER_ERRORS", "add_train_config_arguments", "run_command", "train_config", "write_json"]

#: The library's exceptions that mean "the input is wrong", not "the code is wrong".
USER_ERRORS = (DataError, CheckpointError, ExplainError, KernelUnavailableError)


def run_command(prog: str, main: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """``main(argv)``, with the library's input errors as one line ``<prog>: error: ...`` on
    stderr and exit code 2 (as argparse reports bad arguments)."""
    try:
        return main(sys.argv[1:] if argv is None else list(argv))
    except USER_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


def add_train_config_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """``--epochs``, ``--batch-size``, ``--lr``, ... : one option per field of TrainConfig
    (``defaults`` overrides the dataclass's defaults)."""
    for f in fields(TrainConfig):
        default = defaults.get(f.name, f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=default,
                            help=f"(default: {default})")  # fmt: skip


def train_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the parsed options; an argparse error for impossible values."""
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if config.epochs < 1 or config.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1")
    return config


def write_json(path: str | None, data) -> None:
    """``data`` as JSON at ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
