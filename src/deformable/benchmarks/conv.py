"""Speed and memory of deform_conv2d against its anchors, measured in one run.

    deformable bench [--repeats 7] [--shapes all|quick] [--json PATH]
    python -m deformable.benchmarks.conv ...    (the same)

For each shape (N, Cin, Cout, H, W; 3x3 kernel, padding 1, random offsets of a few pixels) it
times the forward and forward+backward of ``F.conv2d`` (the anchor), of
``torchvision.ops.deform_conv2d`` and of ours, plus the forward of onnxruntime's ``DeformConv``
(opset 19) when onnxruntime is installed; every time is the median of ``--repeats`` runs after a
warm-up, and every ratio is against ``F.conv2d`` timed in the same run. It also measures the peak
memory each deformable implementation needs beyond its inputs, outputs and gradients (the rise
of the process's peak resident set during one forward+backward, Linux only).
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from deformable.benchmarks.timing import median_ms, peak_extra_mib
from deformable.ops import deform_conv2d

#: (N, Cin, Cout, H, W) of DESIGN.md's performance model.
SHAPES = [(2, 64, 64, 56, 56), (2, 128, 128, 28, 28), (2, 256, 256, 14, 14), (2, 512, 512, 7, 7),
          (1, 256, 256, 50, 84)]  # fmt: skip
QUICK_SHAPES = [(1, 8, 8, 12, 12), (2, 16, 8, 9, 7)]


def _onnxruntime_deform_conv(x, weight, offset, padding):
    """An onnxruntime session running one DeformConv node, or None without onnx/onnxruntime."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    node = helper.make_node("DeformConv", ["X", "W", "offset"], ["Y"], kernel_shape=[3, 3],
                            pads=[padding] * 4, strides=[1, 1], dilations=[1, 1], group=1,
                            offset_group=1)  # fmt: skip

    def info(name, t):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(t.shape))

    graph = helper.make_graph([node], "deform_conv", [info("X", x), info("W", weight),
                              info("offset", offset)], [helper.make_tensor_value_info(
                              "Y", TensorProto.FLOAT, None)])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    feeds = {"X": x.numpy(), "W": weight.numpy(), "offset": offset.numpy()}
    return lambda: session.run(None, feeds)


class _Case:
    """The tensors and implementations of one shape."""

    def __init__(self, shape, torchvision_too: bool):
        import torchvision

        n, cin, cout, h, w = shape
        g = torch.Generator().manual_seed(0)
        self.shape = shape
        self.x = torch.randn(n, cin, h, w, generator=g)
        self.weight = torch.randn(cout, cin, 3, 3, generator=g) / math.sqrt(cin * 9)
        self.offset = torch.randn(n, 18, h, w, generator=g) * 2.0
        self.grad = torch.randn(n, cout, h, w, generator=g)
        self.impls = {
            "conv2d": lambda x, off, w: F.conv2d(x, w, padding=1),
            "ours": lambda x, off, w: deform_conv2d(x, off, w, padding=1),
        }
        if torchvision_too:
            self.impls["torchvision"] = lambda x, off, w: torchvision.ops.deform_conv2d(
                x, off, w, padding=1)  # fmt: skip

    def forward(self, name):
        with torch.no_grad():
            return self.impls[name](self.x, self.offset, self.weight)

    def forward_backward(self, name):
        leaves = [t.clone().requires_grad_() for t in (self.x, self.offset, self.weight)]
        self.impls[name](*leaves).backward(self.grad)
        return leaves


def _onnxruntime_ms(shape, repeats: int) -> float | None:
    """onnxruntime's DeformConv forward on the same tensors, timed in a separate process.

    A live onnxruntime session's threads slow torch's own convolutions down (measured here:
    2.2 ms -> 6.3 ms for one conv), so it never shares a process with the other timings.
    """
    import subprocess

    code = (
        "import sys, json, torch; from deformable.benchmarks import conv, timing; "
        f"case = conv._Case({tuple(shape)!r}, False); "
        "run = conv._onnxruntime_deform_conv(case.x, case.weight, case.offset, 1); "
        f"print(json.dumps(None if run is None else timing.median_ms({{'ort': run}}, {repeats})['ort']))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=600)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"the onnxruntime timing failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


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
    names = ("ours", "torchvision") if torchvision_too else ("ours",)
    return {f"{name}_extra_mib": peak_extra_mib(lambda name=name: case.forward_backward(name),
                                                accounted) for name in names}  # fmt: skip


def geometric_mean(values):
    values = [v for v in values if v is not None]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def markdown(rows) -> str:
    columns = [("conv2d fwd ms", "conv2d_fwd_ms", ".2f"), ("ours fwd", "ours_fwd_x", ".2f"),
               ("torchvision fwd", "torchvision_fwd_x", ".2f"),
               ("onnxruntime fwd", "onnxruntime_fwd_x", ".2f"),
               ("conv2d fwd+bwd ms", "conv2d_fwdbwd_ms", ".2f"),
               ("ours fwd+bwd", "ours_fwdbwd_x", ".2f"),
               ("torchvision fwd+bwd", "torchvision_fwdbwd_x", ".2f"),
               ("ours extra MiB", "ours_extra_mib", ".1f"),
               ("torchvision extra MiB", "torchvision_extra_mib", ".1f")]  # fmt: skip
    lines = ["| N, Cin, Cout, H, W | " + " | ".join(c[0] for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]  # fmt: skip
    for row in rows:
        cells = [_fmt(row.get(key), spec) + ("x" if key.endswith("_x") and row.get(key) else "")
                 for _, key, spec in columns]  # fmt: skip
        lines.append(f"| {', '.join(map(str, row['shape']))} | " + " | ".join(cells) + " |")
    means = [_fmt(geometric_mean([r.get(key) for r in rows]), spec) + ("x" if key.endswith("_x") else "")
             if key.endswith("_x") else "" for _, key, spec in columns]  # fmt: skip
    lines.append("| geometric mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def run(shapes, repeats: int, torchvision_too: bool = True) -> list[dict]:
    """Time every shape (one after the other), then measure their memory; one row per shape."""
    rows = []
    for shape in shapes:
        rows.append(time_shape(shape, repeats, torchvision_too))
        print(f"  {shape}: ours fwd {rows[-1]['ours_fwd_x']:.2f}x, fwd+bwd "
              f"{rows[-1]['ours_fwdbwd_x']:.2f}x", file=sys.stderr)
    for row, shape in zip(rows, shapes):
        row.update(memory_shape(shape, torchvision_too))
    return rows


if __name__ == "__main__":
    from deformable.commands.bench import main

    raise SystemExit(main())
