"""Instance masks in COCO's two formats, with pycocotools' mask utilities: polygons and run-length
encodings (RLE, compressed ``counts`` strings or uncompressed lists).

Convention: a mask is ``Tensor[H, W]`` (uint8, 1 inside); pixel ``(i, j)`` covers the square
``[j, j + 1] x [i, i + 1]`` of image coordinates, so a polygon through pixel corners (as
:func:`mask_to_polygons` writes) covers exactly the pixels inside it. A list of polygons is their
union (as pycocotools merges them); an RLE runs down the columns (Fortran order), starting with
a run of zeros, ``size`` is ``[height, width]``.

:func:`segmentation_problem` checks a ``segmentation`` without decoding it (pycocotools would
read a wrong one out of bounds or fail with a message that names nothing), so that a loader can
name the file and the annotation.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

__all__ = ["decode_segmentation", "mask_to_polygons", "mask_to_rle", "segmentation_problem"]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rle_string_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed RLE string (pycocotools' ``rleFrString``), None if it is
    not one: each run is 5-bit groups as characters 48..111, the 6th bit saying "more follows";
    runs after the second are stored as differences to the run two before."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                return None
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            position += 1
            shift += 1
            if not more and code & 0x10:
                value -= 1 << (5 * shift)  # sign extension
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def segmentation_problem(segmentation, height: int | None = None, width: int | None = None) -> str | None:
    """What is wrong with a COCO ``segmentation`` of an image of ``height`` x ``width`` (None
    when it is well formed; a size that is None is not checked).

    Well formed: a non-empty list of polygons, each a list of an even number (at least 6) of
    finite numbers ``[x1, y1, x2, y2, ...]``; or an RLE ``{"size": [height, width], "counts":
    ...}`` whose counts (a compressed string or a list of non-negative ints) cover the
    ``height * width`` pixels exactly.

    Example:
        >>> segmentation_problem([[0, 0, 4, 0, 4]])
        'polygon 0 has 5 coordinates: x, y pairs expected (an even number, at least 6)'
        >>> segmentation_problem({"size": [4, 4], "counts": [3, 2, 11]}) is None
        True
    """
    if isinstance(segmentation, list):
        if not segmentation:
            return "an empty list of polygons"
        for index, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or not all(_number(v) for v in polygon):
                return f"polygon {index} is not a list of finite numbers"
            if len(polygon) % 2 or len(polygon) < 6:
                return (f"polygon {index} has {len(polygon)} coordinates: x, y pairs expected "
                        "(an even number, at least 6)")  # fmt: skip
        return None
    if not isinstance(segmentation, dict):
        return f"a list of polygons or an RLE dict expected, got {type(segmentation).__name__}"
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):  # fmt: skip
        return f"RLE size must be [height, width] (positive ints), got {size!r}"
    if height is not None and width is not None and size != [height, width]:
        return f"RLE size {size} is not the image's [height, width] {[height, width]}"
    if isinstance(counts, str):
        runs = _rle_string_counts(counts)
        if runs is None or any(r < 0 for r in runs):
            return "RLE counts is not a valid compressed RLE string"
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        runs = counts
        if any(r < 0 for r in runs):
            return "RLE counts has negative runs"
    else:
        return "RLE counts must be a compressed string or a list of ints"
    if sum(runs) != size[0] * size[1]:
        return f"RLE counts cover {sum(runs)} pixels, its size {size} has {size[0] * size[1]}"
    return None


def decode_segmentation(segmentation, height: int, width: int) -> torch.Tensor:
    """The binary mask ``Tensor[height, width]`` (uint8) of a well-formed ``segmentation`` (see
    :func:`segmentation_problem`; an RLE's size must be ``[height, width]``).

    Example:
        >>> decode_segmentation([[1, 1, 3, 1, 3, 2, 1, 2]], 3, 4).tolist()
        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    with warnings.catch_warnings():  # pycocotools' decode warns under numpy 2 (its own array type)
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        pixels = coco_mask.decode(rle)
    return torch.from_numpy(np.ascontiguousarray(pixels))


def mask_to_rle(mask: torch.Tensor) -> dict:
    """``{"size": [H, W], "counts": str}``: the compressed RLE of a binary mask ``Tensor[H, W]``
    (JSON-ready, as COCO's files and result lists hold it)."""
    from pycocotools import mask as coco_mask

    pixels = np.asfortranarray(mask.to(torch.uint8).numpy())
    rle = coco_mask.encode(pixels)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_to_polygons(mask: torch.Tensor) -> list[list[float]]:
    """Polygons whose union is exactly the binary mask ``Tensor[H, W]``: one rectangle through
    pixel corners per block of rows that share the same run of pixels (holes are kept, which one
    outline per object could not do). Empty for an empty mask.

    Example:
        >>> mask_to_polygons(torch.tensor([[0, 1, 1], [0, 1, 1]]))
        [[1, 0, 3, 0, 3, 2, 1, 2]]
    """
    runs_of_row = []
    for row in mask.to(torch.bool).tolist():
        runs, start = [], None
        for x, inside in enumerate(row + [False]):
            if inside and start is None:
                start = x
            elif not inside and start is not None:
                runs.append((start, x))
                start = None
        runs_of_row.append(runs)
    polygons, open_runs = [], {}  # (x1, x2) -> first row of the block
    for y, runs in enumerate(runs_of_row + [[]]):
        for run in [r for r in open_runs if r not in runs]:
            x1, x2 = run
            top = open_runs.pop(run)
            polygons.append([x1, top, x2, top, x2, y, x1, y])
        for run in runs:
            open_runs.setdefault(run, y)
    return polygons
