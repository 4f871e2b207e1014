"""Speed and memory of deform_conv2d against its anchors, measured in one run.

    deformable bench [--repeats 7] [--shapes all|design|regimes|quick] [--json PATH]
    python -m deformable.benchmarks.conv ...    (the same)

For each shape (N, Cin, Cout, H, W; a 3x3 kernel unless said, padding keeping the map's size,
random offsets of a few pixels) it times the forward and forward+backward of ``F.conv2d`` (the
anchor, same kernel, padding and dilation), of ``torchvision.ops.deform_conv2d`` and of ours, plus
the forward of onnxruntime's ``DeformConv`` (opset 19) when onnxruntime is installed; every time
is the median of ``--repeats`` runs after a warm-up (the smallest of three such medians, taken in
turns with the other implementations: :func:`deformable.benchmarks.timing.median_ms`), and every
ratio is against ``F.conv2d`` timed in the same run. It also measures the peak memory each deformable implementation needs beyond its
inputs, outputs and gradients (the rise of the process's peak resident set during one
forward+backward, Linux only).

Shape sets: ``design``, DESIGN.md's five; ``regimes``, where deformable convolutions are hard to
make fast on a CPU: few channels and a large batch (the demo's layers), a 5x5 kernel, offset
groups 4 with dilation 2, and the batch-1 maps of a ResNet-50 at 224x224 (conv3-conv5);
``all``, both (the default); ``quick``, two tiny ones for a smoke run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from deformable.benchmarks.timing import median_ms, peak_extra_mib
from deformable.ops import deform_conv2d

class Shape(NamedTuple):
    """A benchmark case: (N, Cin, Cout, H, W), a square kernel, dilation, offset groups, mask."""

    n: int
    cin: int
    cout: int
    h: int
    w: int
    kernel: int = 3
    dilation: int = 1
    offset_groups: int = 1
    modulated: bool = False

    @property
    def padding(self) -> int:
        """The padding that keeps the map's size (stride 1)."""
        return self.dilation * (self.kernel - 1) // 2

    @property
    def label(self) -> str:
        extras = [f"{self.kernel}x{self.kernel}"] if self.kernel != 3 else []
        extras += [f"offset groups {self.offset_groups}"] if self.offset_groups != 1 else []
        extras += [f"dilation {self.dilation}"] if self.dilation != 1 else []
        extras += ["mask"] if self.modulated else []
        return ", ".join(map(str, self[:5])) + "".join(f", {e}" for e in extras)


#: DESIGN.md's performance model.
DESIGN_SHAPES = [Shape(2, 64, 64, 56, 56), Shape(2, 128, 128, 28, 28), Shape(2, 256, 256, 14, 14),
                 Shape(2, 512, 512, 7, 7), Shape(1, 256, 256, 50, 84)]  # fmt: skip
#: Few channels and a large batch (the demo's layers: DigitNet's deformable layers are the last
#: two), a 5x5 kernel, offset groups 4 with dilation 2, a ResNet-50's conv3-conv5 at batch 1.
REGIME_SHAPES = [Shape(64, 32, 32, 20, 20), Shape(64, 32, 64, 10, 10, modulated=True),
                 Shape(64, 64, 64, 10, 10, modulated=True), Shape(2, 64, 64, 32, 32, kernel=5),
                 Shape(2, 128, 128, 28, 28, dilation=2, offset_groups=4),
                 Shape(1, 128, 128, 28, 28), Shape(1, 256, 256, 14, 14),
                 Shape(1, 512, 512, 7, 7)]  # fmt: skip
SHAPE_SETS = {"all": DESIGN_SHAPES + REGIME_SHAPES, "design": DESIGN_SHAPES,
              "regimes": REGIME_SHAPES,
              "quick": [Shape(1, 8, 8, 12, 12),
                        Shape(2, 16, 8, 9, 7, kernel=5, modulated=True)]}  # fmt: skip
#: Kept for callers of the five-tuple lists.
SHAPES = DESIGN_SHAPES
QUICK_SHAPES = SHAPE_SETS["quick"]


