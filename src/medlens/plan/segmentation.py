"""Segmentation planning: nnU-Net v2's rules (spacing, normalisation, topology, patch, batch, 3d_lowres, 2d)
sized for a time budget on this machine, and assembled into a plan.

The three configurations: ``3d_fullres`` at the target spacing; ``3d_lowres`` at a coarser spacing when a
fullres patch covers little of a case or one pass over the data takes too long for the budget; ``2d`` (slices
along the coarse axis for 3D data). The default is the one that can learn most in the budget (see
:meth:`SegmentationPlanner.choose_default`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medlens.errors import PlanError
from medlens.plan.budget import format_seconds
from medlens.plan.patch import Candidate, PatchPlanner
from medlens.plan.plan import Plan, config_diff, deep_merge
from medlens.plan.planner import fmt


class SegmentationPlanner(PatchPlanner):
    """nnU-Net's segmentation rules, sized for a time budget. Class attributes are the rules' constants."""

    task = "segmentation"
    anisotropy_threshold = 3.0
    lowres_creation_threshold = 0.25  # plan 3d_lowres when a fullres patch covers less of the median case
    lowres_max_factor = 4.0  # never coarser than this times the fullres spacing
    min_epochs = 20  # 3d_fullres is the default only if it sees every voxel this often in the budget

    # ---- data rules --------------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return int(self.need("ndim"))

    def labels(self) -> dict[str, int]:
        """Class name -> value from the fingerprint (background 0 added when missing)."""
        names = self.fp.get("classes", {}).get("names") or {"0": "background", "1": "foreground"}
        out = {str(n): int(v) for v, n in sorted(names.items(), key=lambda kv: int(kv[0]))}
        if 0 not in out.values():
            out = {"background": 0, **out}
        return out

    def target_spacing(self) -> list[float]:
        """Median spacing; for anisotropic data with few slices, the coarse axis' 10th percentile (nnU-Net)."""
        if "target_spacing" in self.overrides:
            ts = [float(v) for v in self.overrides["target_spacing"]]
            self.reason(f"target spacing: {fmt(ts)} mm (override)")
            return ts
        median = np.asarray(self.need("spacing", "median"), dtype=float)
        target = median.copy()
        sizes = np.asarray(
            self.fp.get("shape_after_crop", {}).get("median") or self.need("shape", "median"), float
        )
        if len(target) == 3:
            worst = int(np.argmax(target))
            others = [a for a in range(3) if a != worst]
            aniso_spacing = target[worst] > self.anisotropy_threshold * max(target[others])
            aniso_voxels = sizes[worst] * self.anisotropy_threshold < min(sizes[others])
            if aniso_spacing and aniso_voxels:
                p10 = self.fp.get("spacing", {}).get("p10")
                value = float(p10[worst]) if p10 else float(target[worst])
                value = max(value, float(max(target[others])) + 1e-5)
                target[worst] = value
                self.reason(
                    f"target spacing: {fmt(target)} mm: axis {worst} is anisotropic ({median[worst]:.3g} mm vs "
                    f"{max(median[others]):.3g} mm, {sizes[worst]:.0f} slices), so it takes the 10th percentile "
                    "of its spacings instead of the median, which would interpolate few thick slices (nnU-Net)"
                )
                return [float(t) for t in target]
        self.reason(f"target spacing: {fmt(target)} mm, the median spacing of the dataset")
        return [float(t) for t in target]

    def median_shape_at(self, spacing: Sequence[float | None]) -> list[int]:
        """Median cropped case shape when resampled to ``spacing`` (None = that axis keeps its spacing)."""
        cases = [
            c
            for c in self.fp.get("cases", [])
            if "spacing" in c and ("shape_after_crop" in c or "shape" in c)
        ]
        if cases:
            shapes = []
            for c in cases:
                sp, sh = c["spacing"], c.get("shape_after_crop") or c["shape"]
                shapes.append([s * o / (t or o) for s, o, t in zip(sh, sp, spacing, strict=True)])
            return [max(1, round(v)) for v in np.median(np.asarray(shapes), axis=0)]
        sh = self.fp.get("shape_after_crop", {}).get("median") or self.need("shape", "median")
        sp = self.need("spacing", "median")
        return [max(1, round(s * o / (t or o))) for s, o, t in zip(sh, sp, spacing, strict=True)]

    def normalization(self) -> dict[str, dict[str, Any]]:
        """CT: clip to the foreground 0.5/99.5 percentiles, z-score with the foreground mean/std. Others:
        per-image z-score, inside the nonzero mask when cropping to it shrinks cases by >= 25% (nnU-Net)."""
        nch = int(self.need("num_channels"))
        mods = self.fp.get("modalities", {})
        before = math.prod(self.need("shape", "median"))
        after = math.prod(self.fp.get("shape_after_crop", {}).get("median") or self.need("shape", "median"))
        use_mask = after / max(before, 1) < 0.75
        given = dict(self.overrides.get("normalization", {}))
        out: dict[str, dict[str, Any]] = {}
        for c in range(nch):
            key, mod = str(c), str(mods.get(str(c), "OT"))
            if key in given:
                out[key] = dict(given[key])
                self.reason(f"normalisation of channel {c}: {out[key]} (override)")
            elif mod == "CT":
                st = self.need("intensity", key)
                out[key] = {
                    "scheme": "ct",
                    "clip": [st["p00_5"], st["p99_5"]],
                    "mean": st["mean"],
                    "std": st["std"],
                }
                self.reason(
                    f"normalisation of channel {c} (CT): clip to the foreground's 0.5-99.5 percentiles "
                    f"[{st['p00_5']:.4g}, {st['p99_5']:.4g}] HU, then z-score with its mean {st['mean']:.4g} "
                    f"and std {st['std']:.4g}: CT intensities are quantitative, so one dataset-wide scale"
                )
            else:
                out[key] = {"scheme": "zscore", "use_nonzero_mask": use_mask}
                where = (
                    "inside the nonzero mask (cropping shrinks cases by >= 25%)"
                    if use_mask
                    else "over the image"
                )
                self.reason(
                    f"normalisation of channel {c} ({mod}): per-image z-score {where}: {mod} intensities have "
                    "no fixed scale"
                )
        return out

    def lowres_spacing_steps(self, spacing: Sequence[float]) -> list[float]:
        """One step coarser (x1.03): the finer axes first until they match the coarsest, then all (nnU-Net)."""
        sp = np.asarray(spacing, float)
        coarse = sp.max()
        if np.any(sp < coarse * 0.999):
            sp = np.where(sp < coarse, np.minimum(sp * 1.03, coarse), sp)
        else:
            sp = sp * 1.03
        return [float(s) for s in sp]

    # ---- the other configurations --------------------------------------------------------------------------
    def plan_lowres(self, full: Candidate) -> Candidate | None:
        """3d_lowres when a fullres patch covers < ``lowres_creation_threshold`` of the median case or fewer than
        ``min_epochs`` fit the budget: coarsen the spacing (x1.03 steps, nnU-Net) until both hold, at most
        ``lowres_max_factor`` times the fullres spacing."""
        if full.coverage >= self.lowres_creation_threshold and self.epochs(full) >= self.min_epochs:
            self.reason(
                f"3d_lowres: not needed: a fullres patch covers {full.coverage:.0%} of the median case and "
                f"{self.epochs(full):.0f} epochs fit the budget"
            )
            return None
        spacing = list(full.spacing)
        while True:
            nxt = self.lowres_spacing_steps(spacing)
            if max(n / f for n, f in zip(nxt, full.spacing, strict=True)) > self.lowres_max_factor:
                break
            spacing = nxt
            median = self.median_shape_at(spacing)
            c = self.size_candidate("3d_lowres", spacing, median, target_spacing=spacing, measure=False)
            if c.coverage >= self.lowres_creation_threshold and self.epochs(c) >= self.min_epochs:
                break
        if np.allclose(spacing, full.spacing):
            return None
        low = self.size_candidate("3d_lowres", spacing, self.median_shape_at(spacing), target_spacing=spacing)
        self.reason(
            f"3d_lowres: planned at {fmt(spacing)} mm because at {fmt(full.spacing)} mm a patch covers "
            f"{full.coverage:.0%} of the median case and one epoch takes {format_seconds(self.epoch_seconds(full))} "
            f"on {self.threads} {'cores' if self.on_cpu else 'GPU streams'}; at {fmt(spacing)} mm: "
            f"{low.coverage:.0%} and {format_seconds(self.epoch_seconds(low))}"
        )
        return low

    def plan_2d(self, target: Sequence[float]) -> Candidate:
        """2D slices of 3D data along the coarse axis (the last axis when isotropic), in-plane at the target
        spacing; the slice axis keeps each case's spacing (nnU-Net)."""
        t = np.asarray(target, float)
        aniso = t.max() / t.min() > self.anisotropy_threshold
        slice_axis = int(np.argmax(t)) if aniso else 2
        inplane = [a for a in range(3) if a != slice_axis]
        ts: list[float | None] = [float(v) for v in target]
        ts[slice_axis] = None
        median = self.median_shape_at(ts)
        return self.size_candidate(
            "2d",
            [float(t[a]) for a in inplane],
            [median[a] for a in inplane],
            target_spacing=ts,
            slice_axis=slice_axis,
            num_slices=median[slice_axis],
        )

    def choose_default(self, fitting: dict[str, Candidate]) -> str:
        """3d_fullres when it sees the data ``min_epochs`` times in the budget; otherwise 2d for anisotropic
        data (coarsening it loses in-plane detail), else 3d_lowres; 2d for 2D data."""
        override = self.overrides.get("default_configuration")
        if override is not None:
            if override not in fitting:
                raise PlanError(
                    f"overrides: default_configuration {override!r} is not planned ({', '.join(fitting)})"
                )
            self.reason(f"default configuration: {override} (override)")
            return str(override)
        if "3d_fullres" not in fitting and "3d_lowres" not in fitting:
            self.reason("default configuration: 2d")
            return "2d"
        budget = format_seconds(self.budget)
        full = fitting.get("3d_fullres")
        if full is not None and self.epochs(full) >= self.min_epochs:
            self.reason(
                f"default configuration: 3d_fullres: one epoch takes {format_seconds(self.epoch_seconds(full))}, "
                f"so {self.epochs(full):.0f} epochs fit the {budget} budget"
            )
            return "3d_fullres"
        t = np.asarray(self.need("spacing", "median"), float)
        detail = (
            f"{fmt(full.spacing)} mm 3D would need {format_seconds(self.epoch_seconds(full))} per epoch on "
            f"{self.threads} cores ({self.epochs(full):.1f} epochs in the {budget} budget)"
            if full is not None
            else "3d_fullres does not fit in memory"
        )
        if t.max() / t.min() > self.anisotropy_threshold and "2d" in fitting:
            self.reason(f"default configuration: 2d: {detail}, and the data is anisotropic ({fmt(t)} mm)")
            return "2d"
        low = fitting.get("3d_lowres")
        if low is not None and (full is None or self.epochs(low) > self.epochs(full)):
            self.reason(
                f"default configuration: 3d_lowres: {detail}; at {fmt(low.spacing)} mm an epoch takes "
                f"{format_seconds(self.epoch_seconds(low))}"
            )
            return "3d_lowres"
        self.reason(f"default configuration: 3d_fullres, although {detail}: no coarser configuration helps")
        return "3d_fullres"

    # ---- sections ------------------------------------------------------------------------------------------
    def augmentation(self, c: Candidate) -> dict[str, Any]:
        """nnU-Net's transforms and probabilities: in-plane rotation only for anisotropic 3D, +-180 degrees in
        2D (+-15 for elongated patches) and anisotropic 3D, +-30 degrees in isotropic 3D."""
        nd = c.spatial_dims
        sp = np.asarray(c.spacing, float)
        if nd == 2:
            degrees, planes = (180.0 if max(c.patch) / min(c.patch) <= 1.5 else 15.0), [[0, 1]]
        elif sp.max() / sp.min() > self.anisotropy_threshold:
            degrees, planes = 180.0, [[a for a in range(3) if a != int(np.argmax(sp))]]
        else:
            degrees, planes = 30.0, [[0, 1], [0, 2], [1, 2]]
        aug: dict[str, Any] = {
            "mirror": {"p": 0.5, "axes": list(range(nd))},
            "rotation": {"p": 0.2, "degrees": degrees, "planes": planes},
            "scaling": {"p": 0.2, "range": [0.7, 1.4]},
            "gamma": {"p": 0.3, "range": [0.7, 1.5], "invert_p": 0.1},
            "noise": {"p": 0.1, "std": [0.0, 0.1]},
            "brightness": {"p": 0.15, "range": [0.75, 1.25]},
            "contrast": {"p": 0.15, "range": [0.75, 1.25]},
        }
        return deep_merge(aug, self.overrides.get("augmentation", {}))

    def configuration(
        self, c: Candidate, normalization: dict[str, Any], labels: dict[str, int]
    ) -> dict[str, Any]:
        """Assemble one configuration's JSON (and its reasons)."""
        training, est = self.training(c.seconds, self.validation_seconds(c))
        channels = c.spec.get("channels", [])
        how = "measured" if c.measured else "estimated from FLOPs"
        self.reason(
            f"{c.name}: patch {fmt(c.patch)} x batch {c.batch} at {fmt(c.spacing)} mm (median case "
            f"{fmt(c.median_shape)}): {c.seconds:.3g} s per iteration ({how}), "
            f"{c.memory / 1e9:.2g} GB; {training['iterations']} iterations fit the {format_seconds(self.budget)} "
            f"budget after {est['validations']} validation(s) on {self.validation_cases(c)} case(s)"
        )
        if channels:
            self.reason(
                f"{c.name} network: U-Net with {len(channels)} levels ({channels[0]}..{channels[-1]} channels), "
                f"strides {c.spec.get('strides')} from the patch and spacing; num_res_units="
                f"{c.spec.get('num_res_units')}"
                + (" (residual units cost ~4x per step on CPU)" if self.on_cpu else "")
            )
        oversample = float(self.overrides.get("oversample_foreground", 0.33))
        return {
            "spatial_dims": c.spatial_dims,
            "patch_size": list(c.patch),
            "batch_size": c.batch,
            "preprocessing": {
                "target_spacing": list(c.target_spacing),
                "orientation": "RAS",
                "crop_nonzero": True,
                "resample_data": "cubic",
                "resample_label": "linear_onehot",
                "anisotropy_threshold": self.anisotropy_threshold,
                "normalization": normalization,
                "label_values": sorted(labels.values()),
                "cache_dtype": "float16",
            },
            "network": c.spec,
            "loss": {"name": "dice_ce"},
            "sampling": {"oversample_foreground": oversample, "slice_axis": c.slice_axis},
            "augmentation": self.augmentation(c),
            "training": training,
            "inference": self.inference(c),
            "postprocessing": {"largest_component": "auto"},
            "validation": {"max_cases": self.validation_cases(c)},
            "estimates": {
                "seconds_per_iteration": round(c.seconds, 4),
                "measured": c.measured,
                "memory_gb": round(c.memory / 1e9, 3),
                "gflops_per_iteration": round(c.cost.flops * c.batch / 1e9, 2),
                "median_shape": c.median_shape,
                "patch_coverage": round(c.coverage, 3),
                "epoch_seconds": round(self.epoch_seconds(c), 1),
                **est,
            },
        }

    def fingerprint_summary(self) -> dict[str, Any]:
        fp = self.fp
        return {
            "ndim": self.ndim,
            "num_cases": int(self.need("num_cases")),
            "num_channels": int(self.need("num_channels")),
            "modalities": fp.get("modalities", {}),
            "channel_names": fp.get("channel_names", {}),
            "spacing_median": fp["spacing"]["median"],
            "shape_median": fp["shape"]["median"],
            "shape_after_crop_median": fp.get("shape_after_crop", {}).get("median"),
            "anisotropy": fp.get("anisotropy"),
        }

    # ---- the whole plan ------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        """Size every configuration, drop those that cannot fit memory, pick the default, assemble the plan.

        Raises:
            PlanError: no configuration fits the memory available (before any training).
        """
        labels = self.labels()
        target = self.target_spacing()
        normalization = self.normalization()
        cands: dict[str, Candidate] = {}
        if self.ndim == 3:
            cands["3d_fullres"] = full = self.size_candidate(
                "3d_fullres", target, self.median_shape_at(target), target_spacing=target
            )
            low = self.plan_lowres(full) if full.memory <= self.memory_limit else None
            if low is not None:
                cands["3d_lowres"] = low
            cands["2d"] = self.plan_2d(target)
        else:
            cands["2d"] = self.size_candidate(
                "2d", target, self.median_shape_at(target), target_spacing=target
            )
        wanted = self.overrides.get("configurations")
        if wanted is not None:
            unknown = [w for w in wanted if w not in cands]
            if unknown:
                raise PlanError(
                    f"overrides: configurations {unknown} are not planned for this data ({', '.join(cands)})"
                )
            cands = {n: c for n, c in cands.items() if n in wanted}
        fitting = {}
        for name, c in cands.items():
            if c.memory <= self.memory_limit:
                fitting[name] = c
            else:
                self.reason(
                    f"{name}: dropped: even patch {fmt(c.patch)} x batch {c.batch} needs {c.memory / 1e9:.2g} GB, "
                    f"more than the {self.memory_limit / 1e9:.2g} GB available"
                )
        if not fitting:
            worst = min(cands.values(), key=lambda c: c.memory)
            raise PlanError(
                f"no configuration fits in {self.memory_limit / 1e9:.2g} GB of memory: the smallest, {worst.name} "
                f"with patch {fmt(worst.patch)} x batch {worst.batch}, needs {worst.memory / 1e9:.2g} GB. Free "
                "memory or plan on a larger machine, coarsen the data (overrides={'target_spacing': [...]}) or "
                "use a smaller network (overrides={'network': {'channels': [8, 16, 32, 64]}})"
            )
        self.reason(
            "augmentation: mirroring, rotation and scaling (one grid_sample per batch), gamma, noise, brightness "
            "and contrast with nnU-Net's probabilities; its Gaussian blur and low-resolution simulation are left "
            "out: each costs a filtering pass per sample for a small gain on a CPU budget"
        )
        self.reason(
            "inference: sliding window with Gaussian blending, sw_batch_size 4"
            + (
                ", overlap 0.25 and no mirroring TTA (8x the time on CPU)"
                if self.on_cpu
                else ", overlap 0.5, mirroring TTA"
            )
        )
        self.reason(
            "postprocessing: keep-largest-component is decided after training, on the validation cases"
        )
        order = [n for n in ("2d", "3d_fullres", "3d_lowres") if n in fitting]
        configs: dict[str, dict[str, Any]] = {
            n: self.configuration(fitting[n], normalization, labels) for n in order
        }
        default = self.choose_default(fitting)
        opt = configs[default]["training"]["optimizer"]
        its = configs[default]["training"]["iterations"]
        if opt["name"] == "sgd":
            self.reason(
                f"optimizer: nnU-Net's SGD (lr 0.01, Nesterov momentum 0.99) with poly decay for {its} iterations"
            )
        else:
            self.reason(
                f"optimizer: AdamW (lr {opt['lr']:g}) with warm-up and poly decay: in {its} iterations (fewer than "
                f"{self.sgd_min_iterations}) nnU-Net's SGD with momentum 0.99 does not converge"
            )
        self.reason(
            "resampling: images with cubic splines, labels one-hot linear; the coarse axis of anisotropic data "
            "separately with nearest neighbour (nnU-Net). Cache in float16: half the IO, and normalised "
            "intensities need no more precision"
        )
        if "3d_lowres" in configs and "3d_fullres" in configs:
            configs["3d_lowres"] = {
                "inherits": "3d_fullres",
                **config_diff(configs["3d_lowres"], configs["3d_fullres"]),
            }
        data = {
            **self.plan_header(),
            "fingerprint": self.fingerprint_summary(),
            "labels": labels,
            "num_channels": int(self.need("num_channels")),
            "default_configuration": default,
            "configurations": configs,
            "reasons": list(self.reasons),
        }
        return Plan(data)
