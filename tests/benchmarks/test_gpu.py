"""The GPU suites (conv, RoI pooling, training steps) run end to end on the CPU with quick
sizes — everything but the CUDA timing and memory calls — and refuse cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

from deformable.benchmarks import gpu, roi
from deformable.benchmarks.timing import unsupported
from deformable.commands import bench, bench_roi


def test_the_conv_suite_and_training_steps_run(capsys):
    result = gpu.run(torch.device("cpu"), repeats=1, quick=True)
    (row,) = result["conv"]
    for impl in gpu.IMPLS:
        assert row[f"{impl}_fwd_ms"] > 0 and row[f"{impl}_fwdbwd_ms"] > 0
    assert row["ours_fwd_x"] == pytest.approx(row["ours_fwd_ms"] / row["conv2d_fwd_ms"])
    assert [r["case"].split(" training")[0] for r in result["training"]] == ["ResNet-18",
                                                                            "fasterrcnn_resnet18_fpn"]
    for r in result["training"]:
        assert r["dcn_x"] == pytest.approx(r["dcn_ms"] / r["regular_ms"])
    table = gpu.markdown(result)
    assert "| quick | 1, 8, 8, 12, 12 | float32 |" in table and "| geometric mean |" in table
    assert "DCN / regular" in table


def test_the_roi_suite_reports_what_torchvision_cannot_do():
    rows = roi.run(roi.QUICK, 1, "cpu", (torch.float32, torch.bfloat16))
    assert [r["dtype"] for r in rows] == ["float32"] * 4 + ["bfloat16"] * 4
    assert all("fwdbwd_x" in r for r in rows[:4])
    lacking = [r for r in rows[4:] if "torchvision_unsupported" in r]  # its CPU kernels: no bf16
    assert all(r["ours_fwdbwd_ms"] > 0 for r in rows[4:])
    table = roi.markdown(rows)
    for r in lacking:
        assert "not implemented for 'BFloat16'" in r["torchvision_unsupported"]
        assert "torchvision not timed" in table


def test_unsupported_finds_the_reason():
    error = RuntimeError('operator(), /src/roi_align_kernel.cpp:320, "roi_align_forward_kernel" '
                         "not implemented for 'BFloat16'")
    assert unsupported(error) == "\"roi_align_forward_kernel\" not implemented for 'BFloat16'"


@pytest.mark.parametrize("command", [bench, bench_roi])
def test_without_a_gpu_it_says_so_in_one_line(command, capsys):
    assert command.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device is available here" in err