def _onnxruntime_deform_conv(x, weight, offset, padding, dilation=1, mask=None):
    """An onnxruntime session running one DeformConv node, or None without onnx/onnxruntime."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    kernel = list(weight.shape[-2:])
    offset_groups = offset.shape[1] // (2 * kernel[0] * kernel[1])
    inputs = ["X", "W", "offset"] + (["", "mask"] if mask is not None else [])
    node = helper.make_node("DeformConv", inputs, ["Y"], kernel_shape=kernel,
                            pads=[padding] * 4, strides=[1, 1], dilations=[dilation] * 2,
                            group=x.shape[1] // weight.shape[1], offset_group=offset_groups)  # fmt: skip

    def info(name, t):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(t.shape))

    feeds = {"X": x, "W": weight, "offset": offset}
    if mask is not None:
        feeds["mask"] = mask
    graph = helper.make_graph([node], "deform_conv", [info(k, v) for k, v in feeds.items()],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    feeds = {k: v.numpy() for k, v in feeds.items()}
    return lambda: session.run(None, feeds)


class _Case:
    """The tensors and implementations of one shape."""

    def __init__(self, shape, torchvision_too: bool):
        import torchvision

        shape = Shape(*shape)
        n, cin, cout, h, w, k = shape[:6]
        pad, dil = shape.padding, shape.dilation
        taps = shape.offset_groups * k * k
        g = torch.Generator().manual_seed(0)
        self.shape = shape
        self.x = torch.randn(n, cin, h, w, generator=g)
        self.weight = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
        self.offset = torch.randn(n, 2 * taps, h, w, generator=g) * 2.0
        self.mask = torch.rand(n, taps, h, w, generator=g) if shape.modulated else None
        self.grad = torch.randn(n, cout, h, w, generator=g)
        mask = self.mask
        self.impls = {
            "conv2d": lambda x, off, w: F.conv2d(x, w, padding=pad, dilation=dil),
            "ours": lambda x, off, w: deform_conv2d(x, off, w, padding=pad, dilation=dil, mask=mask),
        }
        if torchvision_too:
            self.impls["torchvision"] = lambda x, off, w: torchvision.ops.deform_conv2d(
                x, off, w, padding=pad, dilation=dil, mask=mask)  # fmt: skip

    def forward(self, name):
        with torch.no_grad():
            return self.impls[name](self.x, self.offset, self.weight)

    def forward_backward(self, name):
        leaves = [t.clone().requires_grad_() for t in (self.x, self.offset, self.weight)]
        self.impls[name](*leaves).backward(self.grad)
        return leaves

    def onnxruntime(self):
        return _onnxruntime_deform_conv(self.x, self.weight, self.offset, self.shape.padding,
                                        self.shape.dilation, self.mask)  # fmt: skip


#: Processes onnxruntime is timed in, keeping the smallest time: one process's time moved by
#: up to 30 % from run to run on the batch-1 maps (0.96 / 1.31 ms on 1x512x7x7).
ONNXRUNTIME_PROCESSES = 2


def _onnxruntime_ms(shape, repeats: int, processes: int = ONNXRUNTIME_PROCESSES) -> float | None:
    """onnxruntime's DeformConv forward on the same tensors, timed in separate processes (the
    smallest of their times).

    A live onnxruntime session's threads slow torch's own convolutions down (measured here:
    2.2 ms -> 6.3 ms for one conv), so it never shares a process with the other timings.
    """
    import subprocess

    code = (
        "import sys, json, torch; from deformable.benchmarks import conv, timing; "
        f"case = conv._Case({tuple(shape)!r}, False); "
        "run = case.onnxruntime(); "
        f"print(json.dumps(None if run is None else timing.median_ms({{'ort': run}}, {repeats})['ort']))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    times = []
    for _ in range(processes):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=env, timeout=600)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"the onnxruntime timing failed:\n{result.stderr}")
        times.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return None if None in times else min(times)


def time_shape(shape, repeats: int, torchvision_too: bool = True) -> dict:
    """Forward and forward+backward times of every implementation, and their ratios."""
    case = _Case(shape, torchvision_too)
    row: dict = {"shape": list(shape)}
    forward = {name: (lambda name=name: case.forward(name)) for name in case.impls}
    for name, ms in median_ms(forward, repeats).items():
        row[f"{name}_fwd_ms"] = ms
    both = {name: (lambda name=name: case.forward_backward(name)) for name in case.impls}
    for name, ms in median_ms(both, repeats).items():
        row[f"{name}_fwdbwd_ms"] = ms
    ms = _onnxruntime_ms(shape, repeats)
    if ms is not None:
        row["onnxruntime_fwd_ms"] = ms
    row["label"] = Shape(*shape).label
    for key in [k for k in row if k.endswith("_ms") and not k.startswith("conv2d")]:
        anchor = "conv2d_fwd_ms" if key.endswith("_fwd_ms") else "conv2d_fwdbwd_ms"
        row[key.replace("_ms", "_x")] = row[key] / row[anchor]
    return row


def memory_shape(shape, torchvision_too: bool = True) -> dict:
    """Peak memory beyond inputs, outputs and gradients of one forward+backward (MiB).

    Run after every timing: it switches glibc to returning freed blocks at once, which slows
    the allocations of everything that runs afterwards.
    """
    case = _Case(shape, torchvision_too)
    x, offset, weight, grad = case.x, case.offset, case.weight, case.grad
    accounted = x.element_size() * (grad.numel() + x.numel() + offset.numel() + weight.numel())
    if case.mask is not None:
        accounted += case.mask.numel() * case.mask.element_size()
    names = ("ours", "torchvision") if torchvision_too else ("ours",)
    return {f"{name}_extra_mib": peak_extra_mib(lambda name=name: case.forward_backward(name),
                                                accounted) for name in names}  # fmt: skip


def geometric_mean(values):
    values = [v for v in values if v is not None]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def _ratio(value, spec):
    return "—" if value is None else format(value, spec) + "x"


def markdown(rows) -> str:
    columns = [("conv2d fwd ms", "conv2d_fwd_ms", ".2f"), ("ours fwd", "ours_fwd_x", ".2f"),
               ("torchvision fwd", "torchvision_fwd_x", ".2f"),
               ("onnxruntime fwd", "onnxruntime_fwd_x", ".2f"),
               ("conv2d fwd+bwd ms", "conv2d_fwdbwd_ms", ".2f"),
               ("ours fwd+bwd", "ours_fwdbwd_x", ".2f"),
               ("torchvision fwd+bwd", "torchvision_fwdbwd_x", ".2f"),
               ("ours extra MiB", "ours_extra_mib", ".1f"),
               ("torchvision extra MiB", "torchvision_extra_mib", ".1f")]  # fmt: skip
    lines = ["| N, Cin, Cout, H, W (3x3 unless said) | " + " | ".join(c[0] for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]  # fmt: skip
    for row in rows:
        cells = [_fmt(row.get(key), spec) + ("x" if key.endswith("_x") and row.get(key) else "")
                 for _, key, spec in columns]  # fmt: skip
        lines.append(f"| {Shape(*row['shape']).label} | " + " | ".join(cells) + " |")
    means = [_ratio(geometric_mean([r.get(key) for r in rows]), spec) if key.endswith("_x") else ""
             for _, key, spec in columns]  # fmt: skip
    lines.append("| geometric mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def run(shapes, repeats: int, torchvision_too: bool = True) -> list[dict]:
    """Time every shape (one after the other), then measure their memory; one row per shape."""
    rows = []
    for shape in shapes:
        rows.append(time_shape(shape, repeats, torchvision_too))
        print(f"  {Shape(*shape).label}: ours fwd {rows[-1]['ours_fwd_x']:.2f}x, fwd+bwd "
              f"{rows[-1]['ours_fwdbwd_x']:.2f}x", file=sys.stderr)
    for row, shape in zip(rows, shapes):
        row.update(memory_shape(shape, torchvision_too))
    return rows


if __name__ == "__main__":
    from deformable.commands.bench import main

    raise SystemExit(main())
