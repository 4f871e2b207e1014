"""The fault battery: files a stranger could hand over, settings that cannot work, writes that
fail, processes that are killed. No code runs from a checkpoint, every user error is one line
with exit code 2, and no finished epoch is lost."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from deformable.commands import demo, evaluate, explain, train
from deformable.engine import WriteError, checkpoint, load_checkpoint, save_checkpoint

SMALL = ["--model", "digitnet-dcnv2", "--limit", "64", "--batch-size", "32", "--no-progress"]


class Evil:
    """Unpickling it runs ``touch MARKER`` (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line_error(err: str, prog: str) -> str:
    """The one error line of stderr (status lines before it are allowed), no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), err
    assert err.rstrip().endswith(errors[0]), err  # the last thing said
    return errors[0]


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(marker), "epoch": 0, "model_spec": {"model": "digitnet-regular"}}, path)
    return path, marker


@pytest.mark.parametrize("command", ["eval", "explain", "train classify --resume",
                                     "train detect --resume", "train segment --resume", "demo --resume"])
def test_a_malicious_checkpoint_never_runs(tmp_path, capsys, evil, command):
    path, marker = evil
    out = tmp_path / "run"
    if command == "eval":
        code, prog = evaluate.main(["--checkpoint", str(path)]), "deformable eval"
    elif command == "explain":
        code = explain.main(["--checkpoint", str(path), "--out", str(tmp_path / "views")])
        prog = "deformable explain"
    elif command == "demo --resume":
        (out / "runs" / "regular-seed0").mkdir(parents=True)
        os.replace(path, out / "runs" / "regular-seed0" / "last.pt")
        code = demo.main(["--quick", "--resume", "--out", str(out), "--no-progress"])
        prog, path = "deformable demo", out / "runs" / "regular-seed0" / "last.pt"
    else:
        task = command.split()[1]
        out.mkdir()
        os.replace(path, out / "last.pt")
        argv = [task, "--resume", "--out", str(out), "--epochs", "1", "--limit", "2", "--no-progress"]
        if task == "detect":
            from deformable.data.scenes import generate_scenes

            for split in ("train", "val"):
                generate_scenes(str(tmp_path / "scenes"), split, 2, size=64, max_objects=1)
            argv += ["--image-size", "64", "--data", str(tmp_path / "scenes")]
        if task == "segment":
            argv += ["--image-size", "32", "--scenes", "2", "1", "--output-stride", "16",
                     "--atrous-rates", "1", "2"]
        code, prog, path = train.main(argv), f"deformable train {task}", out / "last.pt"
    line = one_line_error(capsys.readouterr().err, prog)
    assert code == 2 and not marker.exists()
    assert str(path) in line and "loading it could run code" in line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert train.main(["classify", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_checkpoints_of_the_trainers_load_safely(finished_run, tmp_path):
    """What train_loop saves (optimiser, scheduler, RNG, config, history) is weights_only-safe,
    and so is a checkpoint written the way the landed version wrote them (plain torch.save)."""
    state = torch.load(finished_run / "last.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "history", "config", "model_spec"}
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy)
    assert load_checkpoint(legacy)["epoch"] == 0


@pytest.mark.parametrize("change, expected", [
    (["--epochs", "2"], "epochs: 1 in the checkpoint, 2 now"),
    (["--lr", "0.01"], "lr: 0.002 in the checkpoint, 0.01 now"),
    (["--model", "digitnet-regular"], "model_spec.model: 'digitnet-dcnv2' in the checkpoint, "
                                      "'digitnet-regular' now"),
])  # fmt: skip
def test_resume_with_other_settings_names_them(finished_run, capsys, change, expected):
    argv = ["classify", *SMALL, "--out", str(finished_run), "--resume"]
    if "--epochs" not in change:
        argv += ["--epochs", "1"]
    code = train.main(argv + change)
    line = one_line_error(capsys.readouterr().err, "deformable train classify")
    assert code == 2 and expected in line and "start a new run in another folder" in line


@pytest.mark.parametrize("task, argv, expected", [
    ("classify", ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("classify", ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ("classify", ["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    ("classify", ["--lr=-1e-3"], "--lr must be a finite number > 0, got -0.001"),
    ("classify", ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    ("classify", ["--offset-lr-mult", "-1"], "--offset-lr-mult must be a finite number >= 0"),
    ("classify", ["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    ("classify", ["--limit", "0"], "--limit must be >= 1, got 0"),
    ("classify", ["--deform-stages", "3", "3"], "--deform-stages takes distinct stages from 2 3 4 5"),
    ("classify", ["--model", "resnet18", "--deform-stages", "7"], "--deform-stages takes distinct"),
    ("detect", ["--image-size", "8"], "--image-size must be >= 32, got 8"),
    ("detect", ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("detect", ["--seeds", "0"], "--seeds must be >= 1, got 0"),
])  # fmt: skip
def test_settings_that_cannot_work_are_one_line(tmp_path, capsys, task, argv, expected):
    with pytest.raises(SystemExit) as info:
        train.main([task, "--out", str(tmp_path / "run"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse: the usage line(s), then the error
    assert last.startswith(f"deformable train {task}: error: ") and expected in last, last
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = demo.main(["--quick", "--out", str(blocker / "report"), "--no-progress"])
    line = one_line_error(capsys.readouterr().err, "deformable demo")
    assert code == 2 and str(blocker) in line


def test_a_write_that_fails_half_way_keeps_the_previous_checkpoint(finished_run, tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = load_checkpoint(out / "last.pt")
    real_save = torch.save

    def half_then_disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_disk_full)
    with pytest.raises(WriteError, match="No space left on device; the previous file, if any, is intact"):
        save_checkpoint(out / "last.pt", {"epoch": 99})
    # through a command: a resumed run that cannot write its checkpoint ends in one line
    code = train.main(["classify", *SMALL, "--epochs", "1", "--out", str(tmp_path / "other")])
    line = one_line_error(capsys.readouterr().err, "deformable train classify")
    assert code == 2 and "No space left on device" in line
    after = load_checkpoint(out / "last.pt")
    assert after["epoch"] == before["epoch"] == 0
    for name, value in before["model"].items():
        assert torch.equal(value, after["model"][name])
    assert not [p for p in os.listdir(out) if ".tmp-" in p]  # the half-written file is gone


# --- killed runs ------------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from deformable.commands import train
    from deformable.engine import checkpoint, classification

    where, out = sys.argv[1], sys.argv[2]
    argv = ["classify", "--model", "digitnet-dcnv2", "--limit", "64", "--batch-size", "16",
            "--epochs", "3", "--out", out, "--no-progress"]
    if where == "epoch":  # SIGKILL in the middle of epoch 2 (after epoch 1 was saved)
        real_loss, calls = classification.classification_loss, [0]

        def loss(model, batch):
            calls[0] += 1
            if calls[0] == 4 + 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_loss(model, batch)

        classification.classification_loss = loss
    elif where == "write":  # SIGKILL half way through writing epoch 2's checkpoint
        real_save, saves = torch.save, [0]

        def save(obj, f, *args, **kwargs):
            saves[0] += 1
            real_save(obj, f, *args, **kwargs)
            if saves[0] == 2:
                f.truncate(f.tell() // 2)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.torch.save = save
    sys.exit(train.main(argv + (["--resume"] if where == "resume" else [])))
""")


