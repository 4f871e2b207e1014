"""``deformable explain``: where a node of a trained network looks, drawn for one image.

For one or more checkpoints written by ``deformable demo`` (``<variant>.pt``: the DigitNet
variant and its state dict), computes three views of one node of one layer on one image —
effective sampling locations, effective receptive field, error-bounded saliency region — and
writes them, the models side by side, to ``--out``:

- ``explain.png``: every view (columns) for every model (rows);
- ``sampling_locations.png``, ``receptive_field.png``, ``saliency.png``: one view, the models
  side by side.

The image is a test image of :class:`deformable.data.TransformedDigits` (``--index``) or a
PNG / JPEG file (``--image``: read as grayscale, resized to the 40x40 canvas, bright digit on a
dark background — pass ``--invert`` for dark ink on white). The node is ``--node Y X`` of
``--layer`` (default: the last convolution), or the most active position of the first model's
layer; all models are explained at the same node.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import Tensor, nn

__all__ = ["ExplainError", "load_checkpoint", "load_image", "main"]

#: side of the demo's images (TransformedDigits' default canvas)
CANVAS = 40


class ExplainError(ValueError):
    """Bad input to ``deformable explain`` (reported without a traceback)."""


def load_checkpoint(path: str) -> tuple[nn.Module, str, dict]:
    """``(model in eval mode, variant, config)`` from a ``deformable demo`` checkpoint, or a
    ``deformable train classify --model digitnet-*`` one.

    Args:
        path (str): a ``<variant>.pt`` file written by ``deformable demo``, or a ``last.pt``.

    Raises ExplainError (a ValueError) naming the file if it is missing, unreadable or not a
    demo checkpoint.
    """
    from deformable.demo import VARIANTS, DigitNet

    if not os.path.isfile(path):
        raise ExplainError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling / zip failure: the file is not a checkpoint
        raise ExplainError(f"cannot read checkpoint {path!r}: {error}") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_spec"), dict):
        # `deformable train classify` on the digits: same network, its own key names
        name = str(checkpoint["model_spec"].get("model", ""))
        if not name.startswith("digitnet-"):
            raise ExplainError(f"checkpoint {path!r} holds a {name!r}; explain draws DigitNet "
                               "checkpoints (deformable demo, or train classify --model digitnet-*)")  # fmt: skip
        checkpoint = {"variant": name.split("-", 1)[1], "state_dict": checkpoint["model"],
                      "config": {"copies": 4}}  # train's digits: TransformedDigits' default copies
    if not isinstance(checkpoint, dict) or not {"variant", "state_dict"} <= set(checkpoint):
        raise ExplainError(f"{path!r} is not a checkpoint of `deformable demo` or `deformable "
                           "train` (expected a dict with keys 'variant' and 'state_dict', or "
                           "'model_spec' and 'model')")  # fmt: skip
    variant = checkpoint["variant"]
    if variant not in VARIANTS:
        raise ExplainError(f"checkpoint {path!r} has variant {variant!r}; expected one of "
                           f"{VARIANTS}")  # fmt: skip
    model = DigitNet(variant)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ExplainError(f"checkpoint {path!r} does not fit a DigitNet({variant!r}): "
                           f"{error}") from None  # fmt: skip
    return model.eval(), variant, dict(checkpoint.get("config") or {})


def load_image(path: str, *, size: int = CANVAS, invert: bool = False) -> Tensor:
    """A PNG / JPEG file as a grayscale ``Tensor[1, size, size]`` in ``[0, 1]``.

    Raises ExplainError naming the file if it is missing or not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ExplainError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as opened:
            gray = opened.convert("L").resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ExplainError(f"cannot read image {path!r}: {error}") from None
    pixels = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8)
    image = pixels.view(1, size, size).float() / 255
    return 1 - image if invert else image


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deformable explain",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                        help="one or more <variant>.pt files from `deformable demo`, drawn side "
                             "by side")  # fmt: skip
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", metavar="PATH", help="a PNG / JPEG image (grayscale, resized "
                        f"to {CANVAS}x{CANVAS})")  # fmt: skip
    source.add_argument("--index", type=int, metavar="N",
                        help="a TransformedDigits test image (default: 0)")  # fmt: skip
    parser.add_argument("--invert", action="store_true",
                        help="invert --image (for dark ink on a light background)")  # fmt: skip
    parser.add_argument("--layer", metavar="NAME",
                        help="the node's layer (default: the last convolution)")  # fmt: skip
    parser.add_argument("--node", nargs=2, type=int, metavar=("Y", "X"),
                        help="node position in the layer's output map (default: the most active "
                             "position of the first model)")  # fmt: skip
    parser.add_argument("--depth", type=int, default=3, metavar="D",
                        help="sampling locations: follow the taps of the last D convolutions, "
                             "as DCNv1's figures (3: 9^3 = 729 points); 0 for every layer "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--error-bound", type=float, default=0.1, metavar="E",
                        help="relative error of the saliency region (default: %(default)s)")
    parser.add_argument("--grow", choices=("square", "gradient"), default="square",
                        help="how the saliency region grows (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs")
    return parser


