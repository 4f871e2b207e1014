"""Speed and memory of deform_conv2d against its anchors, measured in one run.

    python -m deformable.bench [--repeats 7] [--shapes all|quick] [--json PATH]

For each shape (N, Cin, Cout, H, W; 3x3 kernel, padding 1, random offsets of a few pixels) it
times the forward and forward+backward of ``F.conv2d`` (the anchor), of
``torchvision.ops.deform_conv2d`` and of ours, plus the forward of onnxruntime's ``DeformConv``
(opset 19) when onnxruntime is installed; every time is the median of ``--repeats`` runs after a
warm-up, and every ratio is against ``F.conv2d`` timed in the same run. It also measures the peak
memory each deformable implementation needs beyond its inputs, outputs and gradients (the rise
of the process's peak resident set during one forward+backward, Linux only).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from deformable.ops import deform_conv2d

#: (N, Cin, Cout, H, W) of DESIGN.md's performance model.
SHAPES = [(2, 64, 64, 56, 56), (2, 128, 128, 28, 28), (2, 256, 256, 14, 14), (2, 512, 512, 7, 7),
          (1, 256, 256, 50, 84)]  # fmt: skip
QUICK_SHAPES = [(1, 8, 8, 12, 12), (2, 16, 8, 9, 7)]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _release_freed_memory() -> bool:
    """Make glibc hand freed blocks back to the OS at once, so RSS follows live memory."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so big blocks are mmapped
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def peak_extra_mib(fn, accounted_bytes: int) -> float | None:
    """Rise of the peak RSS while ``fn`` runs, less ``accounted_bytes`` (outputs, gradients)."""
    if not _release_freed_memory():
        return None
    fn()  # warm-up under the fixed threshold, then let go of what it freed
    gc.collect()
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0.0, (peak - before) * 1024 - accounted_bytes) / 2**20


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


def bench_shape(shape, repeats: int, torchvision_too: bool = True) -> dict:
    import torchvision

    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / math.sqrt(cin * 9)
    offset = torch.randn(n, 18, h, w, generator=g) * 2.0
    grad = torch.randn(n, cout, h, w, generator=g)
    row: dict = {"shape": list(shape)}

    def leaves():
        return [t.clone().requires_grad_() for t in (x, offset, weight)]

    def forward_backward(fn):
        xr, offr, wr = leaves()
        fn(xr, offr, wr).backward(grad)
        return xr, offr, wr

    conv = lambda xr, offr, wr: F.conv2d(xr, wr, padding=1)  # noqa: E731
    ours = lambda xr, offr, wr: deform_conv2d(xr, offr, wr, padding=1)  # noqa: E731
    tv = lambda xr, offr, wr: torchvision.ops.deform_conv2d(xr, offr, wr, padding=1)  # noqa: E731
    impls = {"conv2d": conv, "ours": ours}
    if torchvision_too:
        impls["torchvision"] = tv
    with torch.no_grad():
        for name, fn in impls.items():
            row[f"{name}_fwd_ms"] = median_ms(lambda: fn(x, offset, weight), repeats)
    for name, fn in impls.items():
        row[f"{name}_fwdbwd_ms"] = median_ms(lambda: forward_backward(fn), repeats)
    ort_run = _onnxruntime_deform_conv(x, weight, offset, 1)
    if ort_run is not None:
        row["onnxruntime_fwd_ms"] = median_ms(ort_run, repeats)
    accounted = 4 * (grad.numel() + x.numel() + offset.numel() + weight.numel())  # out + grads
    for name in ("ours", "torchvision") if torchvision_too else ("ours",):
        row[f"{name}_extra_mib"] = peak_extra_mib(lambda: forward_backward(impls[name]), accounted)
    for key in [k for k in row if k.endswith("_ms") and not k.startswith("conv2d")]:
        anchor = "conv2d_fwd_ms" if key.endswith("_fwd_ms") else "conv2d_fwdbwd_ms"
        row[key.replace("_ms", "_x")] = row[key] / row[anchor]
    return row


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deformable bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--shapes", choices=["all", "quick"], default="all",
                        help="DESIGN.md's five shapes, or two tiny ones for a smoke run")
    parser.add_argument("--no-torchvision", action="store_true",
                        help="skip torchvision (its backward is slow on large shapes)")
    parser.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    shapes = SHAPES if args.shapes == "all" else QUICK_SHAPES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.repeats}; ratios against F.conv2d in this run", file=sys.stderr)
    rows = []
    for shape in shapes:
        rows.append(bench_shape(shape, args.repeats, not args.no_torchvision))
        print(f"  {shape}: ours fwd {rows[-1]['ours_fwd_x']:.2f}x, fwd+bwd "
              f"{rows[-1]['ours_fwdbwd_x']:.2f}x", file=sys.stderr)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
