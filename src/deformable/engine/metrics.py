"""Per-epoch metrics to a CSV file and to TensorBoard."""

from __future__ import annotations

import csv
import os


class MetricsLogger:
    """Appends one row per epoch to ``<out>/metrics.csv`` and the same scalars to TensorBoard
    (``<out>/tensorboard``). On resume, rows of epochs at or after ``start_epoch`` are dropped
    first, so the file always holds each finished epoch once.
    """

    def __init__(self, out: str, start_epoch: int = 0, tensorboard: bool = True) -> None:
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "metrics.csv")
        rows = []
        if os.path.exists(self.path) and start_epoch > 0:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < start_epoch]
        self.fields: list[str] | None = list(rows[0]) if rows else None
        with open(self.path, "w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(rows)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_epoch)

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        row = {"epoch": epoch, **metrics}
        new_file = self.fields is None
        if new_file:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
