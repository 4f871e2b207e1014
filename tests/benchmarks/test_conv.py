"""The benchmark harness runs end to end on tiny shapes, and its onnxruntime anchor is the same op."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_close
from deformable.benchmarks import conv
from deformable.commands import bench
from deformable.ops import deform_conv2d


def test_quick_run_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--shapes", "quick", "--repeats", "1", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| geometric mean |" in table and "ours fwd+bwd" in table
    rows = json.loads(path.read_text())
    assert [r["shape"] for r in rows] == [list(s) for s in conv.QUICK_SHAPES]
    for row in rows:
        assert row["ours_fwd_ms"] > 0 and row["ours_fwdbwd_x"] > 0
        assert row["ours_fwd_x"] == pytest.approx(row["ours_fwd_ms"] / row["conv2d_fwd_ms"])


def test_onnxruntime_deform_conv_agrees_with_ours():
    """The inference anchor computes the same thing (so the comparison is fair)."""
    x = torch.randn(2, 8, 9, 11)
    weight = torch.randn(6, 8, 3, 3)
    offset = torch.randn(2, 18, 9, 11) * 2
    run = conv._onnxruntime_deform_conv(x, weight, offset, 1)
    assert run is not None, "onnxruntime is part of the dev install"
    (ort_out,) = run()
    assert_close(torch.from_numpy(ort_out), deform_conv2d(x, offset, weight, padding=1))


def test_repeats_must_be_positive():
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])


@pytest.mark.parametrize("shape", [conv.Shape(2, 8, 6, 9, 11, kernel=5, modulated=True),
                                   conv.Shape(1, 8, 4, 10, 9, dilation=2, offset_groups=4)],
                         ids=lambda s: s.label)  # fmt: skip
def test_onnxruntime_anchor_of_every_kind_of_shape(shape):
    """The regimes' cases (5x5, mask, dilation, offset groups) run the same op in onnxruntime."""
    case = conv._Case(shape, torchvision_too=False)
    (ort_out,) = case.onnxruntime()()
    assert_close(torch.from_numpy(ort_out), case.forward("ours"))
    assert case.forward("conv2d").shape == ort_out.shape


def test_shape_sets():
    assert conv.SHAPE_SETS["all"] == conv.SHAPE_SETS["design"] + conv.SHAPE_SETS["regimes"]
    assert conv.Shape(1, 512, 512, 7, 7) in conv.SHAPE_SETS["regimes"]
    assert conv.Shape(2, 128, 128, 28, 28, dilation=2, offset_groups=4).padding == 2
    assert conv.Shape(2, 64, 64, 32, 32, kernel=5).label == "2, 64, 64, 32, 32, 5x5"


def test_table_without_torchvision_has_no_ratio_for_it():
    row = {"shape": list(conv.Shape(1, 8, 8, 12, 12)), "conv2d_fwd_ms": 2.0, "ours_fwd_x": 1.5,
           "conv2d_fwdbwd_ms": 4.0, "ours_fwdbwd_x": 2.0, "ours_extra_mib": 1.0}  # fmt: skip
    mean = conv.markdown([row]).splitlines()[-1]
    assert mean.startswith("| geometric mean |") and "—x" not in mean
    assert mean.split(" | ")[1:5] == ["", "1.50x", "—", "—"]  # conv2d ms, ours, torchvision, ort


def test_onnxruntime_time_is_the_smallest_of_its_processes(monkeypatch):
    """onnxruntime is timed in ``ONNXRUNTIME_PROCESSES`` processes of its own, its best kept; a
    process that fails stops the run with its error."""
    import subprocess

    times = iter(["2.5\n", "warming up\n1.5\n", "oops"])
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        out = next(times)
        return subprocess.CompletedProcess(argv, 0 if out != "oops" else 1, out, "the error")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert conv._onnxruntime_ms(conv.QUICK_SHAPES[0], 1) == 1.5
    assert len(calls) == conv.ONNXRUNTIME_PROCESSES == 2
    with pytest.raises(RuntimeError, match="the error"):
        conv._onnxruntime_ms(conv.QUICK_SHAPES[0], 1, processes=1)
