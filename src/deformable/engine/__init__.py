"""Training and evaluation loops, checkpoints and metrics logs."""

from deformable.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deformable.engine.classification import TrainConfig, evaluate, fit
from deformable.engine.metrics import MetricsLogger

__all__ = ["CheckpointError", "MetricsLogger", "TrainConfig", "evaluate", "fit", "load_checkpoint",
           "save_checkpoint"]
