"""The GPU suite of deform_conv2d and of DCN training steps, measured in one run.

    deformable bench --device cuda [--repeats 20] [--json PATH]
    python -m deformable.benchmarks.gpu ...    (the same)

For each shape (N, Cin, Cout, H, W; 3x3, padding 1, offsets of a few pixels) and each dtype
(float32, bfloat16) it times, with CUDA events, the forward and forward+backward of cuDNN's
``F.conv2d`` (the anchor), of ``torchvision.ops.deform_conv2d`` (its CUDA kernel), of ours with
the Triton kernels, and of ours with the pure-PyTorch reference; and the peak memory each
deformable implementation needs beyond its inputs, outputs and gradients
(``torch.cuda.max_memory_allocated``). Shapes: DESIGN.md's five, the detection-scale maps of a
ResNet-50 on a batch of two 800x1333 images (the 3x3 convs of conv3, conv4, conv5) and a
batch-16 case. Then one training step (forward, backward, AdamW) of a DCNv2 ResNet-50
(conv3-5) and of the DCN Faster R-CNN (DCNv2 conv3-5, modulated deformable RoI pooling)
against their regular twins.

An implementation that does not support a dtype (torchvision's kernel has no bfloat16) is
reported as such, not timed. The suite runs on any device (``quick`` sizes on the CPU are what
the tests run); its figures mean something on a GPU only.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from deformable.benchmarks import conv
from deformable.benchmarks.timing import cuda_peak_extra_mib, median_ms, unsupported
from deformable.ops import deform_conv2d, use_kernels

__all__ = ["CONV_SHAPES", "QUICK", "markdown", "run"]

#: name -> list of (N, Cin, Cout, H, W)
CONV_SHAPES = {
    "DESIGN.md": conv.SHAPES,
    # a batch of two 800x1333 images: conv3 (stride 8), conv4 (16), conv5 (32) of a ResNet-50
    "detection": [(2, 128, 128, 100, 167), (2, 256, 256, 50, 84), (2, 512, 512, 25, 42)],
    "batch 16": [(16, 256, 256, 14, 14)],
}
QUICK = {"shapes": {"quick": [(1, 8, 8, 12, 12)]}, "classifier": (2, 32), "detector": (1, 64),
         "classifier_depth": 18}  # fmt: skip
FULL = {"shapes": CONV_SHAPES, "classifier": (32, 224), "detector": (2, 800), "classifier_depth": 50}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = ("conv2d", "torchvision", "ours", "reference")


def _impls():
    import torchvision

    def ours(x, off, w):
        return deform_conv2d(x, off, w, padding=1)

    def reference(x, off, w):
        with use_kernels("reference"):
            return deform_conv2d(x, off, w, padding=1)

    return {"conv2d": lambda x, off, w: F.conv2d(x, w, padding=1),
            "torchvision": lambda x, off, w: torchvision.ops.deform_conv2d(x, off, w, padding=1),
            "ours": ours, "reference": reference}  # fmt: skip


def conv_row(shape, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    """Times (ms), ratios against F.conv2d and peak extra memory (MiB, CUDA only) of one shape."""
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g).to(device, dtype)
    weight = (torch.randn(cout, cin, 3, 3, generator=g) / math.sqrt(cin * 9)).to(device, dtype)
    offset = (torch.randn(n, 18, h, w, generator=g) * 2.0).to(device, dtype)
    grad = torch.randn(n, cout, h, w, generator=g).to(device, dtype)
    row: dict = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
    impls = _impls()

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(x, offset, weight)
        return run

    def forward_backward(fn):
        def run():
            leaves = [t.clone().requires_grad_() for t in (x, offset, weight)]
            fn(*leaves).backward(grad)
            return leaves
        return run

    usable = {}
    for name, fn in impls.items():
        try:
            forward_backward(fn)()
            usable[name] = fn
        except (RuntimeError, NotImplementedError) as error:  # a dtype the kernel does not have
            row[f"{name}_unsupported"] = unsupported(error)
    for name, ms in median_ms({k: forward(f) for k, f in usable.items()}, repeats, device).items():
        row[f"{name}_fwd_ms"] = ms
    for name, ms in median_ms({k: forward_backward(f) for k, f in usable.items()}, repeats, device).items():
        row[f"{name}_fwdbwd_ms"] = ms
    if device.type == "cuda":
        accounted = x.element_size() * (grad.numel() + x.numel() + offset.numel() + weight.numel())
        for name in ("torchvision", "ours", "reference"):
            if name in usable:
                row[f"{name}_extra_mib"] = cuda_peak_extra_mib(forward_backward(usable[name]), accounted, device)
    for pass_ in ("fwd", "fwdbwd"):
        anchor = row.get(f"conv2d_{pass_}_ms")
        for name in ("torchvision", "ours", "reference"):
            if anchor and f"{name}_{pass_}_ms" in row:
                row[f"{name}_{pass_}_x"] = row[f"{name}_{pass_}_ms"] / anchor
    return row


def _step_ms(build, loss, device, repeats: int) -> float:
    """Median time of one training step (forward, backward, AdamW) of ``build()``;
    ``loss(model)`` is the step's loss."""
    torch.manual_seed(0)
    model = build().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = loss(model)
        optimizer.zero_grad(set_to_none=True)
        out.backward()
        optimizer.step()

    return median_ms({"step": step}, repeats, device)["step"]


