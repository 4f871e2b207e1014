"""``deformable explain``: where a node of a trained network looks, drawn for one image.

For one or more checkpoints of DigitNets (``<variant>.pt`` of ``deformable demo``, or ``last.pt``
of ``deformable train classify --model digitnet-*``), computes three views of one node of one layer on one image —
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

For checkpoints of ``deformable train detect`` (Faster / Mask R-CNN), the image is a validation
image of the checkpoint's data (``--index``) or an RGB file (``--image``), resized as the
detectors resize it, and two nodes are drawn (:mod:`deformable.analysis.detection_views`): a
node of the last layer of conv5 (``--node``/``--layer``; default: the node nearest the box's
centre) and the per-RoI node, the box head's 2fc output for one box (``--box X1 Y1 X2 Y2`` in
pixels of the image; default: the first checkpoint's most confident detection), its bins'
sample points followed down the FPN and the backbone (``--roi-depth``). ``explain.png`` has a
row per checkpoint; ``backbone_*.png`` and ``roi_*.png`` hold one view each.

For checkpoints of ``deformable train segment`` (DeepLabV3), the image is a validation image of
the checkpoint's VOC-style folder (``--index``) or an RGB file (``--image``, its longer side
resized to the training ``--image-size``), and the node is one of the last layer of conv5
(``--node``/``--layer``; default: the first model's most active position there): the same files
as for DigitNets, a row per checkpoint.
"""

from __future__ import annotations

import argparse
import os

from deformable.analysis.loading import (CANVAS, ExplainError, fit_longer_side, load_explainable,
                                         load_image, load_rgb_image, validation_scene,
                                         validation_segmentation_image)  # fmt: skip
from deformable.commands import add_device_argument, run_command
from deformable.engine.devices import resolve_device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deformable explain",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                        help="one or more <variant>.pt files from `deformable demo`, or last.pt "
                             "of `deformable train` (classify digitnet-*, detect, segment), drawn "
                             "side by side")  # fmt: skip
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", metavar="PATH", help="a PNG / JPEG image (DigitNets: grayscale, "
                        f"resized to {CANVAS}x{CANVAS}; detectors, segmenters: RGB)")  # fmt: skip
    source.add_argument("--index", type=int, metavar="N",
                        help="a TransformedDigits test image, or a validation image of a "
                             "detector's or segmenter's data (default: 0)")  # fmt: skip
    parser.add_argument("--invert", action="store_true",
                        help="invert --image (for dark ink on a light background)")  # fmt: skip
    parser.add_argument("--layer", metavar="NAME",
                        help="the node's layer (default: the last convolution; of conv5 for "
                             "detectors and segmenters)")  # fmt: skip
    parser.add_argument("--node", nargs=2, type=int, metavar=("Y", "X"),
                        help="node position in the layer's output map (default: the most active "
                             "position of the first model; for detectors the node nearest the "
                             "box's centre)")  # fmt: skip
    parser.add_argument("--depth", type=int, default=3, metavar="D",
                        help="sampling locations: follow the taps of the last D convolutions, "
                             "as DCNv1's figures (3: 9^3 = 729 points); 0 for every layer "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--box", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"),
                        help="detectors: the RoI of the per-RoI node, in pixels of the image "
                             "(default: the first checkpoint's most confident detection)")  # fmt: skip
    parser.add_argument("--roi-depth", type=int, default=1, metavar="D",
                        help="detectors: follow each bin sample down the last D convolutions of "
                             "each stage it reaches; 0 for every layer (default: %(default)s)")  # fmt: skip
    parser.add_argument("--error-bound", type=float, default=0.1, metavar="E",
                        help="relative error of the saliency region (default: %(default)s)")
    parser.add_argument("--grow", choices=("square", "gradient"), default="square",
                        help="how the saliency region grows (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs")
    add_device_argument(parser)
    return parser


def _labels(paths: list[str], labels: list[str]) -> list[str]:
    if len(set(labels)) < len(labels):  # same setting twice: tell them apart by file
        names = [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))),
                              os.path.basename(p)) for p in paths]  # fmt: skip
        labels = [f"{label}\n{name}" for label, name in zip(labels, names)]
    return labels


