"""Patch-based planning: network topology, patch and batch size for a time budget, and what a configuration
achieves in it (epochs, validation by sliding window). Shared by every dense task planner (segmentation now;
detection and image-to-image tasks later).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from medlens.plan.budget import StepCost
from medlens.plan.planner import Planner
from medlens.plan.topology import Topology, pool_topology, unet_spec


@dataclass
class Candidate:
    """One configuration being sized: its grid, network, patch, batch and costs.

    Attributes:
        name: ``"2d"``, ``"3d_fullres"`` or ``"3d_lowres"``.
        spacing: spacing of the patch's axes (mm).
        target_spacing: preprocessing target spacing over the data's axes (None = keep).
        median_shape: median case shape on the patch's axes at ``spacing``.
        num_slices: 2D configurations of 3D data: median slices per case (else 1).
        slice_axis: the data axis a 2D configuration of 3D data slices along.
        seconds: seconds per training iteration (measured if ``measured``).
        memory: estimated training memory in bytes.
    """

    name: str
    spacing: list[float]
    target_spacing: list[float | None]
    median_shape: list[int]
    num_slices: int
    slice_axis: int | None
    topology: Topology
    patch: list[int]
    batch: int
    spec: dict[str, Any]
    cost: StepCost
    seconds: float
    measured: bool
    memory: float

    @property
    def spatial_dims(self) -> int:
        return len(self.patch)

    @property
    def coverage(self) -> float:
        """Fraction of the median case one patch covers."""
        return math.prod(self.patch) / max(1, math.prod(self.median_shape))


class PatchPlanner(Planner):
    """Sizing rules for networks trained on patches. Class attributes are the rules' constants."""

    min_edge = 4  # smallest bottleneck feature map edge
    max_pools: ClassVar[dict[int, int]] = {2: 6, 3: 5}
    min_patch: ClassVar[dict[int, int]] = {2: 64, 3: 32}
    initial_patch_voxels: ClassVar[dict[int, int]] = {2: 2048**2, 3: 256**3}
    max_batch: ClassVar[dict[int, int]] = {2: 48, 3: 8}
    min_batch = 2
    max_dataset_covered = 0.05  # a batch covers at most 5% of the dataset's voxels (nnU-Net)
    min_iterations = 250  # the patch shrinks until this many iterations fit the budget
    preferred_iterations = 1000  # the batch grows only while this many still fit
    val_case_fraction = 0.2  # validate on this fraction of the cases (fewer if the budget demands)

    # ---- network, patch and batch --------------------------------------------------------------------------
    def base_features(self, spatial_dims: int) -> tuple[int, int]:
        """(first-stage channels, channel cap): nnU-Net's 32 and 320/512, halved at the start for 3D on CPU."""
        base = 16 if (self.on_cpu and spatial_dims == 3) else 32
        return base, 320 if spatial_dims == 3 else 512

    def num_res_units(self) -> int:
        """Residual units cost ~4x per step on CPU (0.95 s vs 0.22 s for a 96^3 3D U-Net): none on CPU."""
        return 0 if self.on_cpu else 2

    def network(self, topology: Topology, spatial_dims: int) -> dict[str, Any]:
        base, cap = self.base_features(spatial_dims)
        spec = unet_spec(topology, base, cap, self.num_res_units())
        spec.update(self.overrides.get("network", {}))
        return spec

    def initial_patch(self, spacing: Sequence[float], median_shape: Sequence[int]) -> list[int]:
        """A patch of equal extent in mm along every axis, with nnU-Net's starting volume, capped at the
        median shape."""
        nd = len(spacing)
        inv = 1.0 / np.asarray(spacing, float)
        patch = inv * (self.initial_patch_voxels[nd] / np.prod(inv)) ** (1 / nd)
        return [int(max(1, min(round(p), m))) for p, m in zip(patch, median_shape, strict=True)]

    def train_seconds(self) -> float:
        """Budget left for training steps before validation is costed (used to size patches)."""
        return self.budget * (1 - self.reserve_fraction - self.val_fraction)

    def size_candidate(
        self,
        name: str,
        spacing: Sequence[float],
        median_shape: Sequence[int],
        *,
        target_spacing: Sequence[float | None],
        slice_axis: int | None = None,
        num_slices: int = 1,
        measure: bool = True,
    ) -> Candidate:
        """Choose patch and batch: the largest patch (in nnU-Net's shrinking order) whose step fits memory and
        leaves ``min_iterations`` in the budget, then the batch grows while memory, the 5% dataset cap and
        ``preferred_iterations`` allow. With ``measure``, real steps are timed, which calibrates the FLOP model,
        and the sizing is redone until it settles on a size already timed (at most three timings)."""
        nd = len(spacing)
        patch_override = list(self.overrides.get("patch_size") or [])
        fixed = len(patch_override) == nd
        initial = patch_override if fixed else self.initial_patch(spacing, median_shape)
        min_patch = [min(int(m), self.min_patch[nd]) for m in median_shape]
        t_max = self.train_seconds() / self.min_iterations
        timed: dict[tuple[tuple[int, ...], int], float] = {}
        for _attempt in range(3):
            topo, spec, cost = self._shrink(spacing, median_shape, list(initial), min_patch, fixed, t_max)
            batch = self._batch(cost, nd, median_shape, num_slices)
            seconds, measured = self.estimate_seconds(cost, batch, nd), False
            if not (measure and self.measure):
                break
            key = (topo.patch_size, batch)
            measured = True
            if key in timed:
                seconds = timed[key]
                break
            seconds = timed[key] = self.time_step(spec, nd, topo.patch_size, batch)
            if fixed and "batch_size" in self.overrides:
                break
        return Candidate(
            name=name,
            spacing=[float(s) for s in spacing],
            target_spacing=list(target_spacing),
            median_shape=[int(m) for m in median_shape],
            num_slices=num_slices,
            slice_axis=slice_axis,
            topology=topo,
            patch=list(topo.patch_size),
            batch=batch,
            spec=spec,
            cost=cost,
            seconds=seconds,
            measured=measured,
            memory=self.memory_needed(cost, batch),
        )

    def _shrink(
        self,
        spacing: Sequence[float],
        median_shape: Sequence[int],
        patch: list[int],
        min_patch: list[int],
        fixed: bool,
        t_max: float,
    ) -> tuple[Topology, dict[str, Any], StepCost]:
        nd = len(spacing)
        while True:
            topo = pool_topology(spacing, patch, self.min_edge, self.max_pools[nd])
            spec = self.network(topo, nd)
            cost = self.cost(spec, nd, topo.patch_size)
            fits = self.memory_needed(cost, self.min_batch) <= self.memory_limit
            fast = self.estimate_seconds(cost, self.min_batch, nd) <= t_max
            if fixed or (fits and fast):
                return topo, spec, cost
            patch = list(topo.patch_size)
            # reduce the axis that is largest relative to the median shape, by one step of its stride
            # (recomputed for the smaller patch, so e.g. 128 -> 112 and not 128 -> 96)
            order = np.argsort([p / m for p, m in zip(patch, median_shape, strict=True)])[::-1]
            for ax in order:
                trial = list(patch)
                trial[ax] -= topo.divisor[ax]
                step = pool_topology(spacing, trial, self.min_edge, self.max_pools[nd]).divisor[ax]
                if patch[ax] - step >= min_patch[ax]:
                    patch[ax] -= step
                    break
            else:
                return topo, spec, cost  # smallest patch: the caller reports what does not fit

    def _batch(self, cost: StepCost, nd: int, median_shape: Sequence[int], num_slices: int) -> int:
        if "batch_size" in self.overrides:
            return int(self.overrides["batch_size"])
        n_cases = int(self.need("num_cases"))
        dataset_voxels = n_cases * math.prod(median_shape) * num_slices
        batch = self.min_batch
        while batch < self.max_batch[nd]:
            nxt = batch + 1
            if self.memory_needed(cost, nxt) > self.memory_limit:
                break
            if nxt * cost.voxels > self.max_dataset_covered * dataset_voxels:
                break
            if self.train_seconds() / self.estimate_seconds(cost, nxt, nd) < self.preferred_iterations:
                break
            batch = nxt
        return batch

    # ---- what a configuration achieves in the budget -------------------------------------------------------
    def epoch_seconds(self, c: Candidate) -> float:
        """Seconds to sample as many voxels as the training cases hold (one 'epoch' of the data)."""
        dataset_voxels = int(self.need("num_cases")) * math.prod(c.median_shape) * c.num_slices
        return math.ceil(dataset_voxels / (c.batch * math.prod(c.patch))) * c.seconds

    def epochs(self, c: Candidate) -> float:
        return self.train_seconds() / self.epoch_seconds(c)

    def case_inference_seconds(self, c: Candidate) -> float:
        """Sliding-window inference of one median case (forward passes only, ~1/3 of a training step)."""
        overlap = self.inference(c)["overlap"]
        windows = c.num_slices * math.prod(
            math.ceil(max(m - p, 0) / (p * (1 - overlap))) + 1
            for m, p in zip(c.median_shape, c.patch, strict=True)
        )
        return windows * c.cost.flops / 3 / self.throughput(c.spatial_dims) + 0.2

    def validation_cases(self, c: Candidate) -> int:
        """``val_case_fraction`` of the cases, but few enough that three validations fit ``val_fraction``."""
        n = max(1, round(int(self.need("num_cases")) * self.val_case_fraction))
        cap = max(1, int(self.val_fraction * self.budget / (3 * self.case_inference_seconds(c))))
        return min(n, cap)

    def validation_seconds(self, c: Candidate) -> float:
        return self.validation_cases(c) * self.case_inference_seconds(c)

    def inference(self, c: Candidate) -> dict[str, Any]:
        """Sliding window with Gaussian blending; on CPU overlap 0.25 and no mirroring TTA (8x the cost)."""
        return {
            "roi_size": list(c.patch),
            "overlap": 0.25 if self.on_cpu else 0.5,
            "sw_batch_size": 4,
            "mode": "gaussian",
            "sigma_scale": 0.125,
            "mirror_axes": [] if self.on_cpu else list(range(c.spatial_dims)),
            "precision": self.precision,
        }
