"""Speed of deformable RoI pooling against torchvision's RoIAlign, measured in one run.

    deformable bench-roi [--repeats 7] [--quick] [--json PATH]
    python -m deformable.benchmarks.roi ...    (the same)

Detector-sized work: 512 RoIs on the stride-16 map of an 800 x 1344 image (50 x 84), 7 x 7 bins,
``sampling_ratio=2``, ``spatial_scale=1/16``; boxes of 16 to 400 pixels, uniformly placed.

- ``roi``: 256 channels; ``deform_roi_pool`` with offsets (v1) and with offsets and masks (v2)
  against ``torchvision.ops.roi_align``.
- ``ps``: the position-sensitive score maps of R-FCN's classifier for PASCAL VOC, 21 classes x
  7 x 7 = 1029 channels; ``deform_ps_roi_pool`` with class-aware offsets ``[K, 2 * 21, 7, 7]``
  (deformable R-FCN) against ``torchvision.ops.ps_roi_align``.
- ``fpn``: an FPN pyramid P2-P5 (200 x 336 ... 25 x 42, 256 channels), each RoI pooled from the
  level chosen by its size (torchvision's ``LevelMapper``, canonical 224 / level 4), as
  ``MultiScaleRoIAlign`` does; ``deform_roi_pool`` with offsets against ``roi_align``, level by
  level.

Every time is the median of ``--repeats`` runs after a warm-up (one implementation after the
other, on the CPU the smallest of three rounds' medians, see
:func:`deformable.benchmarks.timing.median_ms`); "fwd+bwd" is forward and backward with
gradients for the input (and the offsets / masks); ratios are against torchvision's twin timed in the same run. Targets (issue 3):
fwd+bwd with offsets <= 1.5x.
"""

from __future__ import annotations

import sys

import torch

from deformable.benchmarks.timing import cuda_peak_extra_mib, median_ms, unsupported
from deformable.ops.deform_roi_pool import deform_ps_roi_pool, deform_roi_pool

FULL = dict(boxes=512, channels=256, classes=21, bins=7, height=50, width=84, stride=16)
QUICK = dict(boxes=12, channels=8, classes=3, bins=3, height=10, width=14, stride=16)
FPN_STRIDES = (4, 8, 16, 32)
SAMPLING_RATIO = 2


def random_boxes(count: int, image_h: int, image_w: int, generator) -> torch.Tensor:
    """``[count, 5]`` boxes (batch index 0) of 16 to 400 pixels, inside the image."""
    size = 16 + torch.rand(count, 2, generator=generator) * 384
    size = torch.minimum(size, torch.tensor([image_w - 1.0, image_h - 1.0]))
    corner = torch.rand(count, 2, generator=generator) * (torch.tensor([image_w, image_h]) - size)
    return torch.cat([torch.zeros(count, 1), corner, corner + size], 1)


def _time_pair(name, ours, theirs, leaves, repeats, device):
    """Forward and forward+backward of both; ``leaves`` makes fresh differentiable inputs. On
    CUDA also the peak memory of each forward+backward beyond its inputs and gradients."""
    row: dict = {"case": name}

    def fwd_bwd(fn):
        def run():
            tensors = leaves()
            out = fn(*tensors)
            out.backward(torch.ones_like(out))
            return tensors
        return run

    try:
        fwd_bwd(theirs)()
    except (RuntimeError, NotImplementedError) as error:  # a dtype torchvision's kernel lacks
        row["torchvision_unsupported"] = unsupported(error)
        theirs = None
    impls = {"torchvision": theirs, "ours": ours} if theirs is not None else {"ours": ours}
    with torch.no_grad():
        fwd = median_ms({k: (lambda fn=fn: fn(*leaves(False))) for k, fn in impls.items()}, repeats, device)
    both = median_ms({k: fwd_bwd(fn) for k, fn in impls.items()}, repeats, device)
    for key in impls:
        row[f"{key}_fwd_ms"] = fwd[key]
        row[f"{key}_fwdbwd_ms"] = both[key]
        if device.type == "cuda":
            accounted = sum(2 * t.numel() * t.element_size() for t in leaves(False))
            row[f"{key}_extra_mib"] = cuda_peak_extra_mib(fwd_bwd(impls[key]), accounted, device)
    if theirs is not None:
        row["fwd_x"] = row["ours_fwd_ms"] / row["torchvision_fwd_ms"]
        row["fwdbwd_x"] = row["ours_fwdbwd_ms"] / row["torchvision_fwdbwd_ms"]
    return row


