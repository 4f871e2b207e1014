"""Inference of a DCN ResNet-50 in PyTorch (our kernels) and in onnxruntime (exported), one run.

    deformable bench-deploy [--batch 1] [--size 224] [--repeats 10] [--json PATH]
    python -m deformable.benchmarks.deploy ...    (the same)

The model is ResNet-50 with modulated deformable convolutions in conv3-conv5 (DCNv2's setting,
13 layers), offset branches given small random weights so the offsets are not zero. It is
exported with :func:`deformable.export.export_onnx` and run by onnxruntime's CPU provider in a
process of its own (a live onnxruntime session slows torch's convolutions down). The anchor is
the same ResNet-50 with regular convolutions in PyTorch. Medians of ``--repeats`` runs after a
warm-up; the outputs of PyTorch and onnxruntime are compared too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from deformable.benchmarks.timing import median_ms


def dcn_resnet50(seed: int = 0) -> torch.nn.Module:
    from deformable.models import resnet50

    torch.manual_seed(seed)
    model = resnet50(deform_stages=(3, 4, 5), modulated=True).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "conv_offset"):
                module.conv_offset.weight.normal_(0, 0.01)
    return model


def _onnxruntime_run(path: str, batch: int, size: int, repeats: int) -> dict:
    code = f"""
import json, numpy as np, onnxruntime as ort, torch
from deformable.benchmarks.timing import median_ms
options = ort.SessionOptions()
options.intra_op_num_threads = {torch.get_num_threads()}
session = ort.InferenceSession({path!r}, options, providers=["CPUExecutionProvider"])
x = torch.randn({batch}, 3, {size}, {size}, generator=torch.Generator().manual_seed(1)).numpy()
name = session.get_inputs()[0].name
ms = median_ms({{"ort": lambda: session.run(None, {{name: x}})}}, {repeats})["ort"]
np.save({path!r} + ".out.npy", session.run(None, {{name: x}})[0])
print(json.dumps(ms))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=1800)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"the onnxruntime run failed:\n{result.stderr}")
    import numpy as np

    return {"ms": json.loads(result.stdout.strip().splitlines()[-1]),
            "output": torch.from_numpy(np.load(path + ".out.npy"))}  # fmt: skip


def run(batch: int, size: int, repeats: int) -> dict:
    import torchvision

    from deformable.export import export_onnx

    model = dcn_resnet50()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    plain = torchvision.models.resnet50().eval()
    with torch.no_grad():
        times = median_ms({"resnet50": lambda: plain(x), "dcn": lambda: model(x)}, repeats)
        expected = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dcn_resnet50.onnx")
        export_onnx(model, x, path)
        ort_result = _onnxruntime_run(path, batch, size, repeats)
    error = ((ort_result["output"] - expected).abs().max() / expected.abs().max()).item()
    return {"batch": batch, "size": size, "torch_resnet50_ms": times["resnet50"],
            "torch_dcn_ms": times["dcn"], "onnxruntime_dcn_ms": ort_result["ms"],
            "relative_error": error}  # fmt: skip


def markdown(row: dict) -> str:
    anchor = row["torch_resnet50_ms"]
    return "\n".join([
        f"| batch {row['batch']}, {row['size']}x{row['size']} | ms | vs plain ResNet-50 |",
        "|---|---|---|",
        f"| plain ResNet-50, PyTorch | {anchor:.1f} | 1.00x |",
        f"| DCNv2 ResNet-50 (conv3-5), PyTorch + our kernels | {row['torch_dcn_ms']:.1f} | "
        f"{row['torch_dcn_ms'] / anchor:.2f}x |",
        f"| DCNv2 ResNet-50 (conv3-5), onnxruntime | {row['onnxruntime_dcn_ms']:.1f} | "
        f"{row['onnxruntime_dcn_ms'] / anchor:.2f}x |",
        "",
        f"onnxruntime vs PyTorch output: max relative error {row['relative_error']:.1e}",
    ])  # fmt: skip


if __name__ == "__main__":
    from deformable.commands.bench_deploy import main

    raise SystemExit(main())
