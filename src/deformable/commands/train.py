"""``deformable train TASK ...``: train a classifier, a detector or a segmenter (one module per task).

    deformable train classify [--data digits|PATH] [--model NAME] ...   (deformable.commands.train_classify)
    deformable train detect [--data scenes|PATH] [--ablation] ...       (deformable.commands.train_detect)
    deformable train segment [--data scenes|PATH] [--ablation] ...      (deformable.commands.train_segment)

A checkpoint is written after every epoch; ``--resume`` continues an interrupted run with no
finished epoch lost and the same result as an uninterrupted one. Data-parallel: start the same
command with ``torchrun --nproc_per_node N -m deformable.cli train ...`` (gloo on the CPU, nccl
on GPUs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: task -> (command module, one-line description)
TASKS = {
    "classify": ("deformable.commands.train_classify", "a classifier on digits or an image folder"),
    "detect": ("deformable.commands.train_detect", "a detector on generated scenes or a COCO folder"),
    "segment": ("deformable.commands.train_segment", "DeepLabV3 on generated scenes or a VOC-style folder"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="deformable train", description=__doc__.split("\n\n")[0],
                                     epilog="Run 'deformable train TASK --help' for a task's options.")  # fmt: skip
    parser.add_argument("task", choices=list(TASKS),
                        help="; ".join(f"{name}: {text}" for name, (_, text) in TASKS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    task = parser.parse_args(argv[:1]).task
    return importlib.import_module(TASKS[task][0]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
