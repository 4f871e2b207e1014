"""Per-epoch metrics to a CSV file and to TensorBoard."""

from __future__ import annotations

import csv
import io
import os

from deformable.engine.checkpoint import WriteError, durable_write


class MetricsLogger:
    """Keeps ``<out>/metrics.csv`` at one row per finished epoch and sends the same scalars to
    TensorBoard (``<out>/tensorboard``).

    On resume, rows of epochs at or after ``start_epoch`` are dropped first, so the file holds
    each finished epoch once. The file is rewritten whole and durably after every epoch
    (:func:`~deformable.engine.checkpoint.durable_write`): a crash never leaves it half written.
    """

    def __init__(self, out: str, start_epoch: int = 0, tensorboard: bool = True) -> None:
        self.path = os.path.join(out, "metrics.csv")
        self.rows: list[dict] = []
        if os.path.exists(self.path) and start_epoch > 0:
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < start_epoch]
        self._write()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_epoch)
            except OSError as error:
                raise WriteError(f"cannot write the TensorBoard log in {out!r}: {error}") from error

    def _write(self) -> None:
        text = io.StringIO()
        if self.rows:
            writer = csv.DictWriter(text, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        durable_write(self.path, lambda f: f.write(text.getvalue().encode()))

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        self.rows.append({"epoch": epoch, **metrics})
        self._write()
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
