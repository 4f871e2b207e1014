"""torch.distributed as the training commands use it: started by ``torchrun`` (gloo on CPU, nccl
on GPU), a no-op in a single process."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["rank_and_world", "session", "shard", "all_reduce_sum", "all_gather_list", "barrier",
           "broadcast_buffers"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def session(device: torch.device | str = "cpu") -> Iterator[bool]:
    """Joins the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) for the block, and
    leaves it after; yields whether it did. NCCL when the processes train on GPUs (each on its
    own, ``cuda:LOCAL_RANK``), gloo on CPUs. Several machines: torchrun's own rendezvous
    (``--nnodes``, ``--rdzv-endpoint``) sets the same variables."""
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        yield False
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield True
    finally:
        dist.destroy_process_group()


def shard(data):
    """This process's share of ``data`` for evaluation: every ``world``-th item from ``rank``, so
    each item is seen once over the processes (``DistributedSampler`` would repeat some to even
    out the shards). ``data`` itself in a single process."""
    rank, world = rank_and_world()
    if world == 1:
        return data
    return torch.utils.data.Subset(data, range(rank, len(data), world))


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over the processes (float64)."""
    if rank_and_world()[1] == 1:
        return values
    # NCCL reduces GPU tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_list(items: list) -> list:
    """The concatenation, in rank order, of every process's ``items`` (picklable objects)."""
    world = rank_and_world()[1]
    if world == 1:
        return items
    gathered: list = [None] * world
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def barrier() -> None:
    """Waits for every process (nothing to wait for in a single process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (e.g. BatchNorm running statistics) copied into every process's ``model``.

    DistributedDataParallel syncs buffers at the start of each forward, so after the last
    training step each process holds its own running statistics; broadcasting them before a
    sharded evaluation makes every process score rank 0's model, the one it saves.
    """
    if rank_and_world()[1] > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, 0)
