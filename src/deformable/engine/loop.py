"""The one training loop (resumable, reproducible, data-parallel under torchrun) that every task
uses: classification (:mod:`deformable.engine.classification`), detection
(:mod:`deformable.engine.detection`).

Reproducible: the model is initialised from ``seed``, the order of epoch ``e`` is drawn from
``seed + e`` alone, and the RNG state is saved with every checkpoint, so a run interrupted after
any finished epoch and resumed with ``resume=True`` ends with the same weights as one that never
stopped (the deformable kernels are deterministic too). A checkpoint (``last.pt``) is written at
the end of every epoch, atomically and durably (:mod:`deformable.engine.checkpoint`).

Data-parallel: when ``torch.distributed`` is initialised (``torchrun``), every process trains on
its shard (``DistributedSampler``), gradients are averaged by ``DistributedDataParallel``,
metrics are reduced over processes, and only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from deformable.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deformable.engine.devices import AMP_DTYPES, autocast, grad_scaler, to_device
from deformable.engine.distributed import all_reduce_sum, rank_and_world
from deformable.engine.metrics import MetricsLogger
from deformable.nn import param_groups


class ConfigError(ValueError):
    """A training setting that cannot work; ``field`` names it, ``reason`` says what is expected."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


class ResumeError(CheckpointError):
    """A checkpoint to resume from was trained with other settings."""


@dataclass
class TrainConfig:
    """The settings of one training run (a resumed run must keep them all).

    Raises ConfigError for a setting that cannot work (a non-finite or non-positive learning
    rate, an empty epoch count, ...).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: learning-rate multiplier of the offset / mask branches of deformable convolutions
    offset_lr_mult: float = 1.0
    #: ... and of deformable RoI pooling (DCNv1's 0.01)
    roi_offset_lr_mult: float = 0.01
    seed: int = 0
    #: mixed precision: ``none``, ``bf16`` or ``fp16`` (autocast; fp16 with a gradient scaler)
    amp: str = field(default="none", metadata={"choices": tuple(AMP_DTYPES)})

    def __post_init__(self) -> None:
        if self.amp not in AMP_DTYPES:
            raise ConfigError("amp", f"must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("seed", f"must be an integer >= 0, got {self.seed!r}")
        for name, lowest in (("lr", "> 0"), ("weight_decay", ">= 0"), ("offset_lr_mult", ">= 0"),
                             ("roi_offset_lr_mult", ">= 0")):  # fmt: skip
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value < 0 or (lowest == "> 0" and value == 0):
                raise ConfigError(name, f"must be a finite number {lowest}, got {value!r}")


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``name: A in the checkpoint, B now`` for every setting that differs (one level of dicts)."""
    lines = []
    for key in sorted(set(saved) | set(now), key=str):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and not prefix:
            lines += _differences(old, new, f"{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} in the checkpoint, {new!r} now")
    return lines


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """``iterable`` behind a tqdm bar on stderr when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def _saved_config(state: dict) -> dict:
    """The checkpoint's config, with the defaults of settings added since it was written."""
    saved = dict(state.get("config") or {})
    for f in fields(TrainConfig):
        saved.setdefault(f.name, f.default)
    return saved


def loader_options(device: torch.device, workers: int | None = None) -> dict:
    """DataLoader options for ``device``: on CUDA, worker processes and pinned memory (the GPU
    must not wait for the next batch); on the CPU the main process loads (the cores compute)."""
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    return {"num_workers": workers, "pin_memory": device.type == "cuda",
            "persistent_workers": workers > 0}  # fmt: skip


