"""The RoI pooling benchmark runs end to end on tiny shapes and reports consistent ratios."""

from __future__ import annotations

import json

import pytest

from deformable.benchmarks import roi
from deformable.commands import bench_roi


def test_quick_run_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench_roi.json"
    assert bench_roi.main(["--quick", "--repeats", "1", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| case |") and "fwd+bwd ratio" in table
    rows = json.loads(path.read_text())
    assert [r["case"] for r in rows] == ["roi, offsets (v1)", "roi, offsets + masks (v2)",
                                         "ps, class-aware offsets", "fpn P2-P5, offsets (v1)"]  # fmt: skip
    for row in rows:
        assert row["case"] in table
        assert row["ours_fwd_ms"] > 0 and row["torchvision_fwdbwd_ms"] > 0
        assert row["fwd_x"] == pytest.approx(row["ours_fwd_ms"] / row["torchvision_fwd_ms"])
        assert row["fwdbwd_x"] == pytest.approx(row["ours_fwdbwd_ms"] / row["torchvision_fwdbwd_ms"])


def test_random_boxes_are_inside_the_image():
    import torch

    boxes = roi.random_boxes(200, 80, 120, torch.Generator().manual_seed(0))
    assert boxes.shape == (200, 5) and (boxes[:, 0] == 0).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 120).all()
    assert (boxes[:, 2] >= 0).all() and (boxes[:, 4] <= 80).all()
    assert (boxes[:, 3] > boxes[:, 1]).all() and (boxes[:, 4] > boxes[:, 2]).all()


def test_repeats_must_be_positive():
    with pytest.raises(SystemExit):
        bench_roi.main(["--repeats", "0"])
