"""Training engine: resume loses no epoch and changes nothing; image folders; bad data; DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from deformable import train
from deformable.data import TransformedDigits
from deformable.demo import DigitNet
from deformable.engine import CheckpointError, TrainConfig, checkpoint, fit, load_checkpoint
from deformable.engine import classification


def small_digits(count=96):
    train_set = torch.utils.data.Subset(TransformedDigits("train", copies=1), range(count))
    val_set = torch.utils.data.Subset(TransformedDigits("test", copies=1), range(64))
    return train_set, val_set


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    train_set, val_set = small_digits()
    config = TrainConfig(epochs=3, batch_size=32, seed=3)
    build = lambda: DigitNet("dcnv2")  # noqa: E731
    fit(build, train_set, val_set, config, str(tmp_path / "straight"), progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")

    real_save = checkpoint.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # killed right after epoch 2 of 3 was saved

    monkeypatch.setattr(classification, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(build, train_set, val_set, config, str(tmp_path / "resumed"), progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(classification, "save_checkpoint", real_save)
    history = fit(build, train_set, val_set, config, str(tmp_path / "resumed"), resume=True,
                  progress=False)  # fmt: skip
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["epoch"] == 2 and len(history["train_loss"]) == 3
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert straight["history"]["train_loss"] == resumed["history"]["train_loss"]
    with open(tmp_path / "resumed" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]


def test_resume_with_another_config_is_refused(tmp_path):
    train_set, val_set = small_digits(32)
    fit(lambda: DigitNet("regular"), train_set, val_set, TrainConfig(epochs=1, batch_size=32),
        str(tmp_path), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="resume: .* was trained with"):
        fit(lambda: DigitNet("regular"), train_set, val_set, TrainConfig(epochs=2, lr=0.1),
            str(tmp_path), resume=True, progress=False)  # fmt: skip


def test_offset_learning_rates_keep_their_multiplier(tmp_path):
    # the one-cycle schedule must scale each group, not set every group to the base rate
    train_set, val_set = small_digits(64)
    config = TrainConfig(epochs=2, batch_size=32, lr=1e-3, offset_lr_mult=0.1)
    fit(lambda: DigitNet("dcnv2"), train_set, val_set, config, str(tmp_path), progress=False)
    groups = load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"]
    rates = {g["name"]: g["lr"] for g in groups}
    peaks = {g["name"]: g["max_lr"] for g in groups}
    assert set(rates) == {"base", "offset"}
    assert peaks == {"base": pytest.approx(1e-3), "offset": pytest.approx(1e-4)}
    assert rates["offset"] == pytest.approx(0.1 * rates["base"]) and rates["base"] > 0


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
    assert train.eval_command(["--checkpoint", str(out / "last.pt")]) == 0
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
    assert train.eval_command(["--checkpoint", str(tmp_path / "x.pt")]) == 2
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
