"""`TrainConfig`: everything the fit loop needs that does not depend on the task, built from the plan's
``training`` section.

``TrainConfig.from_dict`` validates every key and value (unknown keys get a "did you mean"); ``to_dict`` gives
back plain JSON, which is what the run directory's ``config.json`` holds. The batch size, patch size and data
pipeline belong to the task, not here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from medlens.errors import InputError, did_you_mean

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("poly", "cosine", "step", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TRAINABLE = ("all", "head")


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer choice. ``momentum`` and ``nesterov`` are used by SGD only; ``betas`` by Adam/AdamW only."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.99
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, a pure function of the iteration (see :func:`medlens.engine.optim.lr_factor`).

    ``poly``: ``(1 - t) ** power``; ``cosine``: half a cosine to 0; ``step``: times ``gamma`` at each of
    ``milestones`` (iterations); ``constant``. All after a linear warm-up of ``warmup_iterations``.
    """

    name: str = "poly"
    warmup_iterations: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 0.9


@dataclass(frozen=True)
class ParamGroupsConfig:
    """Which parameters train, and at which learning rate (discriminative learning rates for fine-tuning).

    Attributes:
        trainable: ``"all"``, or ``"head"`` to freeze everything but the model's declared output head
            (``model.medlens_head``, set by :func:`medlens.models.create_model`).
        lr_multipliers: module-name prefix -> factor on the base learning rate, e.g.
            ``{"model.0": 0.1}``; the longest matching prefix wins; a factor of 0 freezes the module.
    """

    trainable: str = "all"
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Task-independent training settings.

    Attributes:
        iterations: optimizer steps in total.
        optimizer: see :class:`OptimizerConfig`.
        schedule: see :class:`ScheduleConfig`.
        val_every: validate every this many iterations (and after the last one); None = never.
        early_stopping_patience: stop after this many validations without improvement; None = off.
        checkpoint_every: write a resumable checkpoint every this many iterations; None = only by time/end.
        checkpoint_seconds: also checkpoint when this much wall time passed since the last one; None = off.
        precision: ``"auto"`` (bf16 autocast on CPUs with native bf16 and on CUDA where supported, else
            fp16 with a gradient scaler on CUDA, else fp32), ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        grad_clip: clip the global gradient norm to this value; None = off.
        seed: seed of the model's training randomness and of the task's batch stream.
        threads: torch CPU threads; None = one per available core (divided among local DDP processes).
        log_every: average the loss over, and log, this many iterations.
        param_groups: see :class:`ParamGroupsConfig`.
        time_limit_seconds: stop (validate, checkpoint, keep the best weights) once training has used this
            much wall time, even before ``iterations``; None = no limit. The planner sets it to the budget.
    """

    iterations: int = 1000
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    val_every: int | None = 100
    early_stopping_patience: int | None = None
    checkpoint_every: int | None = 500
    checkpoint_seconds: float | None = 600.0
    precision: str = "auto"
    grad_clip: float | None = 12.0
    seed: int = 0
    threads: int | None = None
    log_every: int = 10
    param_groups: ParamGroupsConfig = field(default_factory=ParamGroupsConfig)
    time_limit_seconds: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "training") -> TrainConfig:
        """Build and validate a config from JSON (missing keys take their defaults).

        Args:
            d: the ``training`` section.
            where: how to name the section in error messages (e.g. ``"plan.json: training"``).

        Raises:
            InputError: unknown key (with "did you mean") or a bad value, naming ``where.key``.
        """
        cfg = _parse(cls, d, where)
        if cfg.schedule.warmup_iterations >= cfg.iterations:
            raise InputError(
                f"{where}.schedule.warmup_iterations: must be smaller than iterations "
                f"({cfg.iterations}), got {cfg.schedule.warmup_iterations}"
            )
        ms = cfg.schedule.milestones
        if cfg.schedule.name == "step" and not ms:
            raise InputError(f"{where}.schedule.milestones: the 'step' schedule needs at least one milestone")
        if list(ms) != sorted(set(ms)):
            raise InputError(f"{where}.schedule.milestones: must be increasing, got {list(ms)}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (lists for tuples, dicts for the nested sections)."""
        out = dataclasses.asdict(self)
        out["optimizer"]["betas"] = list(self.optimizer.betas)
        out["schedule"]["milestones"] = list(self.schedule.milestones)
        out["param_groups"]["lr_multipliers"] = dict(self.param_groups.lr_multipliers)
        return out


