"""Classification: accuracy and loss of a classifier, and the training loop's classifier use."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deformable.engine.devices import model_device
from deformable.engine.distributed import all_reduce_sum, shard
from deformable.engine.loop import TrainConfig, train_loop

__all__ = ["classification_loss", "evaluate", "fit"]


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data``, on the model's device (sharded
    under torchrun)."""
    model.eval()
    device = model_device(model)
    correct = loss = count = 0.0
    for images, labels in DataLoader(shard(data), batch_size=batch_size):
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    correct, loss, count = all_reduce_sum([correct, loss, count])
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1)}


def classification_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of a batch ``(images, labels)``, and its size."""
    images, labels = batch
    return F.cross_entropy(model(images).float(), labels), len(labels)


def fit(build_model: Callable[[], nn.Module], train_set: Dataset, val_set: Dataset,
        config: TrainConfig, out: str, *, resume: bool = False, progress: bool = True,
        extra_state: dict | None = None, device: torch.device | str = "cpu",
        workers: int | None = None) -> dict:  # fmt: skip
    """:func:`deformable.engine.loop.train_loop` for a classifier: cross-entropy loss,
    validation accuracy and loss."""
    return train_loop(build_model, train_set, val_set, config, out, loss=classification_loss,
                      evaluate=evaluate, resume=resume, progress=progress, extra_state=extra_state,
                      device=device, workers=workers)  # fmt: skip
