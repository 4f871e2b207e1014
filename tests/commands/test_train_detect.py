"""deformable train detect: a tiny run end to end, the ablation table, evaluation, bad data."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from deformable.commands import evaluate, train
from deformable.data.coco import CocoDetection
from deformable.data.scenes import generate_scenes
from deformable.engine import load_checkpoint
from deformable.engine.detection import evaluate_coco
from deformable.models.build import build_detector


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    generate_scenes(str(root), "train", 4, size=64, max_objects=2)
    generate_scenes(str(root), "val", 2, size=64, max_objects=2)
    return root


def test_train_detect_and_eval(tmp_path, scenes, capsys):
    out = tmp_path / "run"
    code = train.main(["detect", "--data", str(scenes), "--image-size", "64", "--epochs", "1",
                       "--batch-size", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    state = load_checkpoint(out / "last.pt")
    spec = state["model_spec"]
    assert spec["roi_pool"] == "mdeform" and spec["modulated"] and spec["num_classes"] == 14
    with open(out / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert {"val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl"} <= set(row)
    assert evaluate.main(["--checkpoint", str(out / "last.pt")]) == 0
    assert "AP50" in capsys.readouterr().out


def test_ablation_writes_its_table(tmp_path, scenes):
    out = tmp_path / "ablation"
    code = train.main(["detect", "--ablation", "--data", str(scenes), "--image-size", "64",
                       "--epochs", "1", "--batch-size", "2", "--limit", "2", "--seeds", "2",
                       "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    table = (out / "ablation.md").read_text()
    for name in ("regular", "dcnv1 conv3-5", "dcnv2 conv3-5", "+ mdeform RoI pooling",
                 "+ feature mimicking"):  # fmt: skip
        assert f"| {name} |" in table
    assert "seeds 0-1 (mean ± std)" in table and "(ablation.png)" in table
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(out / "run0-seed1" / "last.pt")["config"]["seed"] == 1
    spec = load_checkpoint(out / "run4" / "last.pt")["model_spec"]
    assert spec["mimic"] is True
    mimic = build_detector(spec).mimic  # CPU-scale crops, not the paper's 224 x 32 per image
    assert (mimic.crop_size, mimic.rois_per_image) == (64, 8)


def test_two_process_ddp_detection(tmp_path, scenes):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "deformable.cli", "train", "detect", "--data", str(scenes), "--image-size", "64",
         "--epochs", "2", "--batch-size", "1", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and len(state["history"]["val_AP"]) == 2
    # 4 training images, 2 processes, batch 1: 2 steps per epoch (4 in one process)
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {4.0}
    # the evaluation sharded over the two processes scores what one process scores (with
    # detections that score > 0: tests/data/test_coco.py)
    model = build_detector(state["model_spec"])
    model.load_state_dict(state["model"])
    val = CocoDetection(str(scenes / "val"), str(scenes / "annotations_val.json"))
    metrics = evaluate_coco(model, val)
    for name, value in metrics.items():
        assert value == pytest.approx(state["history"][f"val_{name}"][-1], abs=1e-6, nan_ok=True), name


def test_bad_detection_data(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "annotations_train.json").write_text("{broken")
    code = train.main(["detect", "--data", str(tmp_path / "data"), "--epochs", "1",
                       "--out", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "is not valid JSON" in err and "Traceback" not in err
