"""``deformable train classify`` and ``deformable eval``: image folders, bad data, bad
checkpoints, data-parallel runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from deformable.commands import evaluate, train
from deformable.engine import CheckpointError, load_checkpoint


def make_folder(root, split, classes=("cat", "dog"), per_class=3, size=(20, 16)):
    from PIL import Image

    for c, name in enumerate(classes):
        os.makedirs(root / split / name, exist_ok=True)
        for i in range(per_class):
            array = (torch.rand(*size, 3) * 255).byte().numpy()
            array[..., c] = 255  # a class cue: a saturated colour channel
            Image.fromarray(array).save(root / split / name / f"{i}.png")


def test_image_folder_train_and_eval(tmp_path, capsys):
    make_folder(tmp_path / "data", "train")
    make_folder(tmp_path / "data", "val")
    out = tmp_path / "run"
    code = train.main(["classify", "--data", str(tmp_path / "data"), "--model", "resnet18",
                       "--deform-stages", "5", "--image-size", "32", "--epochs", "2",
                       "--batch-size", "4", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    state = load_checkpoint(out / "last.pt")
    assert state["model_spec"]["classes"] == ["cat", "dog"] and state["epoch"] == 1
    assert evaluate.main(["--checkpoint", str(out / "last.pt")]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert os.listdir(out / "tensorboard")


@pytest.mark.parametrize("case", ["missing", "no_classes", "no_images", "unreadable", "val_classes"])
def test_bad_data_gets_a_clear_message(tmp_path, capsys, case):
    data = tmp_path / "data"
    if case != "missing":
        (data / "train").mkdir(parents=True)
    if case in ("no_images", "unreadable", "val_classes"):
        (data / "train" / "a").mkdir()
    if case == "unreadable":
        (data / "train" / "a" / "broken.png").write_bytes(b"not a png")
        make_folder(data, "val", classes=("a",))
    if case == "val_classes":
        make_folder(data, "train", classes=("a",))
        make_folder(data, "val", classes=("b",))
    code = train.main(["classify", "--data", str(data), "--model", "digitnet-regular",
                       "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    expected = {"missing": "no such folder", "no_classes": "has no class folders",
                "no_images": "holds no images", "unreadable": "broken.png' cannot be read",
                "val_classes": "has classes ['b'], but the training data has ['a']"}[case]  # fmt: skip
    assert expected in err


def test_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    assert evaluate.main(["--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_two_process_ddp_run(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "deformable.cli", "train", "classify", "--model", "digitnet-dcnv1", "--limit", "64",
         "--epochs", "2", "--batch-size", "16", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and len(state["history"]["val_accuracy"]) == 2