def _run(where: str, out) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", KILLER, where, str(out)], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = _run("none", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_checkpoint(out / "last.pt")


@pytest.mark.parametrize("where", ["epoch", "write"])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, uninterrupted, where):
    killed = _run(where, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0  # epoch 1 survived, intact
    resumed = _run("resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = load_checkpoint(tmp_path / "last.pt")
    assert final["epoch"] == 2 and final["history"]["train_loss"] == uninterrupted["history"]["train_loss"]
    for name, value in uninterrupted["model"].items():
        assert torch.equal(value, final["model"][name]), name
    with open(tmp_path / "metrics.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["epoch", "0", "1", "2"]


def test_a_run_is_the_same_whether_numba_compiles_or_loads_its_cache(tmp_path, monkeypatch):
    # A resumed run loads the kernels numba cached while the first run compiled them: both must
    # compute the same bits. (On branch cpu-speed2, a fixed-width reduction under fastmath summed
    # in another order when loaded from the cache than when freshly compiled, and a resumed run
    # drifted in the 7th digit.)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba-cache"))  # empty: the first run compiles
    histories = []
    for run in ("compiles", "loads"):
        result = _run("none", tmp_path / run)
        assert result.returncode == 0, result.stderr[-2000:]
        histories.append(load_checkpoint(tmp_path / run / "last.pt")["history"]["train_loss"])
    assert os.listdir(tmp_path / "numba-cache")  # the second run had a cache to load
    assert histories[0] == histories[1]