def training_rows(config: dict, device: torch.device, repeats: int) -> list[dict]:
    """One training step of a DCNv2 ResNet (conv3-5) and of the DCN Faster R-CNN, each against
    its regular twin, in float32."""
    from deformable import models
    from deformable.models import detection

    rows = []
    batch, size = config["classifier"]
    depth = config["classifier_depth"]
    builder = getattr(models, f"resnet{depth}")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def classify(model):
        return F.cross_entropy(model(images), labels)

    regular = _step_ms(lambda: builder(deform_stages=()), classify, device, repeats)
    dcn = _step_ms(lambda: builder(deform_stages=(3, 4, 5), modulated=True), classify, device, repeats)
    rows.append({"case": f"ResNet-{depth} training step, batch {batch}, {size}x{size}",
                 "regular_ms": regular, "dcn_ms": dcn, "dcn_x": dcn / regular})  # fmt: skip

    count, side = config["detector"]
    scenes = [torch.rand(3, side, int(side * 1.666), generator=g).to(device) for _ in range(count)]
    boxes = [{"boxes": torch.tensor([[10.0, 20.0, side / 2, side / 1.5], [side / 3, side / 4, side - 5, side - 9]],
                                    device=device), "labels": torch.tensor([1, 2], device=device)}
             for _ in range(count)]  # fmt: skip

    def detect(model):
        return sum(model(scenes, boxes).values())

    name = "fasterrcnn_resnet50_fpn" if depth == 50 else "fasterrcnn_resnet18_fpn"
    common = dict(num_classes=3, min_size=side, max_size=int(side * 1.67))
    regular = _step_ms(lambda: getattr(detection, name)(deform_stages=(), roi_pool="align", **common),
                       detect, device, repeats)  # fmt: skip
    dcn = _step_ms(lambda: getattr(detection, name)(deform_stages=(3, 4, 5), modulated=True,
                                                    roi_pool="mdeform", **common),
                   detect, device, repeats)  # fmt: skip
    rows.append({"case": f"{name} training step, batch {count}, {side}x{int(side * 1.666)}",
                 "regular_ms": regular, "dcn_ms": dcn, "dcn_x": dcn / regular})  # fmt: skip
    return rows


def run(device: torch.device, repeats: int, quick: bool = False, training: bool = True) -> dict:
    """Every conv shape in every dtype, then the training steps; a dict of row lists."""
    config = QUICK if quick else FULL
    dtypes = {"float32": torch.float32} if device.type == "cpu" else DTYPES
    conv_rows = []
    for group, shapes in config["shapes"].items():
        for shape in shapes:
            for dtype in dtypes.values():
                row = conv_row(shape, dtype, device, repeats)
                row["group"] = group
                conv_rows.append(row)
                ours = row.get("ours_fwd_x")
                print(f"  {group} {shape} {row['dtype']}: ours fwd "
                      f"{'n/a' if ours is None else f'{ours:.2f}x'}", file=sys.stderr)  # fmt: skip
    rows = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "conv": conv_rows}  # fmt: skip
    if training:
        rows["training"] = training_rows(config, device, repeats)
    return rows


def _geometric_mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _cell(value, spec=".2f", suffix="") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown(result: dict) -> str:
    columns = [("conv2d fwd ms", "conv2d_fwd_ms", "", ".2f"), ("ours fwd", "ours_fwd_x", "x", ".2f"),
               ("torchvision fwd", "torchvision_fwd_x", "x", ".2f"), ("reference fwd", "reference_fwd_x", "x", ".2f"),
               ("conv2d fwd+bwd ms", "conv2d_fwdbwd_ms", "", ".2f"), ("ours fwd+bwd", "ours_fwdbwd_x", "x", ".2f"),
               ("torchvision fwd+bwd", "torchvision_fwdbwd_x", "x", ".2f"),
               ("reference fwd+bwd", "reference_fwdbwd_x", "x", ".2f"),
               ("ours MiB", "ours_extra_mib", "", ".1f"), ("torchvision MiB", "torchvision_extra_mib", "", ".1f"),
               ("reference MiB", "reference_extra_mib", "", ".1f")]  # fmt: skip
    lines = [f"{result['name']} ({result['device']}); ratios against F.conv2d in the same run, "
             "MiB: peak memory beyond inputs, outputs and gradients", "",
             "| shapes | N, Cin, Cout, H, W | dtype | " + " | ".join(c[0] for c in columns) + " |",
             "|---" * (len(columns) + 3) + "|"]  # fmt: skip
    for row in result["conv"]:
        cells = [_cell(row.get(key), spec, suffix) for _, key, suffix, spec in columns]
        lines.append(f"| {row['group']} | {', '.join(map(str, row['shape']))} | {row['dtype']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    for dtype in sorted({r["dtype"] for r in result["conv"]}):
        rows = [r for r in result["conv"] if r["dtype"] == dtype]
        means = [_cell(_geometric_mean([r.get(key) for r in rows]), spec, suffix) if suffix == "x" else ""
                 for _, key, suffix, spec in columns]  # fmt: skip
        lines.append(f"| geometric mean | | {dtype} | " + " | ".join(means) + " |")
    unsupported = sorted({f"{name} ({r['dtype']}): {r[f'{name}_unsupported']}" for r in result["conv"]
                          for name in IMPLS if f"{name}_unsupported" in r})  # fmt: skip
    if unsupported:
        lines += ["", "Not timed: " + "; ".join(unsupported)]
    if result.get("training"):
        lines += ["", "| training step | regular ms | DCN ms | DCN / regular |", "|---|---|---|---|"]
        for r in result["training"]:
            lines.append(f"| {r['case']} | {r['regular_ms']:.1f} | {r['dcn_ms']:.1f} | {r['dcn_x']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    from deformable.commands.bench import main

    raise SystemExit(main(["--device", "cuda", *sys.argv[1:]]))
