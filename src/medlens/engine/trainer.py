"""The one fit loop, shared by every task.

``Trainer(model, task, config, run_dir).fit()`` trains for ``config.iterations`` optimizer steps on the task's
batch stream, validates every ``val_every`` steps, keeps the best weights by ``task.score_key``, stops early
when asked, and writes a run directory:

===========================  ===============================================================================
``model.safetensors``        best weights by ``score_key`` (final weights if no validation ever scored)
``last.safetensors``         weights at the last checkpoint         \\  committed together as one atomic
``optimizer.safetensors``    optimizer state at the last checkpoint   > unit (see engine.checkpoint); a new
``trainer_state.json``       iteration, best score, history, RNG     /  best always triggers a checkpoint
``config.json``              the resolved :class:`TrainConfig` (precision and threads as used)
``versions.json``            python, torch, monai, numpy, medlens, platform, device
``history.json``             mean loss and learning rate per ``log_every`` steps, metrics per validation
``tb/``                      TensorBoard event files (when TensorBoard is installed)
===========================  ===============================================================================

``fit(resume=True)`` continues from the last checkpoint and, with the same seed (fp32, one thread), ends with
exactly the weights of an uninterrupted run. Under ``torchrun`` the loop runs data-parallel (see
:mod:`medlens.engine.distributed`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlens._fs import atomic_write_json
from medlens.engine import checkpoint as ckpt
from medlens.engine.config import TrainConfig
from medlens.engine.distributed import DistContext
from medlens.engine.hooks import Hook, LogHook, ProgressHook, TensorBoardHook
from medlens.engine.optim import apply_lr, build_optimizer, lr_factor
from medlens.engine.runtime import (
    autocast_dtype,
    collect_versions,
    configure_threads,
    device_for,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from medlens.engine.task import TrainTask
from medlens.errors import RunError, TrainingError

log = logging.getLogger("medlens.engine")

STATE_VERSION = 1


@dataclass
class TrainResult:
    """The outcome of :meth:`Trainer.fit`.

    Attributes:
        run_dir: the run directory.
        iterations: optimizer steps completed (across resumes).
        best_score: best validation ``score_key`` (None if never validated).
        best_iteration: the iteration of ``best_score``.
        stopped_early: whether early stopping ended training.
        seconds: training wall time (across resumes).
        history: ``{"train": [{"iteration", "loss", "lr", "s_per_it"}], "val": [{"iteration", **metrics}]}``.
    """

    run_dir: Path
    iterations: int
    best_score: float | None
    best_iteration: int | None
    stopped_early: bool
    seconds: float
    history: dict[str, list[dict[str, Any]]]

    @property
    def weights(self) -> Path:
        """The best weights (``model.safetensors``)."""
        return self.run_dir / ckpt.BEST_WEIGHTS


@dataclass
class _State:
    """Everything about progress that a checkpoint must carry (besides weights, optimizer and RNG)."""

    iteration: int = 0
    best_score: float | None = None
    best_iteration: int | None = None
    validations_since_best: int = 0
    stopped_early: bool = False
    out_of_time: bool = False
    seconds: float = 0.0
    history: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"train": [], "val": []})


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON: numbers as floats with NaN/inf as null (JSON has no NaN); other values unchanged."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        try:
            value = float(v)
        except (TypeError, ValueError):
            out[str(k)] = v
            continue
        out[str(k)] = value if math.isfinite(value) else None
    return out


class Trainer:
    """Train ``model`` on ``task`` with ``config``, writing ``run_dir`` (see the module docstring).

    Args:
        model: the network (e.g. from :func:`medlens.models.create_model`); seed before building it for
            reproducible initial weights.
        task: a :class:`~medlens.engine.task.TrainTask`.
        config: a :class:`TrainConfig` or its JSON form.
        run_dir: where the run is written (created if needed).
        hooks: extra :class:`~medlens.engine.hooks.Hook` objects, called after the built-in ones.
        progress: show a rich progress bar; otherwise log a line every ``log_every`` steps.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or a torch device.
    """

    def __init__(
        self,
        model: nn.Module,
        task: TrainTask,
        config: TrainConfig | Mapping[str, Any],
        run_dir: str | Path,
        hooks: Iterable[Hook] = (),
        progress: bool = True,
        device: str | torch.device = "auto",
    ) -> None:
        if not isinstance(task, TrainTask):
            raise TypeError(
                f"{type(task).__name__} is not a TrainTask (needs score_key, batches, loss, validate)"
            )
        self.model = model
        self.task = task
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.run_dir = Path(run_dir)
        self.user_hooks = list(hooks)
        self.progress = progress
        self._device_spec = device
        self._state = _State()
        self.hooks: list[Hook] = []
        self.precision = "fp32"
        self._time_step = 0  # the iteration the elapsed fraction of the time limit corresponds to

    # ---- read-only views for hooks ---------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Optimizer steps completed so far."""
        return self._state.iteration

    @property
    def best_score(self) -> float | None:
        """Best validation score so far."""
        return self._state.best_score

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train until ``config.iterations`` or early stopping; return the :class:`TrainResult`.

        Args:
            resume: continue from the run directory's last checkpoint (a fresh start if there is none).

        Raises:
            RunError: ``run_dir`` already holds a checkpoint and ``resume`` is False.
            TrainingError: the loss became NaN/inf, or the task broke its contract.
        """
        self.dist = DistContext.from_env(device_for(self._device_spec))
        try:
            return self._fit(resume)
        finally:
            for hook in self.hooks:
                hook.close()
            self.dist.close()

    def _fit(self, resume: bool) -> TrainResult:
        cfg, dist = self.config, self.dist
        self.hooks = []
        threads = configure_threads(cfg.threads)
        self.device = dist.device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model.to(self.device).train()
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self._start(resume)
        self.net = dist.wrap(self.model)
        if dist.is_main:
            resolved = {**cfg.to_dict(), "precision": self.precision, "threads": threads}
            atomic_write_json(self.run_dir / "config.json", {**resolved, "world_size": dist.world_size})
            atomic_write_json(self.run_dir / "versions.json", collect_versions(self.device))
            self.hooks = [
                ProgressHook() if self.progress else LogHook(),
                TensorBoardHook(self.run_dir / "tb"),
            ]
            log.info(
                "training %d iterations on %s (%s, %d threads, %d process(es)) into %s",
                cfg.iterations, self.device, self.precision, threads, dist.world_size, self.run_dir,
            )  # fmt: skip
        self.hooks += self.user_hooks
        for hook in self.hooks:
            hook.on_fit_start(self)

        st = self._state
        started = time.monotonic()
        self._last_checkpoint = time.monotonic()
        batches = iter(self.task.batches(cfg.seed + dist.rank, st.iteration))
        window: list[float] = []
        window_start = time.monotonic()
        lrs: list[float] = []
        while st.iteration < cfg.iterations and not st.stopped_early and not st.out_of_time:
            # Under a time limit the schedule follows whichever is further along, iterations or time, so a
            # run cut short by a slow machine still ends with its learning rate annealed.
            step = max(st.iteration, min(self._time_step, cfg.iterations - 1))
            lrs = apply_lr(self.optimizer, lr_factor(cfg.schedule, step, cfg.iterations))
            window.append(self._step(self._next_batch(batches)))
            st.iteration += 1
            for hook in self.hooks:
                hook.on_step_end(self, st.iteration)
            if cfg.time_limit_seconds is not None and st.iteration % cfg.log_every == 0:
                st.out_of_time = self._time_is_up(st.seconds + time.monotonic() - started)
            last = st.iteration == cfg.iterations or st.out_of_time
            if st.iteration % cfg.log_every == 0 or last:
                s_per_it = (time.monotonic() - window_start) / len(window)
                logs = {"loss": dist.mean(sum(window) / len(window)), "lr": lrs[0], "s_per_it": s_per_it}
                st.history["train"].append({"iteration": st.iteration, **logs})
                for hook in self.hooks:
                    hook.on_log(self, st.iteration, logs)
                window, window_start = [], time.monotonic()
            improved = self._validation_due(last) and self._validate()
            if self._checkpoint_due(last or st.stopped_early or improved):
                st.seconds += time.monotonic() - started
                started = time.monotonic()
                self._checkpoint()
        st.seconds += time.monotonic() - started

        self._restore_best()
        result = TrainResult(
            run_dir=self.run_dir,
            iterations=st.iteration,
            best_score=st.best_score,
            best_iteration=st.best_iteration,
            stopped_early=st.stopped_early,
            seconds=st.seconds,
            history=st.history,
        )
        for hook in self.hooks:
            hook.on_fit_end(self, result)
        return result

    def _next_batch(self, batches: Any) -> dict[str, Any]:
        try:
            batch = next(batches)
        except StopIteration:
            raise TrainingError(
                f"{type(self.task).__name__}.batches() ended at iteration {self._state.iteration}; "
                "it must be an endless stream"
            ) from None
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
        }

    def _autocast(self) -> AbstractContextManager[Any]:
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _step(self, batch: dict[str, Any]) -> float:
        """One optimizer step; returns the loss."""
        with self._autocast():
            loss = self.task.loss(self.net, batch)
        value = float(loss.detach())
        if not math.isfinite(value) and self.precision != "fp16":  # fp16: the scaler skips such steps
            lr = self.optimizer.param_groups[0]["lr"]
            raise TrainingError(
                f"training diverged at iteration {self._state.iteration + 1}: the loss is {value} "
                f"(lower optimizer.lr, now {lr:.3g}, set grad_clip, or use precision 'fp32')"
            )
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _time_is_up(self, elapsed: float) -> bool:
        """Rank 0 decides whether the time limit is reached, and how far along in time training is; every
        rank learns both (so the learning rate stays identical across ranks)."""
        limit = self.config.time_limit_seconds
        decision = None
        if self.dist.is_main and limit is not None:
            decision = (elapsed >= limit, int(self.config.iterations * elapsed / limit))
        up, self._time_step = self.dist.broadcast(decision)
        if up:
            log.warning(
                "time limit of %.0f s reached at iteration %d of %d: stopping with the best weights so far",
                limit, self._state.iteration, self.config.iterations,
            )  # fmt: skip
        return up

    def _validation_due(self, last: bool) -> bool:
        every = self.config.val_every
        return every is not None and (last or self._state.iteration % every == 0)

    def _validate(self) -> bool:
        """Rank 0 validates and decides on best weights and early stopping; every rank learns the result.

        Returns:
            Whether the score improved (the caller then checkpoints, which writes the best weights).
        """
        st, key = self._state, self.task.score_key
        decision = None
        if self.dist.is_main:
            self.model.eval()
            with torch.no_grad(), self._autocast():
                metrics = dict(self.task.validate(self.model))
            self.model.train()
            if key not in metrics:
                raise TrainingError(
                    f"{type(self.task).__name__}.validate() returned no {key!r} (its score_key); got {sorted(metrics)}"
                )
            score = float(metrics[key])
            improved = math.isfinite(score) and (st.best_score is None or score > st.best_score)
            if improved:
                st.best_score, st.best_iteration, st.validations_since_best = score, st.iteration, 0
            else:
                st.validations_since_best += 1
            patience = self.config.early_stopping_patience
            st.stopped_early = patience is not None and st.validations_since_best >= patience
            if st.stopped_early:
                log.info("early stopping at %d: no better %s for %d validations", st.iteration, key, patience)
            st.history["val"].append({"iteration": st.iteration, **_finite_metrics(metrics)})
            atomic_write_json(self.run_dir / "history.json", st.history)
            decision = (
                metrics,
                improved,
                st.best_score,
                st.best_iteration,
                st.validations_since_best,
                st.stopped_early,
            )
        # The broadcast is also the barrier: the other ranks wait here while rank 0 validates.
        metrics, improved, st.best_score, st.best_iteration, st.validations_since_best, st.stopped_early = (
            self.dist.broadcast(decision)
        )
        if not self.dist.is_main:
            st.history["val"].append({"iteration": st.iteration, **_finite_metrics(metrics)})
        for hook in self.hooks:
            hook.on_validation_end(self, st.iteration, metrics, improved)
        return bool(improved)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def _checkpoint_due(self, final: bool) -> bool:
        cfg = self.config
        if final or (cfg.checkpoint_every and self._state.iteration % cfg.checkpoint_every == 0):
            return True
        if cfg.checkpoint_seconds is None:
            return False
        # Wall clocks differ between ranks, so rank 0's clock decides for everyone.
        return bool(self.dist.broadcast(time.monotonic() - self._last_checkpoint >= cfg.checkpoint_seconds))

    def _checkpoint(self) -> None:
        st = self._state
        rngs = self.dist.gather(rng_state())  # also lines the ranks up before the write
        if self.dist.is_main:
            state = {
                "medlens_trainer_state": STATE_VERSION,
                "iteration": st.iteration,
                "iterations": self.config.iterations,
                "best_score": st.best_score,
                "best_iteration": st.best_iteration,
                "validations_since_best": st.validations_since_best,
                "stopped_early": st.stopped_early,
                "out_of_time": st.out_of_time,
                "seconds": st.seconds,
                "precision": self.precision,
                "world_size": self.dist.world_size,
                "schedule": {
                    "name": self.config.schedule.name,
                    "factor": lr_factor(self.config.schedule, st.iteration, self.config.iterations),
                    "lr": [g["lr"] for g in self.optimizer.param_groups],
                },
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "history": st.history,
            }
            best = None
            if st.best_iteration == st.iteration:
                best = {"iteration": st.iteration, "score_key": self.task.score_key, "score": st.best_score}
            elif st.best_iteration is None and (st.iteration == self.config.iterations or st.out_of_time):
                best = {"iteration": st.iteration}  # nothing validated (or scored): the final weights
            ckpt.write_checkpoint(self.run_dir, self.model, self.optimizer, state, best=best)
            atomic_write_json(self.run_dir / "history.json", st.history)
        self.dist.barrier()
        self._last_checkpoint = time.monotonic()
        for hook in self.hooks:
            hook.on_checkpoint(self, st.iteration)

    def _start(self, resume: bool) -> None:
        """Seed a fresh run, or restore model, optimizer, scaler, RNG and progress from the last checkpoint."""
        seed = self.config.seed + self.dist.rank
        state = ckpt.read_checkpoint(self.run_dir)
        if state is not None and not resume:
            raise RunError(
                f"{self.run_dir}: already holds a training run (checkpoint at iteration {state['iteration']}); "
                "resume it, or choose another run directory"
            )
        if state is None:
            if resume:
                log.info("%s: no checkpoint to resume from; starting from scratch", self.run_dir)
            seed_everything(seed)
            return
        ckpt.load_weights(self.model, self.run_dir / ckpt.LAST_WEIGHTS)
        ckpt.load_optimizer(self.optimizer, self.run_dir / ckpt.OPTIMIZER)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            log.warning(
                "checkpoint was written by %d process(es), now %d: reseeding", len(rngs), self.dist.world_size
            )
            seed_everything(seed + state["iteration"])
        self._state = _State(
            iteration=state["iteration"],
            best_score=state["best_score"],
            best_iteration=state["best_iteration"],
            validations_since_best=state["validations_since_best"],
            stopped_early=state["stopped_early"],
            out_of_time=bool(state.get("out_of_time", False)),
            seconds=state["seconds"],
            history=state["history"],
        )
        log.info("resuming %s at iteration %d", self.run_dir, self._state.iteration)

    def _restore_best(self) -> None:
        """Leave the best weights in the model when training ends."""
        if self._state.best_iteration is not None and self._state.best_iteration != self._state.iteration:
            ckpt.load_weights(self.model, self.run_dir / ckpt.BEST_WEIGHTS)
