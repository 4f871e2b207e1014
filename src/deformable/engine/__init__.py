"""Training and evaluation: the one training loop, its classification and detection uses,
checkpoints, metrics logs and torch.distributed."""

from deformable.engine.checkpoint import CheckpointError, WriteError, load_checkpoint, save_checkpoint
from deformable.engine.classification import evaluate, fit
from deformable.engine.loop import ConfigError, ResumeError, TrainConfig, train_loop
from deformable.engine.metrics import MetricsLogger

__all__ = ["CheckpointError", "ConfigError", "MetricsLogger", "ResumeError", "TrainConfig", "WriteError",
           "evaluate", "fit", "load_checkpoint", "save_checkpoint", "train_loop"]