def _check_settings(args: argparse.Namespace) -> None:
    if args.depth < 0:
        raise ExplainError(f"--depth must be >= 0 (0: every layer), got {args.depth}")
    if args.roi_depth < 0:
        raise ExplainError(f"--roi-depth must be >= 0 (0: every layer), got {args.roi_depth}")
    if not 0 <= args.error_bound < 1:
        raise ExplainError(f"--error-bound must be in [0, 1), got {args.error_bound}")


def run(args: argparse.Namespace) -> list[str]:
    """Compute and draw the views; returns the PNG paths written."""
    from deformable.analysis.chain import layer_chain, resolve_layer, strongest_node
    from deformable.analysis.figures import VIEWS, node_views, plot_views
    from deformable.data import TransformedDigits

    device = resolve_device(args.device)
    checkpoints = [load_explainable(p) for p in args.checkpoint]
    for checkpoint in checkpoints:  # the analysis feeds each model on its own device
        checkpoint.model.to(device)
    kinds = sorted({c.kind for c in checkpoints})
    if len(kinds) > 1:
        raise ExplainError(f"the checkpoints hold different kinds of network ({', '.join(kinds)}); "
                           "explain one kind at a time")  # fmt: skip
    if kinds == ["detector"]:
        return _run_detectors(args, checkpoints)
    if args.box is not None:
        raise ExplainError("--box is for detector checkpoints (deformable train detect)")
    models = [c.model for c in checkpoints]
    if kinds == ["segmenter"]:
        size = checkpoints[0].options.get("image_size")
        if args.image is not None:
            image = fit_longer_side(load_rgb_image(args.image, invert=args.invert), size)
            source = os.path.basename(args.image)
        else:
            image, source = validation_segmentation_image(
                checkpoints[0].data, 0 if args.index is None else args.index, size)
    elif args.image is not None:
        image = load_image(args.image, invert=args.invert)
        source = os.path.basename(args.image)
    else:
        index = 0 if args.index is None else args.index
        copies = int(checkpoints[0].options.get("copies", 1))
        test_set = TransformedDigits("test", copies=copies)
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
    _check_settings(args)
    node = strongest_node(models[0], image, layer) if args.node is None else tuple(args.node)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise ExplainError(f"cannot create --out {args.out!r}: {error}") from None

    labels = _labels(args.checkpoint, [c.label for c in checkpoints])
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


def _run_detectors(args: argparse.Namespace, checkpoints) -> list[str]:
    """The detector branch of :func:`run`: a backbone node and a per-RoI node per checkpoint."""
    from deformable.analysis.detection_views import explain_detectors
    from deformable.analysis.figures import plot_detector_explanation

    if args.image is not None:
        image, source = load_rgb_image(args.image, invert=args.invert), os.path.basename(args.image)
    else:
        image, source = validation_scene(checkpoints[0].data, 0 if args.index is None else args.index)
    _check_settings(args)
    labels = _labels(args.checkpoint, [c.label for c in checkpoints])
    explained = explain_detectors([c.model for c in checkpoints], image, labels=labels,
                                  box=args.box, node=args.node, layer=args.layer,
                                  depth=args.depth or None, roi_depth=args.roi_depth or None,
                                  error_bound=args.error_bound, grow=args.grow,
                                  classes=checkpoints[0].options.get("classes"))  # fmt: skip
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        raise ExplainError(f"cannot create --out {args.out!r}: {error}") from None
    box = ", ".join(f"{v:.0f}" for v in explained.box)
    title = (f"{source}: node {explained.node} of {explained.layer}; RoI ({box}), "
             f"{explained.box_source}")  # fmt: skip
    written = plot_detector_explanation(explained, args.out, title=title)
    print(f"RoI ({box}): {explained.box_source}")
    for backbone, roi in explained.rows:
        name = backbone.label.splitlines()[0]
        print(f"{name:36s} {explained.layer} node {explained.node}: {len(backbone.sampling.points)} "
              f"sampling points, saliency {backbone.saliency.size} px; per-RoI node: "
              f"{roi.caption}, saliency {roi.saliency.size} px (error "
              f"{roi.saliency.error:.3f})")  # fmt: skip
    return written


def _explain(argv: list[str]) -> int:
    for path in run(_parser().parse_args(argv)):
        print(path)
    return 0


def main(argv=None) -> int:
    return run_command("deformable explain", _explain, argv)


if __name__ == "__main__":
    raise SystemExit(main())
