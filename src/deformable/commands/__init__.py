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
from deformable.engine import CheckpointError, ConfigError, TrainConfig, WriteError
from deformable.engine.devices import DeviceError
from deformable.ops import KernelUnavailableError

__all__ = ["USER_ERRORS", "add_device_argument", "add_train_config_arguments", "positive", "run_command", "stage_list",
           "train_config", "write_json"]

#: The library's exceptions that mean "the input (or the disk) is wrong", not "the code is wrong":
#: bad data, unsafe or mismatched checkpoints, bad analysis input, impossible settings, kernels
#: that cannot run on the device, a full disk.
USER_ERRORS = (DataError, CheckpointError, ExplainError, ConfigError, DeviceError, KernelUnavailableError,
               WriteError)


def run_command(prog: str, main: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """``main(argv)``, with the library's input errors (and the system's refusals to read or
    write a file the user named: missing, no permission, disk full) as one line
    ``<prog>: error: ...`` on stderr and exit code 2, as argparse reports bad arguments. Any
    other exception is a bug and keeps its traceback."""
    try:
        return main(sys.argv[1:] if argv is None else list(argv))
    except (*USER_ERRORS, OSError) as error:
        message = " ".join(str(error).split())  # one line, whatever the library wrapped
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def add_train_config_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """``--epochs``, ``--batch-size``, ``--lr``, ... : one option per field of TrainConfig
    (``defaults`` overrides the dataclass's defaults)."""
    for f in fields(TrainConfig):
        default = defaults.get(f.name, f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=default,
                            choices=f.metadata.get("choices"), help=f"(default: {default})")  # fmt: skip


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda|cuda:N`` (auto: CUDA when available)."""
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                        help="where to compute (default: auto, CUDA when available; under torchrun "
                             "cuda means each process's own GPU)")  # fmt: skip


def train_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the parsed options; an argparse error naming the option for a value
    that cannot work (TrainConfig checks them)."""
    try:
        return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    except ConfigError as error:
        parser.error(f"--{error.field.replace('_', '-')} {error.reason}")


def positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str, minimum: int = 1) -> None:
    """An argparse error unless every option of ``names`` that was given is at least ``minimum``."""
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {value}")


def stage_list(parser: argparse.ArgumentParser, stages: list[int]) -> list[int]:
    """``--deform-stages``: distinct ResNet stages from 2 to 5 (an argparse error otherwise)."""
    if any(s not in (2, 3, 4, 5) for s in stages) or len(set(stages)) != len(stages):
        parser.error(f"--deform-stages takes distinct stages from 2 3 4 5 (conv2_x..conv5_x), got "
                     f"{' '.join(map(str, stages))}")  # fmt: skip
    return stages


def train_or_ablate(device, ablation: bool, ablate: Callable[[], str], train: Callable[[], object]) -> None:
    """In a (torchrun) session on ``device``: ``ablate()``, whose table the first process prints,
    if ``ablation``, else ``train()``."""
    from deformable.engine import distributed

    with distributed.session(device):  # under torchrun: data-parallel
        if ablation:
            table = ablate()
            if distributed.rank_and_world()[0] == 0:
                print(table)
        else:
            train()


def write_json(path: str | None, data) -> None:
    """``data`` as JSON at ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