def train_loop(build_model: Callable[[], nn.Module], train_set: Dataset, val_set: Dataset,
               config: TrainConfig, out: str, *, loss: Callable, evaluate: Callable,
               collate_fn: Callable | None = None, resume: bool = False, progress: bool = True,
               extra_state: dict | None = None, device: torch.device | str = "cpu",
               workers: int | None = None) -> dict:  # fmt: skip
    """Train ``build_model()`` on ``train_set`` on ``device``, evaluating on ``val_set`` after
    every epoch.

    ``loss(model, batch)`` returns ``(loss, samples in the batch)`` for a batch already on the
    model's device (it runs under autocast when ``config.amp`` asks for it);
    ``evaluate(model, val_set)`` a dict of metrics (the first one is printed), on the model's
    device. Writes ``<out>/last.pt`` (model, optimiser, scheduler, gradient scaler, RNG states,
    history, config and ``extra_state``, e.g. how to rebuild the model) and
    ``<out>/metrics.csv`` / ``<out>/tensorboard`` after every epoch. With ``resume=True`` it
    continues from ``<out>/last.pt`` (a ResumeError naming every setting — ``config`` or
    ``extra_state`` — that differs from the checkpoint's), on any device: a checkpoint written on
    a GPU resumes on the CPU and the other way round. ``workers``: DataLoader worker processes
    (default: 0 on the CPU, up to 4 with pinned memory on CUDA).

    Returns the history: per-epoch ``train_loss``, ``val_<metric>`` and ``seconds``.
    """
    rank, world = rank_and_world()
    device = torch.device(device)
    path = os.path.join(out, "last.pt")
    torch.manual_seed(config.seed)
    model = build_model().to(device)  # initialised on the CPU: the same weights on any device
    groups = param_groups(model, lr=config.lr, offset_lr_mult=config.offset_lr_mult,
                          roi_offset_lr_mult=config.roi_offset_lr_mult)  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scaler = grad_scaler(device, config.amp)
    steps_per_epoch = math.ceil(len(train_set) / world / config.batch_size)
    # one peak per group: a single max_lr would put the offset groups at the base rate
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                    total_steps=config.epochs * steps_per_epoch)  # fmt: skip
    history: dict = {"train_loss": [], "seconds": []}
    start_epoch = 0
    if resume and os.path.exists(path):
        state = load_checkpoint(path)
        saved = {"config": _saved_config(state), **{k: state.get(k) for k in extra_state or {}}}
        differences = _differences(saved, {"config": asdict(config), **(extra_state or {})})
        if differences:
            raise ResumeError(
                f"cannot resume {path!r}: it was trained with other settings ("
                + "; ".join(d.removeprefix("config.") for d in differences)
                + "). Resume with the checkpoint's settings, or start a new run in another folder"
                " (a run's schedule depends on all of them, so a changed run cannot continue it)"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # moves its state to the parameters' device
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history = state["history"]
        start_epoch = state["epoch"] + 1
    ddp_devices = [device.index] if device.type == "cuda" else None
    trained = nn.parallel.DistributedDataParallel(model, device_ids=ddp_devices) if world > 1 else model
    logger = MetricsLogger(out, start_epoch) if rank == 0 else None
    options = loader_options(device, workers)
    try:
        for epoch in range(start_epoch, config.epochs):
            # the order of this epoch depends on (seed, epoch) only: resuming replays it
            if world > 1:
                sampler = DistributedSampler(train_set, shuffle=True, seed=config.seed)
                sampler.set_epoch(epoch)
            else:
                sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(
                    config.seed * 100_003 + epoch))  # fmt: skip
            loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler,
                                collate_fn=collate_fn, **options)  # fmt: skip
            trained.train()
            start, total, seen = time.perf_counter(), 0.0, 0
            for batch in progress_bar(loader, len(loader), f"epoch {epoch + 1}/{config.epochs}",
                                   progress and rank == 0):  # fmt: skip
                with autocast(device, config.amp):
                    value, count = loss(trained, to_device(batch, device))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(value).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total += value.item() * count
                seen += count
            total, seen = all_reduce_sum([total, seen])
            metrics = evaluate(model, val_set)
            history["train_loss"].append(total / max(seen, 1))
            for name, value in metrics.items():
                history.setdefault(f"val_{name}", []).append(value)
            history["seconds"].append(time.perf_counter() - start)
            if rank == 0:
                # metrics first: a run killed between the two re-logs this epoch on resume
                logger.log(epoch, {"train/loss": history["train_loss"][-1],
                                   **{f"val/{k}": v for k, v in metrics.items()},
                                   "seconds": history["seconds"][-1]})  # fmt: skip
                headline, value = next(iter(metrics.items()))
                print(f"epoch {epoch + 1}/{config.epochs}: train loss {history['train_loss'][-1]:.4f}, "
                      f"val {headline} {value:.4f}", file=sys.stderr)  # fmt: skip
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "rng": torch.get_rng_state(), "epoch": epoch, "history": history,
                         "config": asdict(config), **(extra_state or {})}  # fmt: skip
                if device.type == "cuda":
                    state["cuda_rng"] = torch.cuda.get_rng_state(device)
                save_checkpoint(path, state)
    finally:
        if logger is not None:
            logger.close()
    return history
