"""Sizing a whole-image network for a time budget: the ResNet ladder, batch size, threads and precision
measured on this machine, and what the budget then buys (epochs, iterations, validation).

The base of :class:`medlens.plan.classification.ClassificationPlanner`, as :class:`medlens.plan.patch.PatchPlanner`
is of the segmentation planner: the rules that depend on the task (classes, imbalance, augmentation) live
there, the costing here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from medlens.plan.budget import StepCost, trace_cost
from medlens.plan.planner import Planner

#: Network traces (FLOPs and saved bytes per image), shared by every planner of the process.
_TRACES: dict[str, StepCost] = {}


class WholeImagePlanner(Planner):
    """Network sizing for models that see whole (resized) images. Class attributes are the rules' constants."""

    sizes: ClassVar[dict[int, tuple[int, ...]]] = {
        2: (16, 28, 32, 64, 96, 128, 160, 192, 224),
        3: (16, 28, 32, 48, 64, 96, 128),
    }
    min_epochs = 5.0  # a network qualifies if it sees the training set this often in the budget ...
    min_iterations = 500  # ... and takes at least this many optimizer steps
    large_dataset = 10_000  # ResNet-34/50 are candidates only for at least this many training images
    voxels_per_batch: ClassVar[dict[int, int]] = {2: 128 * 64**2, 3: 16 * 32**3}
    batch_range: ClassVar[dict[int, tuple[int, int]]] = {2: (16, 128), 3: (4, 32)}
    val_case_fraction = 0.2  # expected validation share of the cases (cross-validation folds)
    params_per_image = 4000  # rungs with more parameters than this per training image are left out
    min_validations = 5  # validation is capped so that this many fit in val_fraction of the budget

    @property
    def ndim(self) -> int:
        return int(self.need("ndim"))

    def stem(self, size: Sequence[int], cheap: bool) -> dict[str, Any]:
        """ResNet stem for the input size: images up to 32 keep full resolution (3x3 stride 1, no max-pool:
        MedMNIST's ResNet-18 (28)); up to 64 one stride-2 3x3; larger the ImageNet stem (7x7/2 + max-pool).
        ``cheap`` adds one more downsampling (4x fewer operations)."""
        edge = max(size)
        if edge <= 32:
            return {"conv1_kernel": 3, "conv1_stride": 2 if cheap else 1, "no_max_pool": True}
        if edge <= 64:
            return {"conv1_kernel": 3, "conv1_stride": 2, "no_max_pool": not cheap}
        return {"conv1_kernel": 7, "conv1_stride": 2, "no_max_pool": False}

    def network_ladder(self, size: Sequence[int]) -> list[dict[str, Any]]:
        """Candidates from cheapest to most capable."""
        ladder = [
            {"name": "resnet18", "widen_factor": 0.25, **self.stem(size, True)},
            {"name": "resnet18", "widen_factor": 0.5, **self.stem(size, True)},
            {"name": "resnet18", "widen_factor": 0.5, **self.stem(size, False)},
            {"name": "resnet18", "widen_factor": 1.0, **self.stem(size, False)},
        ]
        if int(self.need("num_cases")) >= self.large_dataset:
            ladder += [
                {"name": n, "widen_factor": 1.0, **self.stem(size, False)} for n in ("resnet34", "resnet50")
            ]
        unique: list[dict[str, Any]] = []
        for spec in ladder:
            if spec not in unique:
                unique.append(spec)
        return unique

    def batch_size(self, size: Sequence[int], cost: StepCost) -> int:
        """A power of two near ``voxels_per_batch`` voxels (128 images of 64^2, 16 volumes of 32^3) within
        ``batch_range``, at most a quarter of the training images, halved until it fits memory."""
        if "batch_size" in self.overrides:
            return int(self.overrides["batch_size"])
        nd = len(size)
        lo, hi = self.batch_range[nd]
        batch = 2 ** int(math.log2(max(1, self.voxels_per_batch[nd] // math.prod(size))))
        batch = int(np.clip(batch, lo, hi))
        batch = min(batch, max(2, 2 ** int(math.log2(max(2, self.n_train // 4)))))
        while batch > 2 and self.memory_needed(cost, batch) > self.memory_limit:
            batch //= 2
        return batch

    def cost(self, spec: Mapping[str, Any], spatial_dims: int, patch: Sequence[int]) -> StepCost:
        """FLOPs and memory of one image at ``patch``; traces are kept for the process (they are deterministic,
        and a plan prices a whole ladder of networks). The key leaves out the number of outputs: the final
        linear layer costs nothing next to the convolutions."""
        key = json.dumps([spec, spatial_dims, int(self.need("num_channels"))], sort_keys=True)
        if key not in _TRACES:
            _TRACES[key] = trace_cost(
                spec,
                spatial_dims=spatial_dims,
                in_channels=int(self.need("num_channels")),
                out_channels=self.num_classes,
                patch_size=patch,
            )
        return _TRACES[key].scaled(patch)

    def measure_step(
        self, spec: Mapping[str, Any], spatial_dims: int, patch: Sequence[int], batch: int
    ) -> float:
        """Seconds of one real classification step (whole resized images, a class per image)."""
        return time_classification_step(
            spec,
            spatial_dims=spatial_dims,
            in_channels=int(self.need("num_channels")),
            out_channels=self.num_classes,
            size=patch,
            batch_size=batch,
            device=self.device,
            precision=self.precision,
            threads=self.threads,
        )

    @property
    def n_train(self) -> int:
        """Expected training images of a fold."""
        return max(1, int(self.need("num_cases") * (1 - self.val_case_fraction)))

    def epochs(self, seconds: float, batch: int) -> tuple[float, int]:
        """(epochs, iterations) that fit the training share of the budget at ``seconds`` per step."""
        train = self.budget * (1 - self.reserve_fraction - self.val_fraction)
        its = int(train // max(seconds, 1e-9))
        return its * batch / self.n_train, its

    def capacity(self, ladder: list[dict[str, Any]], costs: list[StepCost]) -> int:
        """How many rungs (from the cheapest) the dataset can feed: at most ``params_per_image`` parameters per
        training image, always at least the cheapest rung; the budget alone would give a few hundred images a
        wide network on a fast machine. Brain-lesion (254 training slices, 90 s, 3 seeds, final weights; bench/
        classification/sweep.py): ResNet-18 x0.25 (0.7M parameters, 2,700 per image) test AUC 0.726, x0.5
        (2.8M) 0.691, x0.125 0.667: the cap at 4,000 per image keeps x0.25 and leaves out x0.5 and wider."""
        cap = self.params_per_image * self.n_train
        keep = max(1, next((i for i, c in enumerate(costs) if c.param_bytes / 4 > cap), len(costs)))
        if keep < len(ladder) and "network" not in self.overrides:
            dropped = ladder[keep]
            self.reason(
                f"network capacity: at most {cap / 1e6:.2g}M parameters for {self.n_train} training images "
                f"({self.params_per_image} per image): rungs from {dropped['name']} x{dropped.get('widen_factor', 1)} "
                f"({costs[keep].param_bytes / 4e6:.2g}M) up are left out, whatever the budget buys"
            )
        return keep

    def choose_network(self, size: list[int]) -> tuple[dict[str, Any], int, float, bool]:
        """The most capable rung that reaches ``min_epochs`` and ``min_iterations`` (else the cheapest).

        Returns:
            spec, batch size, seconds per step, whether the time was measured.
        """
        nd = len(size)
        if "network" in self.overrides and "name" in self.overrides["network"]:
            spec = dict(self.overrides["network"])
            cost = self.cost(spec, nd, size)
            batch = self.batch_size(size, cost)
            seconds = self.time_step(spec, nd, size, batch)
            self.reason(f"network: {spec['name']} (override), {seconds:.3g} s per step of {batch}")
            return spec, batch, seconds, self.measure
        ladder = self.network_ladder(size)
        # rank by the FLOP model first, then time the chosen rung (and re-check) for real
        costs = [self.cost(spec, nd, size) for spec in ladder]
        keep = self.capacity(ladder, costs)
        ladder, costs = ladder[:keep], costs[:keep]
        chosen, timed = 0, dict[int, float]()
        if (
            self.measure
        ):  # threads and precision first, on the cheapest rung: they change what the budget buys
            b0 = self.batch_size(size, costs[0])
            timed[0] = self.tune_runtime(ladder[0], size, b0, self.time_step(ladder[0], nd, size, b0))
        for _attempt in range(3):
            chosen = 0
            for i, cost in enumerate(costs):
                batch = self.batch_size(size, cost)
                seconds = timed.get(i) or self.estimate_seconds(cost, batch, nd)
                ep, its = self.epochs(seconds, batch)
                if ep >= self.min_epochs and its >= self.min_iterations:
                    chosen = i
            if not self.measure or chosen in timed:
                break
            batch = self.batch_size(size, costs[chosen])
            timed[chosen] = self.time_step(ladder[chosen], nd, size, batch)
        spec, cost = dict(ladder[chosen]), costs[chosen]
        spec.update({k: v for k, v in self.overrides.get("network", {}).items() if k != "name"})
        batch = self.batch_size(size, cost)
        seconds = timed.get(chosen) or self.estimate_seconds(cost, batch, nd)
        ep, its = self.epochs(seconds, batch)
        rungs = f"{len(ladder)} rung{'s' if len(ladder) > 1 else ''}"
        verdict = (
            f"the most capable of {rungs} that sees the training set >= {self.min_epochs:g} times in "
            f">= {self.min_iterations} steps"
            if ep >= self.min_epochs and its >= self.min_iterations
            else f"the cheapest of {rungs}: no rung reaches {self.min_epochs:g} epochs and "
            f"{self.min_iterations} steps in the budget"
        )
        self.reason(
            f"network: MONAI {spec['name']} (width x{spec.get('widen_factor', 1)}, stem {spec.get('conv1_kernel')}x"
            f"{spec.get('conv1_kernel')}/{spec.get('conv1_stride')}{'' if spec.get('no_max_pool') else ' + max-pool'}), "
            f"{verdict}: {seconds:.3g} s per step of {batch} ({'measured' if chosen in timed else 'estimated'}), "
            f"{ep:.1f} epochs in {its} steps"
        )
        return spec, batch, seconds, chosen in timed

    def tune_runtime(self, spec: Mapping[str, Any], size: list[int], batch: int, seconds: float) -> float:
        """On a CPU, also time the chosen network with one thread, and in fp32 when bf16 was chosen, and keep
        the fastest: two threads collapse when another process takes a core (FACTS.md), and bf16 does not pay
        off for every small network. Overridden threads or precision are kept."""
        if not self.on_cpu:
            return seconds
        trials = []
        if self.threads > 1 and "threads" not in self.overrides:
            trials.append((1, self.precision))
        if self.precision == "bf16" and "precision" not in self.overrides:
            trials.append((self.threads, "fp32"))
        nd = len(size)
        best = (seconds, self.threads, self.precision, self._throughput.get(nd))
        base = (self.threads, self.precision)
        for threads, precision in trials:
            self.threads, self.precision = threads, precision
            t = self.time_step(spec, nd, size, batch)
            if t < 0.9 * best[0]:
                best = (t, threads, precision, self._throughput.get(nd))
        self.threads, self.precision = best[1], best[2]
        if best[3] is not None:  # the FLOP model stays calibrated on the settings kept
            self._throughput[nd] = best[3]
        if (best[1], best[2]) != base:
            self.reason(
                f"runtime: {best[1]} thread(s) in {best[2]}: {best[0]:.3g} s per step, measured against "
                f"{seconds:.3g} s with {base[0]} thread(s) in {base[1]} (keeps the faster)"
            )
        return best[0]

    def validation(self, seconds: float, batch: int) -> tuple[int, float]:
        """(max validation cases, seconds per validation): forward passes cost ~1/3 of a training step; the
        cases are capped so that ``min_validations`` validations fit ``val_fraction`` of the budget."""
        per_image = seconds / batch / 3
        n = max(1, round(int(self.need("num_cases")) * self.val_case_fraction))
        cap = max(16, int(self.val_fraction * self.budget / (self.min_validations * per_image)))
        cases = min(n, cap)
        return cases, cases * per_image + 0.1

    # ---- the plan -------------------------------------------------------------------------------------------


def time_classification_step(
    spec: Mapping[str, Any],
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    size: Sequence[int],
    batch_size: int,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    steps: int = 3,
) -> float:
    """Median wall time of ``steps`` real classification steps (forward under autocast, cross-entropy,
    backward, AdamW) after one warm-up step (:func:`medlens.plan.budget.median_step_seconds`)."""
    import torch

    from medlens.models import create_model
    from medlens.plan.budget import median_step_seconds

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, in_channels, *[int(s) for s in size]), generator=gen)
    y = torch.randint(0, out_channels, (batch_size,), generator=gen)
    return median_step_seconds(
        lambda: create_model(
            dict(spec), spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels
        ),
        x, y, torch.nn.functional.cross_entropy,
        device=device, precision=precision, threads=threads, steps=steps,
    )  # fmt: skip