def _on(device, dtype, *tensors):
    return [t.to(device, dtype) for t in tensors]


def bench_roi(cfg, repeats, modulated, device=torch.device("cpu"), dtype=torch.float32):
    import torchvision

    g = torch.Generator().manual_seed(0)
    k, c, b, scale = cfg["boxes"], cfg["channels"], cfg["bins"], 1.0 / cfg["stride"]
    x = torch.randn(1, c, cfg["height"], cfg["width"], generator=g)
    boxes = random_boxes(k, cfg["height"] * cfg["stride"], cfg["width"] * cfg["stride"], g)
    offset = torch.randn(k, 2, b, b, generator=g)
    mask = torch.rand(k, 1, b, b, generator=g)
    x, boxes, offset, mask = _on(device, dtype, x, boxes, offset, mask)

    def leaves(grad=True):
        return [t.clone().requires_grad_(grad) for t in (x, offset, mask)]

    def ours(x, offset, mask):
        return deform_roi_pool(x, boxes, b, scale, SAMPLING_RATIO, offset=offset,
                               mask=mask if modulated else None)  # fmt: skip

    def theirs(x, offset, mask):
        return torchvision.ops.roi_align(x, boxes, b, scale, SAMPLING_RATIO)

    name = "roi, offsets + masks (v2)" if modulated else "roi, offsets (v1)"
    return _time_pair(name, ours, theirs, leaves, repeats, device)


def bench_ps(cfg, repeats, device=torch.device("cpu"), dtype=torch.float32):
    import torchvision

    g = torch.Generator().manual_seed(1)
    k, classes, b, scale = cfg["boxes"], cfg["classes"], cfg["bins"], 1.0 / cfg["stride"]
    x = torch.randn(1, classes * b * b, cfg["height"], cfg["width"], generator=g)
    boxes = random_boxes(k, cfg["height"] * cfg["stride"], cfg["width"] * cfg["stride"], g)
    offset = torch.randn(k, 2 * classes, b, b, generator=g)
    x, boxes, offset = _on(device, dtype, x, boxes, offset)

    def leaves(grad=True):
        return [t.clone().requires_grad_(grad) for t in (x, offset)]

    def ours(x, offset):
        return deform_ps_roi_pool(x, boxes, b, scale, SAMPLING_RATIO, offset=offset)

    def theirs(x, offset):
        return torchvision.ops.ps_roi_align(x, boxes, b, scale, SAMPLING_RATIO)

    return _time_pair("ps, class-aware offsets", ours, theirs, leaves, repeats, device)