# ---- validation ----------------------------------------------------------------------------------------------

Check = Callable[[Any, str], Any]
T = TypeVar("T")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(minimum: int) -> Check:
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(f"{where}: expected an integer >= {minimum}, got {value!r}")
        return value

    return check


def _float(low: float, high: float = float("inf"), open_low: bool = False) -> Check:
    def check(value: Any, where: str) -> float:
        ok = _number(value) and (value > low if open_low else value >= low) and value <= high
        if not ok:
            bound = f"> {low}" if open_low else f">= {low}"
            rng = f"a number {bound}" + (f" and <= {high}" if high != float("inf") else "")
            raise InputError(f"{where}: expected {rng}, got {value!r}")
        return float(value)

    return check


def _optional(check: Check) -> Check:
    def opt(value: Any, where: str) -> Any:
        return None if value is None else check(value, where)

    return opt


def _choice(choices: tuple[str, ...]) -> Check:
    def check(value: Any, where: str) -> str:
        if value not in choices:
            raise InputError(
                f"{where}: unknown value {value!r}.{did_you_mean(str(value), choices)} "
                f"Accepted: {', '.join(choices)}."
            )
        return str(value)

    return check


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{where}: expected true or false, got {value!r}")
    return value


def _betas(value: Any, where: str) -> tuple[float, float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(_number(b) and 0 <= b < 1 for b in value)
    ):
        raise InputError(f"{where}: expected two numbers in [0, 1), got {value!r}")
    return (float(value[0]), float(value[1]))


def _milestones(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise InputError(f"{where}: expected a list of iterations, got {value!r}")
    return tuple(_int(1)(v, f"{where}[{i}]") for i, v in enumerate(value))


def _multipliers(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: expected an object of module prefix -> factor, got {value!r}")
    return {str(k): _float(0.0)(v, f"{where}.{k}") for k, v in value.items()}


def _section(cls: type[T]) -> Check:
    def check(value: Any, where: str) -> T:
        return _parse(cls, value, where)

    return check


_CHECKS: dict[type, dict[str, Check]] = {
    OptimizerConfig: {
        "name": _choice(OPTIMIZERS),
        "lr": _float(0.0, open_low=True),
        "weight_decay": _float(0.0),
        "momentum": _float(0.0, 1.0),
        "nesterov": _bool,
        "betas": _betas,
    },
    ScheduleConfig: {
        "name": _choice(SCHEDULES),
        "warmup_iterations": _int(0),
        "milestones": _milestones,
        "gamma": _float(0.0, 1.0, open_low=True),
        "power": _float(0.0, open_low=True),
    },
    ParamGroupsConfig: {"trainable": _choice(TRAINABLE), "lr_multipliers": _multipliers},
    TrainConfig: {
        "iterations": _int(1),
        "optimizer": _section(OptimizerConfig),
        "schedule": _section(ScheduleConfig),
        "val_every": _optional(_int(1)),
        "early_stopping_patience": _optional(_int(1)),
        "checkpoint_every": _optional(_int(1)),
        "checkpoint_seconds": _optional(_float(0.0, open_low=True)),
        "precision": _choice(PRECISIONS),
        "grad_clip": _optional(_float(0.0, open_low=True)),
        "seed": _int(0),
        "threads": _optional(_int(1)),
        "log_every": _int(1),
        "param_groups": _section(ParamGroupsConfig),
        "time_limit_seconds": _optional(_float(0.0, open_low=True)),
    },
}


def _parse(cls: type[T], d: Any, where: str) -> T:
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise InputError(f"{where}: expected a JSON object, got {d!r}")
    checks = _CHECKS[cls]
    for key in d:
        if key not in checks:
            raise InputError(
                f"{where}: unknown key {key!r}.{did_you_mean(str(key), list(checks))} "
                f"Accepted: {', '.join(checks)}."
            )
    return cls(**{key: checks[key](value, f"{where}.{key}") for key, value in d.items()})
