"""``deformable eval``: evaluate a checkpoint of ``deformable train`` (or of ``deformable demo``)
on its validation data or on ``--data``: accuracy and loss of a classifier, COCO box metrics of
a detector (and mask metrics, ``mask_AP`` ..., of a Mask R-CNN), mIoU, pixel accuracy and
per-class IoU of a segmenter."""

from __future__ import annotations

import argparse

from deformable.commands import add_device_argument, run_command
from deformable.engine import CheckpointError, load_checkpoint
from deformable.engine.devices import resolve_device
from deformable.experiments.detection import percent
from deformable.experiments.runs import evaluate_checkpoint


def _evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deformable eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a last.pt written by deformable train")
    parser.add_argument("--data", help="'digits', 'scenes' or a folder (default: the training data)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint)  # on the CPU: a GPU checkpoint evaluates anywhere
    if "model_spec" not in state:
        raise CheckpointError(f"checkpoint {args.checkpoint!r} was not written by deformable train")
    metrics, count = evaluate_checkpoint(state, args.data, device=device)
    epoch = f"epoch {state['epoch'] + 1}"
    if state["model_spec"].get("task") == "segment":
        print(f"mIoU {percent(metrics['mIoU'])}  pixel accuracy {percent(metrics['pixel_accuracy'])}  "
              f"({count} images, {epoch})")
        print("IoU  " + "  ".join(f"{k[len('IoU/'):]} {percent(v)}" for k, v in metrics.items()
                                  if k.startswith("IoU/")))  # fmt: skip
    elif state["model_spec"].get("task") == "detect":
        print("  ".join(f"{k} {percent(v)}" for k, v in metrics.items()) + f"  ({count} images), {epoch}")
    else:
        print(f"accuracy {100 * metrics['accuracy']:.2f}%  loss {metrics['loss']:.4f}  ({count} images, {epoch})")
    return 0


def main(argv=None) -> int:
    return run_command("deformable eval", _evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
