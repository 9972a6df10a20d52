"""The planner: dataset fingerprint + task + time budget + this machine -> a :class:`~medlens.plan.plan.Plan`.

Shaped like nnU-Net v2's ExperimentPlanner: every rule is a named method of a planner class, so a variant
overrides one rule (or a user overrides its value through ``overrides``) without copying the rest. Unlike
nnU-Net, which sizes for a fixed GPU-memory target and a fixed 1000-epoch schedule, this planner sizes for a
*time budget* on the machine at hand: the patch and batch must fit memory AND leave at least
``min_iterations`` training steps in the budget; the seconds per step are measured by timing real steps of the
chosen network (see :mod:`medlens.plan.budget`). Every decision appends a sentence to ``plan["reasons"]``.

The class chain: :class:`Planner` holds what every task family needs (resources, budget, network costing, the
training schedule, reasons); :class:`medlens.plan.patch.PatchPlanner` adds patch/batch/topology sizing for
dense tasks; :class:`medlens.plan.segmentation.SegmentationPlanner` the segmentation rules. A classification
planner subclasses :class:`Planner` directly (whole images, no patches).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medlens.errors import InputError, PlanError, did_you_mean
from medlens.plan.budget import (
    StepCost,
    available_memory,
    format_seconds,
    parse_budget,
    time_training_step,
    trace_cost,
)
from medlens.plan.plan import PLAN_VERSION, Plan

log = logging.getLogger(__name__)

#: Keys ``make_plan(overrides=...)`` accepts: each replaces the value one rule would choose.
OVERRIDES = (
    "target_spacing", "normalization", "configurations", "default_configuration", "patch_size",
    "batch_size", "network", "iterations", "precision", "threads", "memory_gb", "oversample_foreground",
    "augmentation",
)  # fmt: skip


def fmt(values: Sequence[float] | np.ndarray, digits: int = 3) -> str:
    """``[0.8, 0.8, 3.1]`` -> ``"0.8x0.8x3.1"``."""
    return "x".join(f"{float(v):.{digits}g}" for v in values)


class Planner:
    """What every task planner needs: resources, budget, network costing and the reasons list.

    Args:
        fingerprint: the dataset fingerprint (``medlens.data.fingerprint`` schema).
        budget: the time budget (``"10m"``, ``"90s"``, ``"1h"`` or seconds).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        overrides: values that replace rule outputs (keys in :data:`OVERRIDES`).
        measure: time real training steps (True) or trust the FLOP model alone (False: fast, for tests).
    """

    task = ""
    #: fraction of free memory a plan may use
    memory_fraction = 0.6
    #: fraction of the budget kept for start-up and checkpoints (validation is costed separately)
    reserve_fraction = 0.05
    #: FLOP/s assumed per CPU thread (and on a GPU) until a measurement calibrates it
    cpu_flops_per_thread = 15e9
    gpu_flops = 4e12
    #: data sampling + augmentation cost per voxel of a batch (CPU, main thread)
    data_seconds_per_voxel = 5e-8  # measured: 2x96x96x80 batch, sampling + augmentation, 1 thread

    def __init__(
        self,
        fingerprint: Mapping[str, Any],
        *,
        budget: str | float,
        device: str = "auto",
        overrides: Mapping[str, Any] | None = None,
        measure: bool = True,
    ) -> None:
        self.fp = dict(fingerprint)
        self.budget_text = str(budget)
        self.budget = parse_budget(budget)
        self.overrides = self.check_overrides(overrides or {})
        self.measure = measure
        self.reasons: list[str] = []
        self.device = self.resolve_device(device)
        self.threads = self.resolve_threads()
        self.precision = self.resolve_precision()
        self.memory_limit = self.resolve_memory()
        self._throughput: dict[int, float] = {}
        self._costs: dict[str, StepCost] = {}

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def reason(self, text: str) -> None:
        """Record why a decision was taken (shown to the user, kept in ``plan.json``)."""
        self.reasons.append(text)
        log.info("plan: %s", text)

    def check_overrides(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        for key in overrides:
            if key not in OVERRIDES:
                raise PlanError(
                    f"overrides: unknown key {key!r}.{did_you_mean(str(key), OVERRIDES)} "
                    f"Accepted: {', '.join(OVERRIDES)}."
                )
        return dict(overrides)

    def need(self, *path: str) -> Any:
        """A fingerprint value, or a PlanError naming the missing key."""
        node: Any = self.fp
        for i, key in enumerate(path):
            if not isinstance(node, Mapping) or key not in node:
                raise PlanError(
                    f"fingerprint: missing {'.'.join(path[: i + 1])!r} (re-run 'medlens dataset fingerprint')"
                )
            node = node[key]
        return node

    # ---- resources -----------------------------------------------------------------------------------------
    def resolve_device(self, device: str) -> str:
        from medlens.engine.runtime import device_for

        try:
            dev = device_for(device)
        except InputError as e:
            raise PlanError(str(e)) from None
        return str(dev)

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    def resolve_threads(self) -> int:
        from medlens.engine.runtime import available_cores

        if "threads" in self.overrides:
            n = self.overrides["threads"]
            self.reason(f"threads: {n} (override)")
            return int(n)
        cores = available_cores()
        n = cores if self.on_cpu else min(cores, 4)
        self.reason(
            f"threads: {n} torch threads on {cores} cores; batches are sampled in the main thread, so no "
            "worker process competes for a core (two threads collapse 5-15x when one does)"
        )
        return n

    def resolve_precision(self) -> str:
        import torch

        from medlens.engine.runtime import resolve_precision

        requested = str(self.overrides.get("precision", "auto"))
        try:
            precision = resolve_precision(requested, torch.device(self.device))
        except InputError as e:
            raise PlanError(str(e)) from None
        if requested != "auto":
            self.reason(f"precision: {precision} (override)")
        elif precision == "bf16" and self.on_cpu:
            self.reason(
                "precision: bf16 autocast (this CPU computes bf16 natively: ~1.2-2x faster, same Dice)"
            )
        else:
            self.reason(f"precision: {precision} on {self.device}")
        return precision

    def resolve_memory(self) -> float:
        if "memory_gb" in self.overrides:
            limit = float(self.overrides["memory_gb"]) * 1e9
            self.reason(f"memory: plan for {limit / 1e9:.3g} GB (override)")
            return limit
        free = available_memory(self.device)
        limit = free * self.memory_fraction
        self.reason(
            f"memory: {free / 1e9:.1f} GB free on {self.device}; a configuration may use {limit / 1e9:.1f} GB"
        )
        return limit

    # ---- costing -------------------------------------------------------------------------------------------
    def cost(self, spec: Mapping[str, Any], spatial_dims: int, patch: Sequence[int]) -> StepCost:
        """FLOPs and memory of one sample at ``patch`` (traced once per network on the meta device)."""
        import json

        key = json.dumps([spec, spatial_dims])
        if key not in self._costs:
            self._costs[key] = trace_cost(
                spec,
                spatial_dims=spatial_dims,
                in_channels=int(self.need("num_channels")),
                out_channels=self.num_classes,
                patch_size=patch,
            )
        return self._costs[key].scaled(patch)

    @property
    def num_classes(self) -> int:
        return max(2, len(self.fp.get("classes", {}).get("names", {})))

    def throughput(self, spatial_dims: int) -> float:
        """FLOP/s for training steps of ``spatial_dims`` networks (calibrated by measurements)."""
        if spatial_dims in self._throughput:
            return self._throughput[spatial_dims]
        return self.cpu_flops_per_thread * self.threads if self.on_cpu else self.gpu_flops

    def estimate_seconds(self, cost: StepCost, batch: int, spatial_dims: int) -> float:
        """Seconds per iteration: network step from the FLOP model plus batch sampling/augmentation."""
        return (
            cost.flops * batch / self.throughput(spatial_dims)
            + batch * cost.voxels * self.data_seconds_per_voxel
        )

    def time_step(
        self, spec: Mapping[str, Any], spatial_dims: int, patch: Sequence[int], batch: int
    ) -> float:
        """Time real steps (calibrating the FLOP model), or estimate when measuring is off."""
        cost = self.cost(spec, spatial_dims, patch)
        if not self.measure:
            return self.estimate_seconds(cost, batch, spatial_dims)
        seconds = self.measure_step(spec, spatial_dims, patch, batch)
        self._throughput[spatial_dims] = cost.flops * batch / seconds
        return seconds + batch * cost.voxels * self.data_seconds_per_voxel

    def measure_step(
        self, spec: Mapping[str, Any], spatial_dims: int, patch: Sequence[int], batch: int
    ) -> float:
        """Seconds of one real training step of ``spec`` on a batch of ``patch``-sized inputs."""
        return time_training_step(
            spec,
            spatial_dims=spatial_dims,
            in_channels=int(self.need("num_channels")),
            out_channels=self.num_classes,
            patch_size=patch,
            batch_size=batch,
            device=self.device,
            precision=self.precision,
            threads=self.threads,
        )

    def memory_needed(self, cost: StepCost, batch: int) -> float:
        return cost.memory_bytes(batch)

    # ---- training schedule (task independent) -------------------------------------------------------------
    #: fraction of the budget validation may take, and at most this many validations
    val_fraction = 0.1
    max_validations = 20
    #: below this many iterations SGD with nnU-Net's 0.99 momentum has not converged: use AdamW
    sgd_min_iterations = 5000

    def plan(self) -> Plan:
        """Run the rules and return the plan (implemented per task family)."""
        raise NotImplementedError

    def plan_header(self) -> dict[str, Any]:
        """The top of every plan.json: version, dataset, task, when, and the resources the plan was made for."""
        return {
            "medlens_plan": PLAN_VERSION,
            "dataset": str(self.fp.get("dataset", "")),
            "task": self.task,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "planner": {
                "name": type(self).__name__,
                "budget": self.budget_text,
                "budget_seconds": self.budget,
                "device": self.device,
                "threads": self.threads,
                "precision": self.precision,
                "memory_limit_gb": round(self.memory_limit / 1e9, 2),
                "measured": self.measure,
                "overrides": self.overrides,
            },
        }

    def optimizer(self, iterations: int) -> dict[str, Any]:
        if iterations >= self.sgd_min_iterations:
            return {"name": "sgd", "lr": 0.01, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
        return {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4}

    def schedule(self, iterations: int) -> dict[str, Any]:
        return {"name": "poly", "power": 0.9, "warmup_iterations": min(50, iterations // 10)}

    def training(
        self, seconds_per_iteration: float, validation_seconds: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``training`` section: as many iterations as fit the budget after validations and a reserve for
        start-up and checkpoints; up to ``max_validations`` validations within ``val_fraction`` of the budget.

        Returns:
            The section and the estimates behind it.
        """
        budget = self.budget
        n_val = int(
            min(self.max_validations, max(1, self.val_fraction * budget // max(validation_seconds, 1e-9)))
        )
        reserve = self.reserve_fraction * budget + n_val * validation_seconds
        train_seconds = max(budget - reserve, 0.25 * budget)
        if "iterations" in self.overrides:
            iterations = int(self.overrides["iterations"])
        else:
            iterations = max(1, int(train_seconds // seconds_per_iteration))
        val_every = max(1, iterations // n_val)
        section = {
            "iterations": iterations,
            "optimizer": self.optimizer(iterations),
            "schedule": self.schedule(iterations),
            "val_every": val_every,
            "early_stopping_patience": None,
            "checkpoint_every": val_every,
            "precision": self.precision,
            "seed": 0,
            "threads": self.threads,
            # The estimate can be wrong (a busy machine, a slower disk): the engine also stops at the budget.
            "time_limit_seconds": round(budget, 1),
        }
        estimates = {
            "train_seconds": round(iterations * seconds_per_iteration, 1),
            "validations": n_val,
            "validation_seconds": round(validation_seconds, 2),
            "reserve_seconds": round(reserve, 1),
        }
        return section, estimates


def make_plan(
    fingerprint: Mapping[str, Any],
    *,
    task: str,
    budget: str | float,
    device: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    measure: bool = True,
) -> Plan:
    """Plan training for a dataset on this machine within a time budget.

    Args:
        fingerprint: from :func:`medlens.data.fingerprint.compute_fingerprint`.
        task: the task family (``"segmentation"`` or ``"classification"``).
        budget: wall time for training incl. validation: ``"10m"``, ``"90s"``, ``"1h"``.
        device: ``"auto"`` (CUDA if present), ``"cpu"`` or ``"cuda"``.
        overrides: replace rule outputs, e.g. ``{"target_spacing": [1, 1, 1], "network": {"num_res_units": 2}}``
            (keys: :data:`OVERRIDES`).
        measure: time real training steps (default); False uses the FLOP model only.

    Returns:
        The validated :class:`~medlens.plan.plan.Plan`.

    Raises:
        PlanError: unknown task or override, a fingerprint without what the rules need, or no configuration
            that fits the machine's memory (raised here, before any training).
    """
    from medlens.plan.classification import ClassificationPlanner
    from medlens.plan.segmentation import SegmentationPlanner

    planners: dict[str, type[Planner]] = {
        "segmentation": SegmentationPlanner,
        "classification": ClassificationPlanner,
    }
    if task not in planners:
        raise PlanError(
            f"no planner for task {task!r}.{did_you_mean(task, list(planners))} Available: {', '.join(planners)}."
        )
    planner = planners[task](fingerprint, budget=budget, device=device, overrides=overrides, measure=measure)
    log.info("planning %s for %s on %s", task, format_seconds(planner.budget), planner.device)
    return planner.plan()
