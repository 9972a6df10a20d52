"""Hooks: how code outside the fit loop watches (or stops) it.

A hook overrides any of the methods of :class:`Hook`. The trainer calls user hooks on every rank, after its
own; the built-in ones here (progress bar or log lines, TensorBoard) run on rank 0 only. An exception raised
by a hook stops training; the last checkpoint stays valid, so ``fit(resume=True)`` picks up from it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medlens.engine.trainer import Trainer, TrainResult

log = logging.getLogger("medlens.engine")


class Hook:
    """Base class of trainer hooks; every method is a no-op until overridden."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once the model, optimizer and (on resume) checkpoint are ready, before the first step."""

    def on_step_end(self, trainer: Trainer, iteration: int) -> None:
        """Called after each optimizer step; ``iteration`` counts completed steps."""

    def on_log(self, trainer: Trainer, iteration: int, logs: dict[str, float]) -> None:
        """Called every ``log_every`` steps with ``loss`` (mean over the window), ``lr`` and ``s_per_it``."""

    def on_validation_end(
        self, trainer: Trainer, iteration: int, metrics: dict[str, float], improved: bool
    ) -> None:
        """Called after each validation; ``improved`` says whether it produced new best weights."""

    def on_checkpoint(self, trainer: Trainer, iteration: int) -> None:
        """Called right after a checkpoint at ``iteration`` was committed on disk."""

    def on_fit_end(self, trainer: Trainer, result: TrainResult) -> None:
        """Called when training ends normally (not after an exception)."""

    def close(self) -> None:
        """Release resources; always called when ``fit`` returns or raises."""


def _fmt(metrics: dict[str, float], keys: tuple[str, ...] = ()) -> str:
    shown = {k: metrics[k] for k in keys if k in metrics} if keys else metrics
    return " ".join(f"{k} {v:.4g}" for k, v in shown.items() if isinstance(v, int | float))


class LogHook(Hook):
    """Training progress as ``logging`` lines (used when the progress bar is off)."""

    def on_log(self, trainer: Trainer, iteration: int, logs: dict[str, float]) -> None:
        total = trainer.config.iterations
        eta = (total - iteration) * logs.get("s_per_it", math.nan)
        log.info("iteration %d/%d %s (ETA %.0f s)", iteration, total, _fmt(logs), eta)

    def on_validation_end(
        self, trainer: Trainer, iteration: int, metrics: dict[str, float], improved: bool
    ) -> None:
        best = " (new best)" if improved else ""
        log.info("validation at %d: %s%s", iteration, _fmt(metrics), best)


class ProgressHook(Hook):
    """A rich progress bar with ETA, the running loss and the latest validation score."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Any = None
        self._loss = ""
        self._score = ""

    def on_fit_start(self, trainer: Trainer) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=trainer.config.iterations, completed=trainer.iteration, status=""
        )

    def _update(self, **kwargs: Any) -> None:
        if self._progress is not None:
            status = " ".join(s for s in (self._loss, self._score) if s)
            self._progress.update(self._task, status=status, **kwargs)

    def on_step_end(self, trainer: Trainer, iteration: int) -> None:
        self._update(completed=iteration)

    def on_log(self, trainer: Trainer, iteration: int, logs: dict[str, float]) -> None:
        self._loss = f"loss {logs['loss']:.4g}"
        self._update()

    def on_validation_end(
        self, trainer: Trainer, iteration: int, metrics: dict[str, float], improved: bool
    ) -> None:
        key = trainer.task.score_key
        best = trainer.best_score
        self._score = f"{key} {metrics.get(key, math.nan):.4g} (best {best:.4g})" if best is not None else ""
        self._update()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class TensorBoardHook(Hook):
    """Scalars (loss, learning rate, validation metrics) as TensorBoard event files in ``<run_dir>/tb``.

    Does nothing when TensorBoard is not installed.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.debug("tensorboard is not installed; no event logs")
            return
        # purge_step drops events a crashed run logged after its last checkpoint, so curves do not overlap.
        self._writer = SummaryWriter(str(self.log_dir), purge_step=trainer.iteration or None)

    def on_log(self, trainer: Trainer, iteration: int, logs: dict[str, float]) -> None:
        if self._writer is not None:
            for key, value in logs.items():
                self._writer.add_scalar(f"train/{key}", value, iteration)

    def on_validation_end(
        self, trainer: Trainer, iteration: int, metrics: dict[str, float], improved: bool
    ) -> None:
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(f"val/{key}", value, iteration)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
