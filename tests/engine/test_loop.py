"""The training loop: resume loses no epoch and changes nothing; settings are kept; learning rates."""

from __future__ import annotations

import csv

import pytest
import torch

from deformable.data import TransformedDigits
from deformable.engine import ConfigError, ResumeError, TrainConfig, checkpoint, fit, load_checkpoint, loop
from deformable.models import DigitNet


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

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(build, train_set, val_set, config, str(tmp_path / "resumed"), progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
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
    with pytest.raises(ResumeError, match=r"other settings \(batch_size: 32 in the checkpoint, 64 now; "
                                          r"epochs: 1 in the checkpoint, 2 now; "
                                          r"lr: 0.002 in the checkpoint, 0.1 now\)"):
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


@pytest.mark.parametrize("field, value", [("lr", float("nan")), ("lr", 0.0), ("weight_decay", -1.0),
                                          ("epochs", 0), ("batch_size", 2.5), ("seed", -1),
                                          ("roi_offset_lr_mult", float("inf"))])  # fmt: skip
def test_config_refuses_settings_that_cannot_work(field, value):
    with pytest.raises(ConfigError, match=f"^{field} must be") as info:
        TrainConfig(**{field: value})
    assert info.value.field == field
