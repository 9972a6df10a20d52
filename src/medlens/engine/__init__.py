"""The training engine: one fit loop with hooks, shared by every task.

A task implements :class:`TrainTask` (batches, loss, validate); :class:`Trainer` does the rest: optimizer and
schedule, mixed precision, checkpoints and resume, early stopping, progress, TensorBoard and DDP.
"""

from __future__ import annotations

from medlens.engine.checkpoint import LoadReport, load_weights, read_metadata, save_weights
from medlens.engine.config import OptimizerConfig, ParamGroupsConfig, ScheduleConfig, TrainConfig
from medlens.engine.hooks import Hook
from medlens.engine.runtime import configure_threads, device_for, resolve_precision, seed_everything
from medlens.engine.task import TrainTask
from medlens.engine.trainer import Trainer, TrainResult

__all__ = [
    "Hook",
    "LoadReport",
    "OptimizerConfig",
    "ParamGroupsConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "TrainTask",
    "Trainer",
    "configure_threads",
    "device_for",
    "load_weights",
    "read_metadata",
    "resolve_precision",
    "save_weights",
    "seed_everything",
]
