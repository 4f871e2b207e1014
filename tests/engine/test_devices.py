"""Devices and mixed precision: which device --device means, AMP training on the CPU, a
checkpoint written on a GPU evaluated and resumed on the CPU, the data-parallel backend."""

from __future__ import annotations

import pytest
import torch
import torch.serialization

from deformable.commands import evaluate, train
from deformable.engine import distributed, load_checkpoint, save_checkpoint
from deformable.engine.devices import DeviceError, autocast, grad_scaler, resolve_device, to_device
from deformable.engine.loop import loader_options
from deformable.nn import DeformConv2d, DeformRoIPool

SMALL = ["classify", "--model", "digitnet-dcnv2", "--limit", "32", "--batch-size", "16", "--no-progress"]


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``count`` CUDA devices (resolve_device only asks torch.cuda)."""

    def install(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return install


def test_auto_and_cpu_here():
    assert resolve_device("auto") == torch.device("cpu")  # no GPU on this machine
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="--device cuda: no CUDA device is available here"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match="run on cpu or cuda, not mps"):
        resolve_device("mps")


def test_cuda_devices_and_torchrun_local_rank(gpus, monkeypatch):
    gpus(2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process on this node
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="cuda:2 does not exist; this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_the_command_line_refuses_a_missing_gpu_in_one_line(tmp_path, capsys):
    assert train.main([*SMALL, "--epochs", "1", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("deformable train classify: error: --device cuda: no CUDA device is "
                           "available here (torch.cuda.is_available() is False); use --device cpu or auto")  # fmt: skip


def test_loader_options_by_device():
    assert loader_options(torch.device("cpu")) == {"num_workers": 0, "pin_memory": False,
                                                   "persistent_workers": False}  # fmt: skip
    cuda = loader_options(torch.device("cuda", 0))
    assert cuda["pin_memory"] and cuda["num_workers"] >= 1 and cuda["persistent_workers"]
    assert loader_options(torch.device("cuda", 0), workers=0)["num_workers"] == 0


def test_to_device_moves_nested_batches():
    batch = ([torch.zeros(2)], [{"boxes": torch.ones(1, 4), "image_id": 7}])
    moved = to_device(batch, torch.device("meta"))
    assert moved[0][0].device.type == "meta" and moved[1][0]["boxes"].device.type == "meta"
    assert moved[1][0]["image_id"] == 7 and isinstance(moved, tuple)


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_ops_under_autocast(amp, dtype):
    """A deformable conv runs in the autocast dtype (as F.conv2d); RoI pooling in float32, back
    in the input's dtype (as roi_align); both get gradients for every parameter."""
    cpu = torch.device("cpu")
    layer = DeformConv2d(4, 6, 3, padding=1, modulated=True)
    pool = DeformRoIPool(2, in_channels=6, hidden_channels=8, modulated=True)
    x = torch.rand(2, 4, 9, 9)
    with autocast(cpu, amp):
        y = layer(x)
        assert y.dtype == dtype == torch.nn.functional.conv2d(x, layer.weight).dtype
        pooled = pool(y, torch.tensor([[0, 1.0, 1.0, 6.0, 7.0], [1, 0.0, 2.0, 8.0, 8.0]]))
        assert pooled.dtype == dtype and pooled.shape == (2, 6, 2, 2)
    pooled.float().sum().backward()
    for module in (layer, pool):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
    assert grad_scaler(cpu, amp).is_enabled() == (amp == "fp16")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_on_the_cpu(tmp_path, amp):
    out = tmp_path / amp
    assert train.main([*SMALL, "--epochs", "1", "--amp", amp, "--device", "cpu", "--out", str(out)]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["config"]["amp"] == amp
    assert (state["scaler"] != {}) == (amp == "fp16")  # fp16 keeps its loss scale for a resume
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())


def test_a_gpu_checkpoint_evaluates_and_resumes_on_the_cpu(tmp_path, monkeypatch, capsys):
    """A run interrupted after epoch 1 whose checkpoint's tensors are tagged cuda:0 (as torch.save
    writes them from a GPU): this machine has none, and it still evaluates and resumes here."""
    from deformable.engine import loop

    def save_as_if_on_a_gpu_then_stop(path, state):
        with monkeypatch.context() as patch:
            patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
            save_checkpoint(path, state)
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(loop, "save_checkpoint", save_as_if_on_a_gpu_then_stop)
        train.main([*SMALL, "--epochs", "2", "--out", str(out)])
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain load would do here
        torch.load(out / "last.pt", weights_only=True)
    assert evaluate.main(["--checkpoint", str(out / "last.pt"), "--device", "cpu"]) == 0
    assert "epoch 1)" in capsys.readouterr().out
    assert train.main([*SMALL, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_data_parallel_backend_follows_the_device(monkeypatch):
    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: chosen.append(backend))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(str(device)))
    with distributed.session("cpu"):
        pass
    with distributed.session(torch.device("cuda", 1)):
        pass
    assert chosen == ["gloo", "cuda:1", "nccl"]
