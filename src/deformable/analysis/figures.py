"""Figures of a node's spatial support: sampling locations, effective receptive field and
error-bounded saliency region over the image, side by side for several models (DCNv2 Fig. 1).

matplotlib is imported inside the plotting functions (with the Agg backend), so importing this
module costs nothing and needs no display.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deformable.analysis.receptive_field import ReceptiveField, effective_receptive_field
from deformable.analysis.saliency import SaliencyRegion, saliency_region
from deformable.analysis.sampling import SamplingLocations, node_location, sampling_locations

__all__ = ["NodeViews", "node_views", "plot_views", "plot_rows", "plot_detector_explanation", "VIEWS"]

#: view key -> column title
VIEWS = {"sampling": "sampling locations", "receptive_field": "effective receptive field",
         "saliency": "error-bounded saliency region"}  # fmt: skip


@dataclass
class NodeViews:
    """The three views of one node of one model on one image."""

    label: str
    layer: str
    #: (y, x) image coordinates of the node (centre of its regular receptive field)
    location: tuple[float, float]
    sampling: SamplingLocations
    receptive_field: ReceptiveField
    saliency: SaliencyRegion
    error_bound: float
    #: what the node is, for column titles ("conv5 node (1, 2)", "per-RoI node")
    name: str = ""
    #: the RoI of a per-RoI node, (x1, y1, x2, y2), outlined in every view
    box: tuple[float, float, float, float] | None = None
    #: Tensor[B, 2]: the RoI pooling's bin samples (y, x), drawn over the sampling locations
    bins: Tensor | None = None
    #: Tensor[B]: their weights
    bin_weights: Tensor | None = None
    #: the sampling view's caption, if not the default
    caption: str | None = None


def node_views(model: nn.Module, image: Tensor, layer: str | None = None,
               node: tuple[int, int] | None = None, *, label: str = "", depth: int | None = None,
               error_bound: float = 0.1, grow: str = "square",
               chain: list[str] | None = None) -> NodeViews:  # fmt: skip
    """Compute the three views of a node (arguments as :func:`~deformable.analysis.sampling_locations`,
    :func:`~deformable.analysis.effective_receptive_field` and
    :func:`~deformable.analysis.saliency_region`; ``node`` defaults to the most active one)."""
    from deformable.analysis.chain import default_layer, layer_chain

    layer = layer if layer is not None else default_layer(layer_chain(model, chain))
    sampling = sampling_locations(model, image, layer, node, depth=depth, chain=chain)
    node = sampling.node
    location, _ = node_location(model, image, layer, node, chain=chain)
    erf = effective_receptive_field(model, image, layer, node, chain=chain)
    region = saliency_region(model, image, layer, node, error_bound=error_bound, grow=grow,
                             chain=chain)  # fmt: skip
    return NodeViews(label, layer, location, sampling, erf, region, error_bound)


def _display(image: Tensor):
    """[C, H, W] or [1, C, H, W] → an array imshow draws (grey for 1 channel, RGB for 3)."""
    image = image.detach().float().cpu()
    if image.dim() == 4:
        image = image[0]
    if image.shape[0] == 3:
        low, high = image.min(), image.max()
        return ((image - low) / (high - low).clamp_min(1e-12)).permute(1, 2, 0).numpy(), None
    return image.mean(0).numpy(), "gray"


def _merge(points: Tensor, weights: Tensor):
    """Unique points (to 1e-3 pixel) with their summed weights: multiplicities become sizes."""
    keys = torch.round(points.double() * 1000)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    total = torch.zeros(unique.shape[0], dtype=torch.float64).index_add_(0, inverse,
                                                                        weights.double())  # fmt: skip
    return unique / 1000, total


def _frame(ax, shape) -> None:
    ax.set_xlim(-0.5, shape[-1] - 0.5)
    ax.set_ylim(shape[-2] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_sampling(ax, image: Tensor, views: NodeViews) -> None:
    """Points as red dots (area ∝ summed weight of the paths reaching them) over the image; a
    per-RoI node's bins (their samples' weighted mean) as cyan crosses, its box in yellow."""
    pixels, cmap = _display(image)
    ax.imshow(pixels, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
    # the node's mark first: the points it reads (often one under it) stay visible
    ax.scatter([views.location[1]], [views.location[0]], s=70, marker="x", c="lime", linewidths=2)
    points, weights = _merge(views.sampling.points, views.sampling.weights)
    keep = weights > 0
    points, weights = points[keep], weights[keep]
    if len(weights):
        # dense clouds (a RoI's thousands of points) get smaller dots, so they stay apart
        largest = 30 * min(1.0, (1500 / len(weights)) ** 0.5)
        size = 1 + max(largest, 4) * (weights / weights.max()).numpy()
        ax.scatter(points[:, 1].numpy(), points[:, 0].numpy(), s=size, c="tab:red", alpha=0.6,
                   edgecolors="none")  # fmt: skip
    if views.bins is not None and len(views.bins):
        bins, bin_weights = _merge(views.bins, views.bin_weights if views.bin_weights is not None
                                   else torch.ones(len(views.bins)))  # fmt: skip
        size = 4 + 20 * (bin_weights / bin_weights.max().clamp_min(1e-12)).numpy()
        ax.scatter(bins[:, 1].numpy(), bins[:, 0].numpy(), s=size, c="cyan", marker="+",
                   linewidths=0.8)  # fmt: skip
    _draw_box(ax, views)
    _frame(ax, image.shape)


def _draw_box(ax, views: NodeViews) -> None:
    if views.box is not None:
        from matplotlib.patches import Rectangle

        x1, y1, x2, y2 = views.box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow",
                               linewidth=1.5))  # fmt: skip


def draw_receptive_field(ax, image: Tensor, views: NodeViews) -> None:
    """The normalised gradient magnitude as a heat map over the (dimmed) image."""
    import matplotlib
    import numpy as np

    pixels, cmap = _display(image)
    ax.imshow(pixels * 0.6, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
    heat = views.receptive_field.map.detach().float().cpu().numpy()
    rgba = matplotlib.colormaps["inferno"](heat)
    rgba[..., 3] = np.clip(heat, 0, 1) ** 0.5
    ax.imshow(rgba)
    _draw_box(ax, views)
    ax.scatter([views.location[1]], [views.location[0]], s=70, marker="x", c="lime", linewidths=2)
    _frame(ax, image.shape)


def draw_saliency(ax, image: Tensor, views: NodeViews) -> None:
    """The image with everything outside the region washed out, and the region's outline."""
    import numpy as np

    pixels, cmap = _display(image)
    mask = views.saliency.mask.cpu().numpy()
    kept = mask if pixels.ndim == 2 else mask[..., None]
    # masked-out pixels are washed out to grey, the region keeps the image as it is
    shown = np.where(kept, pixels, 0.35 + 0.3 * pixels)
    ax.imshow(shown, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
    if 0 < mask.sum() < mask.size:
        height, width = mask.shape
        padded = np.pad(mask.astype(float), 1)  # closes the outline along the image border
        ax.contour(np.arange(-1, width + 1), np.arange(-1, height + 1), padded, levels=[0.5],
                   colors="cyan", linewidths=1.5)  # fmt: skip
    _draw_box(ax, views)
    ax.scatter([views.location[1]], [views.location[0]], s=70, marker="x", c="lime", linewidths=2)
    _frame(ax, image.shape)


_DRAW = {"sampling": draw_sampling, "receptive_field": draw_receptive_field,
         "saliency": draw_saliency}  # fmt: skip


def _caption(key: str, views: NodeViews) -> str:
    if key == "sampling" and views.caption:
        return views.caption
    if key == "sampling":
        return f"{len(views.sampling.points):,} points, node {views.sampling.node}"
    if key == "saliency":
        region = views.saliency
        return f"{region.size} px, error {region.error:.3f} ≤ {views.error_bound:g}"
    return f"layer {views.layer}"


def plot_views(image: Tensor, rows: list[NodeViews], path: str, *,
               views: tuple[str, ...] = tuple(VIEWS), title: str | None = None,
               transpose: bool = False) -> None:  # fmt: skip
    """Draw the views of several models on one image and save the figure to ``path`` (PNG).

    Args:
        image (Tensor[C, H, W]): the image the views were computed on.
        rows (List[NodeViews]): one per model (from :func:`node_views`).
        path (str): output file.
        views (Tuple[str, ...]): which views, from ``VIEWS``. Default: all three.
        title (str, optional): the figure's title.
        transpose (bool): models as columns and views as rows (use it for one view).

    Convention:
        The image is drawn with pixel ``(i, j)`` centred at ``(y, x) = (i, j)``; the green
        cross marks the node's location (:func:`~deformable.analysis.node_location`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ValueError(f"plot_views: views must be a non-empty subset of {tuple(VIEWS)}, got "
                         f"{views!r}")  # fmt: skip
    if not rows:
        raise ValueError("plot_views: rows must hold at least one NodeViews")
    n_rows, n_cols = (len(views), len(rows)) if transpose else (len(rows), len(views))
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(2.9 * n_cols, 3.0 * n_rows + (0.7 if title else 0)))  # fmt: skip
    for r, model_views in enumerate(rows):
        for c, key in enumerate(views):
            ax = axes[c, r] if transpose else axes[r, c]
            _DRAW[key](ax, image, model_views)
            ax.set_xlabel(_caption(key, model_views), fontsize=8)
            top = c == 0 if transpose else r == 0
            left = r == 0 if transpose else c == 0
            if top:
                ax.set_title(model_views.label if transpose else VIEWS[key], fontsize=9)
            if left:
                ax.set_ylabel(VIEWS[key] if transpose else model_views.label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rows(image: Tensor, rows: list[list[NodeViews]], path: str, *,
              views: tuple[str, ...] = tuple(VIEWS), title: str | None = None) -> None:  # fmt: skip
    """Several nodes per model: one row per model, for each node the ``views`` side by side
    (columns titled ``"<node name>: <view>"`` from the first row), saved to ``path`` (PNG).
    Conventions as :func:`plot_views`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ValueError(f"plot_rows: views must be a non-empty subset of {tuple(VIEWS)}, got "
                         f"{views!r}")  # fmt: skip
    if not rows or not rows[0] or len({len(row) for row in rows}) != 1:
        raise ValueError("plot_rows: rows must be non-empty lists of NodeViews, as many per row")
    n_rows, n_cols = len(rows), len(rows[0]) * len(views)
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(2.9 * n_cols, 3.3 * n_rows + (0.6 if title else 0)))  # fmt: skip
    for r, row in enumerate(rows):
        for n, node in enumerate(row):
            for v, key in enumerate(views):
                ax = axes[r, n * len(views) + v]
                _DRAW[key](ax, image, node)
                ax.set_xlabel(_caption(key, node), fontsize=8)
                if r == 0:
                    prefix = f"{node.name}\n" if node.name else ""
                    ax.set_title(prefix + VIEWS[key], fontsize=9)
                if n == 0 and v == 0:
                    ax.set_ylabel(node.label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: file names of the per-view figures of a detector: (node index, view) -> name
DETECTOR_FIGURES = {(0, "sampling"): "backbone_sampling_locations.png",
                    (0, "receptive_field"): "backbone_receptive_field.png",
                    (0, "saliency"): "backbone_saliency.png",
                    (1, "sampling"): "roi_sampling_locations.png",
                    (1, "receptive_field"): "roi_receptive_field.png",
                    (1, "saliency"): "roi_saliency.png"}  # fmt: skip


def plot_detector_explanation(explanation, out: str, *, title: str = "") -> list[str]:
    """Write the figures of a :class:`~deformable.analysis.detection_views.DetectorExplanation`
    to the folder ``out``: ``explain.png`` (one row per detector: the backbone node's three
    views, then the per-RoI node's) and one PNG per node and view (``DETECTOR_FIGURES``, the
    detectors side by side). Returns the paths written."""
    image, rows = explanation.image, explanation.rows
    written = [os.path.join(out, "explain.png")]
    plot_rows(image, rows, written[0], title=title or None)
    for (index, key), name in DETECTOR_FIGURES.items():
        written.append(os.path.join(out, name))
        node = rows[0][index].name
        plot_views(image, [row[index] for row in rows], written[-1], views=(key,), transpose=True,
                   title=f"{node}: {VIEWS[key]}" + (f" — {title}" if title else ""))  # fmt: skip
    return written
