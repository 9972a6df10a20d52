"""Optimizer, parameter groups and the learning-rate schedule.

The schedule is a pure function of the iteration (:func:`lr_factor`), applied to each parameter group's
``base_lr`` before every step; resuming therefore needs nothing but the iteration number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medlens.engine.checkpoint import unwrap
from medlens.engine.config import ParamGroupsConfig, ScheduleConfig, TrainConfig
from medlens.errors import InputError, did_you_mean


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def build_param_groups(
    model: nn.Module, spec: ParamGroupsConfig, *, lr: float, head: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Split the model's parameters into optimizer groups by learning-rate multiplier.

    This is the hook for fine-tuning: ``spec.trainable == "head"`` freezes every parameter outside ``head``
    (sets ``requires_grad=False``); ``spec.lr_multipliers`` gives modules their own learning rate (the
    longest matching module-name prefix wins, a factor of 0 freezes).

    Args:
        model: the (unwrapped) model.
        spec: the ``param_groups`` section of the training config.
        lr: base learning rate.
        head: module-name prefixes of the model's output head (``model.medlens_head``).

    Returns:
        Torch parameter groups, each with ``params``, ``lr``, ``base_lr`` and ``name`` (the prefix or
        ``"default"``), in a deterministic order.

    Raises:
        InputError: a prefix matches no parameter, or ``"head"`` is asked of a model without a declared head.
    """
    named = list(unwrap(model).named_parameters())
    names = [n for n, _ in named]
    for prefix in spec.lr_multipliers:
        if not any(_under(n, prefix) for n in names):
            modules = sorted({n.rsplit(".", 1)[0] for n in names})
            raise InputError(
                f"param_groups.lr_multipliers: {prefix!r} matches no parameter of the model."
                f"{did_you_mean(prefix, modules)} Use a module name such as {modules[0]!r}."
            )
    if spec.trainable == "head" and not head:
        raise InputError(
            "param_groups.trainable 'head': this model declares no head module; use 'all' and lr_multipliers"
        )
    groups: dict[str, dict[str, Any]] = {}
    for name, param in named:
        if spec.trainable == "head" and not any(_under(name, h) for h in head):
            param.requires_grad_(False)
            continue
        matches = [p for p in spec.lr_multipliers if _under(name, p)]
        prefix = max(matches, key=len) if matches else ""
        factor = spec.lr_multipliers[prefix] if prefix else 1.0
        if factor == 0.0:
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)
        group = groups.setdefault(
            prefix, {"params": [], "lr": lr * factor, "base_lr": lr * factor, "name": prefix or "default"}
        )
        group["params"].append(param)
    if not groups:
        raise InputError("param_groups: every parameter is frozen; nothing would train")
    return list(groups.values())


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over :func:`build_param_groups` of ``model``."""
    o = config.optimizer
    head = tuple(getattr(unwrap(model), "medlens_head", ()))
    groups = build_param_groups(model, config.param_groups, lr=o.lr, head=head)
    if o.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov and o.momentum > 0,
            weight_decay=o.weight_decay,
        )
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def lr_factor(schedule: ScheduleConfig, iteration: int, total: int) -> float:
    """The multiplier on the base learning rate for the step taken at ``iteration`` (0-based) of ``total``."""
    warm = schedule.warmup_iterations
    if iteration < warm:
        return (iteration + 1) / (warm + 1)
    t = min(1.0, (iteration - warm) / max(1, total - warm))
    if schedule.name == "poly":
        return float((1.0 - t) ** schedule.power)
    if schedule.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule.name == "step":
        return float(schedule.gamma ** sum(iteration >= m for m in schedule.milestones))
    return 1.0


def apply_lr(optimizer: torch.optim.Optimizer, factor: float) -> list[float]:
    """Set every group's ``lr`` to ``base_lr * factor``; returns the new learning rates."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", group["lr"]) * factor
    return [float(g["lr"]) for g in optimizer.param_groups]
