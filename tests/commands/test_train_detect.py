"""deformable train detect: a tiny run end to end, the ablation table, evaluation, bad data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from deformable.commands import evaluate, train
from deformable.data.coco import CocoDetection
from deformable.data.scenes import generate_scenes
from deformable.engine import load_checkpoint, loop
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


MASK_COLUMNS = {f"val/mask_{m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def test_train_maskrcnn_resume_and_eval(tmp_path, scenes, capsys, monkeypatch):
    out = tmp_path / "mask"
    args = ["detect", "--model", "maskrcnn_resnet18_fpn", "--data", str(scenes), "--image-size", "64",
            "--epochs", "2", "--batch-size", "2", "--roi-pool", "align", "--out", str(out), "--no-progress"]  # fmt: skip
    real_save = loop.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt  # killed right after its first epoch was saved

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert load_checkpoint(out / "last.pt")["epoch"] == 0
    assert train.main(args + ["--resume"]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["model_spec"]["model"] == "maskrcnn_resnet18_fpn" and state["epoch"] == 1
    assert len(state["history"]["val_mask_AP"]) == len(state["history"]["val_AP"]) == 2
    # 4 training images, batch 2: the resumed run went on to 4 steps, it did not start again
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {4.0}
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and MASK_COLUMNS | {"val/AP"} <= set(rows[1])
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "last.pt")]) == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "mask_AP " in printed and "mask_AP50 " in printed


def test_maskrcnn_ablation_writes_mask_columns(tmp_path, scenes):
    out = tmp_path / "ablation"
    code = train.main(["detect", "--ablation", "--model", "maskrcnn_resnet18_fpn", "--data", str(scenes),
                       "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--limit", "2",
                       "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    table = (out / "ablation.md").read_text()
    assert "| setting | AP | AP50 | AP75 | APs | APm | APl | mask AP | mask AP50 | mask AP75 |" in table
    assert "COCO box and mask metrics" in table and table.count("| + feature mimicking |") == 1
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(out / "run4" / "last.pt")["model_spec"]["model"] == "maskrcnn_resnet18_fpn"


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


def test_bad_masks_end_in_one_line(tmp_path, capsys):
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    annotations = {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
                   "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
                                    "segmentation": [[1, 1, 5, 1, 5]]}],
                   "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    (folder / "annotations_train.json").write_text(json.dumps(annotations))
    args = ["detect", "--model", "maskrcnn_resnet18_fpn", "--data", str(folder), "--epochs", "1",
            "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "annotations_train.json', annotation 5: malformed segmentation: polygon 0 has 5 coordinates" in err
    del annotations["annotations"][0]["segmentation"]  # box-only data: no Mask R-CNN on it
    (folder / "annotations_train.json").write_text(json.dumps(annotations))
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "annotation 5: no 'segmentation', and instance masks were asked for" in err


def test_bad_detection_data(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "annotations_train.json").write_text("{broken")
    code = train.main(["detect", "--data", str(tmp_path / "data"), "--epochs", "1",
                       "--out", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "is not valid JSON" in err and "Traceback" not in err
