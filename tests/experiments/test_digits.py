"""The demo's experiment: the report, figures and checkpoints; where a unit looks."""

from __future__ import annotations

import json

import pytest
import torch

from deformable.data import TransformedDigits
from deformable.engine import load_checkpoint
from deformable.experiments import digits
from deformable.models import DigitNet
from deformable.models.digitnet import VARIANTS


def test_small_run_writes_the_report(tmp_path):
    config = digits.DigitsConfig(epochs=1, seeds=2, copies=1, train_limit=128, batch_size=32)
    rows = digits.run(str(tmp_path), config, progress=False)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    for row in rows:
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["seeds"] == 2 and row["params"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| DCNv2 (last 2 layers) |" in report and "learning_curves.png" in report
    for name in ("learning_curves.png", "sampling_locations.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["histories"]["dcnv1"]) == 2
    for variant in VARIANTS:
        checkpoint = load_checkpoint(tmp_path / f"{variant}.pt")
        DigitNet(variant).load_state_dict(checkpoint["model"])
        assert checkpoint["model_spec"]["model"] == f"digitnet-{variant}"
        assert checkpoint["data_options"] == {"copies": 1}
        assert (tmp_path / "runs" / f"{variant}-seed1" / "metrics.csv").exists()


def test_regular_net_samples_the_7x7_grid():
    """Two stacked 3x3 layers at stride 4: the regular 5x5 grid of distinct points, spaced 4
    pixels, 81 samples with the multiplicities of a 3x3 box convolved with itself."""
    torch.manual_seed(0)
    model = DigitNet("regular")
    image = TransformedDigits("test", copies=1)[0][0]
    points, weights, unit = digits.sampling_locations(model, image)
    assert points.shape == (81, 2) and torch.equal(weights, torch.ones(81))
    centre = torch.tensor(unit, dtype=torch.float32) * 4 + 1.5
    offsets = (points - centre) / 4
    counts = {}
    for dy, dx in offsets.round().int().tolist():
        counts[(dy, dx)] = counts.get((dy, dx), 0) + 1
    assert set(counts) == {(i, j) for i in range(-2, 3) for j in range(-2, 3)}
    assert counts[(0, 0)] == 9 and counts[(2, 2)] == 1 and counts[(0, 2)] == 3


def test_deformable_net_moves_its_samples_by_the_offsets():
    """A constant offset (+1, -0.5) in both layers moves every sample by 2 * (4, -2) pixels."""
    torch.manual_seed(0)
    regular, deformable = DigitNet("regular"), DigitNet("dcnv1")
    deformable.load_state_dict(regular.state_dict(), strict=False)
    for conv in deformable.last_convs:
        with torch.no_grad():
            conv.conv_offset.bias.copy_(torch.tensor([1.0, -0.5] * 9))
    image = TransformedDigits("test", copies=1)[3][0]
    base, _, unit = digits.sampling_locations(regular, image)
    moved, _, unit_moved = digits.sampling_locations(deformable, image)
    shift = (torch.tensor(unit_moved) - torch.tensor(unit)).float() * 4
    assert torch.allclose(moved - shift, base + torch.tensor([8.0, -4.0]), atol=1e-4)


def test_resume_keeps_finished_runs(tmp_path):
    config = digits.DigitsConfig(epochs=1, seeds=1, copies=1, train_limit=64, batch_size=32)
    first = digits.run(str(tmp_path), config, variants=("regular",), progress=False)
    stamp = (tmp_path / "runs" / "regular-seed0" / "last.pt").stat().st_mtime_ns
    again = digits.run(str(tmp_path), config, variants=("regular",), progress=False, resume=True)
    assert (tmp_path / "runs" / "regular-seed0" / "last.pt").stat().st_mtime_ns == stamp
    assert again[0]["accuracy_mean"] == first[0]["accuracy_mean"]


def test_the_baseline_is_required(tmp_path):
    with pytest.raises(ValueError, match="variants must include 'regular'"):
        digits.run(str(tmp_path), digits.DigitsConfig(), variants=("dcnv1",))