def bench_fpn(cfg, repeats, device=torch.device("cpu"), dtype=torch.float32):
    import torchvision
    from torchvision.ops.poolers import LevelMapper

    g = torch.Generator().manual_seed(2)
    k, c, b = cfg["boxes"], cfg["channels"], cfg["bins"]
    image_h, image_w = cfg["height"] * cfg["stride"], cfg["width"] * cfg["stride"]
    features = [torch.randn(1, c, image_h // s, image_w // s, generator=g) for s in FPN_STRIDES]
    boxes = random_boxes(k, image_h, image_w, g)
    levels = LevelMapper(2, 5)([boxes[:, 1:]])
    groups = [torch.where(levels == i)[0].to(device) for i in range(len(FPN_STRIDES))]
    offset = torch.randn(k, 2, b, b, generator=g)
    *features, boxes, offset = _on(device, dtype, *features, boxes, offset)

    def leaves(grad=True):
        return [t.clone().requires_grad_(grad) for t in (*features, offset)]

    def multilevel(pool):
        def run(*tensors):
            *maps, off = tensors
            out = maps[0].new_zeros(k, c, b, b)
            for level, (index, stride) in enumerate(zip(groups, FPN_STRIDES)):
                out = out.index_copy(0, index, pool(maps[level], boxes[index], 1.0 / stride,
                                                    off[index]))  # fmt: skip
            return out
        return run

    ours = multilevel(lambda m, bx, s, off: deform_roi_pool(m, bx, b, s, SAMPLING_RATIO,
                                                            offset=off))  # fmt: skip
    theirs = multilevel(lambda m, bx, s, off: torchvision.ops.roi_align(m, bx, b, s,
                                                                        SAMPLING_RATIO))  # fmt: skip
    return _time_pair("fpn P2-P5, offsets (v1)", ours, theirs, leaves, repeats, device)


def _cell(row, key, suffix="") -> str:
    value = row.get(key)
    return "—" if value is None else f"{value:.2f}{suffix}"


def markdown(rows) -> str:
    gpu = any("ours_extra_mib" in r for r in rows)
    typed = any("dtype" in r for r in rows)
    header = "| case | " + ("dtype | " if typed else "") + ("torchvision fwd ms | ours fwd ms | fwd ratio | "
                                                              "torchvision fwd+bwd ms | ours fwd+bwd ms | fwd+bwd ratio |")
    if gpu:
        header += " torchvision MiB | ours MiB |"
    lines = [header, "|---" * header.count(" |") + "|"]
    for r in rows:
        cells = [_cell(r, "torchvision_fwd_ms"), _cell(r, "ours_fwd_ms"), _cell(r, "fwd_x", "x"),
                 _cell(r, "torchvision_fwdbwd_ms"), _cell(r, "ours_fwdbwd_ms"), _cell(r, "fwdbwd_x", "x")]
        if gpu:
            cells += [_cell(r, "torchvision_extra_mib"), _cell(r, "ours_extra_mib")]
        lines.append(f"| {r['case']} | " + (f"{r['dtype']} | " if typed else "") + " | ".join(cells) + " |")
    unsupported = sorted({f"{r['case']} ({r.get('dtype', 'float32')}): {r['torchvision_unsupported']}"
                          for r in rows if "torchvision_unsupported" in r})  # fmt: skip
    if unsupported:
        lines += ["", "torchvision not timed: " + "; ".join(unsupported)]
    return "\n".join(lines)


def run(cfg: dict, repeats: int, device: torch.device | str = "cpu", dtypes=(torch.float32,)) -> list[dict]:
    """The four cases (v1, v2, position-sensitive, FPN) at the sizes of ``cfg`` (FULL or QUICK),
    on ``device`` in each of ``dtypes``."""
    device = torch.device(device)
    rows = []
    for dtype in dtypes:
        for case in (lambda: bench_roi(cfg, repeats, False, device, dtype),
                     lambda: bench_roi(cfg, repeats, True, device, dtype),
                     lambda: bench_ps(cfg, repeats, device, dtype), lambda: bench_fpn(cfg, repeats, device, dtype)):
            row = case()
            if len(dtypes) > 1:
                row["dtype"] = str(dtype).removeprefix("torch.")
            rows.append(row)
            print(f"  {row['case']}: fwd {_cell(row, 'fwd_x', 'x')}, fwd+bwd {_cell(row, 'fwdbwd_x', 'x')}",
                  file=sys.stderr)  # fmt: skip
    return rows


if __name__ == "__main__":
    from deformable.commands.bench_roi import main

    raise SystemExit(main())