def _labels(paths: list[str], variants: list[str]) -> list[str]:
    from deformable.demo import LABELS

    labels = [LABELS[v] for v in variants]
    if len(set(labels)) < len(labels):  # same variant twice: tell them apart by file
        labels = [f"{label}\n{os.path.basename(p)}" for label, p in zip(labels, paths)]
    return labels


def run(args: argparse.Namespace) -> list[str]:
    """Compute and draw the views; returns the PNG paths written."""
    from deformable.analysis.chain import layer_chain, most_active_node, resolve_layer, run_to_layer
    from deformable.analysis.figures import VIEWS, node_views, plot_views
    from deformable.data import TransformedDigits

    loaded = [load_checkpoint(p) for p in args.checkpoint]
    models = [m for m, _, _ in loaded]
    if args.image is not None:
        image = load_image(args.image, invert=args.invert)
        source = os.path.basename(args.image)
    else:
        index = 0 if args.index is None else args.index
        test_set = TransformedDigits("test", copies=int(loaded[0][2].get("copies", 1)))
        if not 0 <= index < len(test_set):
            raise ExplainError(f"--index must be in [0, {len(test_set)}) (the test set of the "
                               f"checkpoint's data), got {index}")  # fmt: skip
        image, label = test_set[index]
        source = f"test image {index} (digit {label})"
    chain = layer_chain(models[0])
    try:
        layer = chain[resolve_layer(chain, args.layer)][0]
    except ValueError as error:
        raise ExplainError(f"--layer: {error}") from None
    if args.depth < 0:
        raise ExplainError(f"--depth must be >= 0 (0: every layer), got {args.depth}")
    if not 0 <= args.error_bound < 1:
        raise ExplainError(f"--error-bound must be in [0, 1), got {args.error_bound}")
    if args.node is None:
        with torch.no_grad():
            output, _ = run_to_layer(models[0], image[None], dict(chain)[layer])
        node = most_active_node(output)
    else:
        node = tuple(args.node)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise ExplainError(f"cannot create --out {args.out!r}: {error}") from None

    labels = _labels(args.checkpoint, [v for _, v, _ in loaded])
    rows = []
    for model, label in zip(models, labels):
        try:
            rows.append(node_views(model, image, layer, node, label=label,
                                   depth=args.depth or None,
                                   error_bound=args.error_bound, grow=args.grow))  # fmt: skip
        except ValueError as error:
            raise ExplainError(f"{label.splitlines()[0]}: {error}") from None
    title = f"{source}: node {node} of layer {layer}"
    written = [os.path.join(args.out, "explain.png")]
    plot_views(image, rows, written[0], title=title)
    for key, name in (("sampling", "sampling_locations.png"),
                      ("receptive_field", "receptive_field.png"), ("saliency", "saliency.png")):
        written.append(os.path.join(args.out, name))
        plot_views(image, rows, written[-1], views=(key,), transpose=True,
                   title=f"{VIEWS[key]} — {title}")  # fmt: skip
    for row in rows:
        name = row.label.splitlines()[0]
        print(f"{name:28s} {len(row.sampling.points):6d} sampling points, saliency region "
              f"{row.saliency.size} px (error {row.saliency.error:.3f})")  # fmt: skip
    return written


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        written = run(args)
    except ExplainError as error:
        print(f"deformable explain: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
