"""Classification planning: input size, normalisation, network, batch, imbalance handling and augmentation for a
time budget, each rule a named method of :class:`ClassificationPlanner` whose constants are class attributes.

Whole images are resized to one input size (no patches), so the plan has one configuration, ``2d`` or ``3d``,
whose ``patch_size`` is that input size. The network, batch, threads and precision are sized for the budget by
:class:`medlens.plan.classification_sizing.WholeImagePlanner` (a ResNet ladder, timed on this machine);
DenseNet-121 and EfficientNet-B0 are in the same family (``overrides={"network": {"name": "densenet121"}}``),
but on a CPU budget they cost more per step than a ResNet of similar accuracy, so the ladder does not pick them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from medlens.errors import PlanError
from medlens.plan.budget import format_seconds
from medlens.plan.classification_sizing import WholeImagePlanner
from medlens.plan.plan import Plan, deep_merge
from medlens.plan.planner import fmt

#: Network outputs per classification type (binary: two softmax logits, as MedMNIST; ordinal: K-1 cumulative).
OUTPUTS = {
    "binary": lambda k: 2,
    "multiclass": lambda k: k,
    "multilabel": lambda k: k,
    "ordinal": lambda k: k - 1,
}
#: Modalities whose class labels may depend on left and right (no mirroring), and those whose content has no
#: preferred orientation (mirroring along every axis, any rotation).
NO_MIRROR = ("CT", "PT", "NM", "DX", "CR", "XR", "MG", "RTDOSE")
ORIENTATION_FREE = ("SM", "OP")


class ClassificationPlanner(WholeImagePlanner):
    """Rules for whole-image classification (binary, multiclass, multilabel, ordinal; 2D and 3D)."""

    task = "classification"
    weight_ratio = 1.5  # majority/minority class count ratio from which the loss is class-weighted ...
    sampling_ratio = 10.0  # ... and from which batches are class-balanced instead
    small_validation = 200  # expected validation cases below which the final weights are kept, not the best
    regularise_epochs = 25.0  # planned passes over the training images from which training is regularised

    # ---- the data -----------------------------------------------------------------------------------------
    def classification_type(self) -> str:
        ctype = self.fp.get("classification_type")
        if ctype is None:
            ctype = "binary" if len(self.class_names()) <= 2 else "multiclass"
            self.reason(
                f"classification type: {ctype} (the fingerprint does not say; inferred from the class count)"
            )
        if ctype not in OUTPUTS:
            raise PlanError(f"fingerprint: classification_type {ctype!r} is not one of {', '.join(OUTPUTS)}")
        return str(ctype)

    def class_names(self) -> list[str]:
        names = self.need("classes", "names")
        return [str(n) for _, n in sorted(names.items(), key=lambda kv: int(kv[0]))]

    def labels(self) -> dict[str, int]:
        return {str(n): int(v) for v, n in self.need("classes", "names").items()}

    @property
    def num_classes(self) -> int:
        """Network outputs (used to cost the network)."""
        k = len(self.class_names())
        return int(OUTPUTS[self.fp.get("classification_type") or ("binary" if k <= 2 else "multiclass")](k))

    def class_counts(self) -> list[int]:
        counts = self.fp.get("classes", {}).get("counts", {})
        return [int(counts.get(str(v), 0)) for v in sorted(self.labels().values())]

    def is_rgb(self) -> bool:
        return int(self.need("num_channels")) == 3 and self.ndim == 2

    @property
    def modality(self) -> str:
        return str(self.fp.get("modalities", {}).get("0", "OT"))

    # ---- rules -------------------------------------------------------------------------------------------
    def input_size(self) -> list[int]:
        """The smallest standard size covering the median image's longest edge, capped at 224 (2D) / 128 (3D);
        images already at a standard size (MedMNIST's 28, 64, 128, 224) keep it. Square (cubic): networks
        with global pooling need no particular aspect, and one size makes one batch."""
        nd = self.ndim
        if "patch_size" in self.overrides:
            size = [int(v) for v in self.overrides["patch_size"]]
            if len(size) != nd:
                raise PlanError(f"overrides: patch_size {size} must have {nd} values for {nd}D images")
            self.reason(f"input size: {fmt(size)} (override)")
            return size
        median = max(float(v) for v in self.need("shape", "median"))
        lo, hi = self.need("shape", "min"), self.need("shape", "max")
        edge = next((s for s in self.sizes[nd] if s >= median), self.sizes[nd][-1])
        mixed = list(lo) != list(hi)
        note = f"; sizes vary from {fmt(lo)} to {fmt(hi)}, every image is resized" if mixed else ""
        self.reason(
            f"input size: {edge}^{nd}: the smallest standard size covering the median image edge "
            f"{median:.0f} (capped at {self.sizes[nd][-1]}){note}"
        )
        return [edge] * nd

    def normalization(self) -> dict[str, dict[str, Any]]:
        """CT: the dataset-wide CT scheme (clip to the 0.5-99.5 percentiles, z-score with dataset mean/std);
        MR: per-image z-score (no fixed scale); 8-bit images (RGB, photographs, most X-ray and ultrasound
        exports): rescale 0..255 to 0..1 per channel, which keeps colour and brightness that a per-image
        z-score would erase; other intensities: per-image z-score."""
        given = dict(self.overrides.get("normalization", {}))
        out: dict[str, dict[str, Any]] = {}
        for c in range(int(self.need("num_channels"))):
            key = str(c)
            mod = str(self.fp.get("modalities", {}).get(key, "OT"))
            st = self.fp.get("intensity", {}).get(key) or {}
            eight_bit = (
                st.get("min") is not None
                and st["min"] >= 0
                and st.get("max") is not None
                and st["max"] <= 255
            )
            if key in given:
                out[key] = dict(given[key])
                self.reason(f"normalisation of channel {c}: {out[key]} (override)")
            elif mod == "CT" and st.get("mean") is not None:
                out[key] = {
                    "scheme": "ct",
                    "clip": [st["p00_5"], st["p99_5"]],
                    "mean": st["mean"],
                    "std": st["std"],
                }
                self.reason(
                    f"normalisation of channel {c} (CT): clip to [{st['p00_5']:.4g}, {st['p99_5']:.4g}], z-score "
                    f"with the dataset mean {st['mean']:.4g} and std {st['std']:.4g} (CT values are quantitative)"
                )
            elif mod != "MR" and eight_bit:
                out[key] = {"scheme": "rescale", "range": [0.0, 255.0]}
                self.reason(
                    f"normalisation of channel {c} ({mod}): 8-bit values, rescaled 0..255 -> 0..1, keeping the "
                    "colour and brightness a per-image z-score would erase"
                )
            else:
                out[key] = {"scheme": "zscore", "use_nonzero_mask": False}
                self.reason(
                    f"normalisation of channel {c} ({mod}): per-image z-score ({mod} intensities have no fixed scale)"
                )
        return out

    def imbalance(self, ctype: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Loss and sampling from the class counts of the fingerprint.

        Single-label types, with r = largest / smallest class count: r < ``weight_ratio``: plain loss;
        ``weight_ratio`` <= r < ``sampling_ratio``: class-weighted loss, weights n / (K n_k) (scikit-learn's
        "balanced"); r >= ``sampling_ratio``: class-balanced batches (each sample draws a class uniformly, then
        an image of it), since weights that large make the gradient of a batch depend on whether its few
        minority images happened to be drawn. Multi-label: plain BCE: per-label positive weights would inflate
        every probability and break the 0.5 decision rule, while the ranking (AUC) is learned either way;
        rare labels get their own thresholds on validation instead.
        """
        loss_name = {"binary": "ce", "multiclass": "ce", "multilabel": "bce", "ordinal": "coral"}[ctype]
        loss: dict[str, Any] = {"name": loss_name}
        sampling: dict[str, Any] = {"balanced": False}
        counts = self.class_counts()
        names = self.class_names()
        if ctype == "multilabel":
            n = int(self.need("num_cases"))
            prev = [c / max(n, 1) for c in counts]
            rare = min(range(len(prev)), key=lambda j: prev[j]) if prev else 0
            self.reason(
                f"imbalance: multi-label, positives per label {min(prev, default=0):.1%}..{max(prev, default=0):.1%} "
                f"(rarest: {names[rare] if names else '?'}); plain BCE, no positive weights (they would inflate every "
                "probability and break the 0.5 rule); per-label thresholds are chosen on validation"
            )
            return loss, sampling
        present = [c for c in counts if c > 0]
        ratio = max(present) / min(present) if present else 1.0
        summary = ", ".join(f"{n_}: {c}" for n_, c in zip(names, counts, strict=False))
        if ratio >= self.sampling_ratio:
            sampling["balanced"] = True
            self.reason(
                f"imbalance: class counts {summary} (ratio {ratio:.1f} >= {self.sampling_ratio:g}): class-balanced "
                "batches (each sample draws a class uniformly), unweighted loss"
            )
        elif ratio >= self.weight_ratio:
            total = sum(counts)
            loss["class_weights"] = [round(total / (len(counts) * max(c, 1)), 4) for c in counts]
            self.reason(
                f"imbalance: class counts {summary} (ratio {ratio:.1f} in [{self.weight_ratio:g}, "
                f"{self.sampling_ratio:g})): class-weighted loss, weights {loss['class_weights']} (n / (K n_k))"
            )
        else:
            self.reason(
                f"imbalance: class counts {summary} (ratio {ratio:.1f} < {self.weight_ratio:g}): plain loss"
            )
        return loss, sampling

    def regularisation(self, epochs: float) -> dict[str, Any]:
        """Regularisation for budgets that show each training image many times (``regularise_epochs`` or more),
        where the plain recipe drives a few hundred images to near-zero training loss (brain-lesion: below 0.2
        by about 25 epochs): mixup on half the batches (alpha 0.4).

        Measured on brain-lesion at the demo's 90 s over three seeds, final weights kept (test AUC, mean and
        range): plain 0.726 (0.71-0.74); mixup 0.787 (0.78-0.80); weight decay 0.05 0.763 (0.73-0.80); mixup
        with weight decay 0.05 0.755 (0.66-0.82); stronger spatial/intensity augmentation 0.762 (0.74-0.79; its
        per-image resampling halved the steps the budget bought); label smoothing 0.1 0.723; all four 0.726;
        so mixup alone, the best and the steadiest (bench/classification/sweep.py, bench/RESULTS.md).

        Returns:
            Transforms to add to the modality's augmentation (``{}`` below ``regularise_epochs``).
        """
        if epochs < self.regularise_epochs:
            self.reason(
                f"regularisation: standard ({epochs:.0f} epochs of about {self.n_train} training images < "
                f"{self.regularise_epochs:g}: each image is seen too rarely to be memorised)"
            )
            return {}
        self.reason(
            f"regularisation: {epochs:.0f} epochs of about {self.n_train} training images (>= "
            f"{self.regularise_epochs:g}: enough to memorise them): mixup on half the batches (alpha 0.4); on "
            "brain-lesion (3 seeds, final weights) it raised test AUC from 0.726 to 0.787 and narrowed its range"
        )
        return {"mixup": {"p": 0.5, "alpha": 0.4}}

    def augmentation(self, nd: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Mirroring only where anatomy allows: none for CT/PET/X-ray (class labels may be lateral, e.g. left
        and right kidney; chest films carry side markers and the heart's side), left-right only for MR, US and
        OCT (up-down would turn the anatomy over), every axis and any rotation for microscopy, fundus and
        colour photographs (no preferred orientation). Small rotation (+-15 degrees) and scaling elsewhere;
        brightness, contrast, gamma (gray images only: per-channel gamma shifts colours) and noise. ``extra``:
        transforms the regularisation rule adds (mixup)."""
        mod, rgb = self.modality, self.is_rgb()
        free = mod in ORIENTATION_FREE or (rgb and mod == "OT")
        if free:
            axes, deg, p_rot, why = (
                list(range(nd)),
                180.0,
                0.5,
                f"{mod}{' colour' if rgb else ''} images have no preferred orientation",
            )
        elif mod in NO_MIRROR:
            axes, deg, p_rot, why = (
                [],
                15.0,
                0.2,
                f"{mod}: labels may depend on left and right (side markers, lateral organs)",
            )
        elif mod in ("MR", "US", "OCT"):
            axes, deg, p_rot, why = (
                [0],
                15.0,
                0.2,
                f"{mod}: left-right mirroring only (up-down turns the anatomy over)",
            )
        else:
            axes, deg, p_rot, why = [], 15.0, 0.2, f"{mod}: unknown content, so no mirroring"
        planes = [[0, 1]]
        aug: dict[str, Any] = {
            "mirror": {"p": 0.5 if axes else 0.0, "axes": axes or [0]},
            "rotation": {"p": p_rot, "degrees": deg, "planes": planes},
            "scaling": {"p": 0.2, "range": [0.85, 1.15]},
            "gamma": {"p": 0.0 if rgb else 0.3, "range": [0.7, 1.5], "invert_p": 0.0},
            "noise": {"p": 0.1, "std": [0.0, 0.05]},
            "brightness": {"p": 0.15, "range": [0.8, 1.2]},
            "contrast": {"p": 0.15, "range": [0.8, 1.2]},
        }
        aug = deep_merge(aug, extra or {})  # the regularisation rule's transforms (mixup)
        rot, sc = aug["rotation"], aug["scaling"]
        mix = aug.get("mixup", {})
        self.reason(
            f"augmentation: mirroring along axes {axes or 'none'} ({why}); rotation +-{rot['degrees']:g} degrees in "
            f"plane (p {rot['p']:g}), scaling {sc['range'][0]:g}-{sc['range'][1]:g} (p {sc['p']:g}), "
            f"brightness/contrast, {'no gamma (colour), ' if rgb else 'gamma, '}noise"
            + (f", mixup (p {mix['p']:g}, alpha {mix['alpha']:g})" if mix.get("p") else "")
        )
        return deep_merge(aug, self.overrides.get("augmentation", {}))

    def selection(self) -> str:
        """Which weights training keeps (``validation.selection``): the best validation AUC (MedMNIST's rule), or,
        with fewer than ``small_validation`` expected validation cases, the final weights of the annealed
        schedule. A small validation set measures AUC more coarsely than late checkpoints differ, and its cases
        come from few patients: on brain-lesion (66 validation slices of 6 patients) the best-validation
        checkpoint was often an early, barely trained one, while the final weights were the better ones on the
        held-out test slices in every run (bench/classification/sweep.py, RESULTS.md)."""
        n_val = max(1, round(int(self.need("num_cases")) * self.val_case_fraction))
        if n_val >= self.small_validation:
            self.reason(
                f"model selection: the best validation AUC is kept (MedMNIST's rule; about {n_val} validation cases)"
            )
            return "best"
        a, n1 = 0.8, max(1, n_val // 2)  # Hanley & McNeil's standard error of an AUC of 0.8, balanced classes
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        se = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n1 - 1) * (q2 - a * a)) / (n1 * n1))
        self.reason(
            f"model selection: the final weights (end of the annealed schedule), not the best validation AUC: about "
            f"{n_val} validation cases (< {self.small_validation}) measure an AUC of 0.8 only to +-{1.96 * se:.2f} "
            "(95%, more if they come from few patients), wider than late checkpoints differ, so the best of many "
            "validations is mostly the luckiest; validation still chooses the decision threshold"
        )
        return "last"

    def optimizer(self, iterations: int) -> dict[str, Any]:
        return {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4}

    def schedule(self, iterations: int) -> dict[str, Any]:
        return {"name": "cosine", "warmup_iterations": min(100, iterations // 20)}

    def plan(self) -> Plan:
        """Run the rules and assemble the plan (one configuration, ``2d`` or ``3d``)."""
        nd = self.ndim
        ctype = self.classification_type()
        labels = self.labels()
        size = self.input_size()
        cache_bytes = int(self.need("num_cases")) * int(self.need("num_channels")) * math.prod(size) * 2
        while (
            cache_bytes > self.memory_limit
            and size[0] > self.sizes[nd][0]
            and "patch_size" not in self.overrides
        ):
            smaller = max(s for s in self.sizes[nd] if s < size[0])
            self.reason(
                f"input size: {smaller} instead of {size[0]}: the preprocessed images would need {cache_bytes / 1e9:.2g} GB"
            )
            size = [smaller] * nd
            cache_bytes = int(self.need("num_cases")) * int(self.need("num_channels")) * math.prod(size) * 2
        normalization = self.normalization()
        spec, batch, seconds, measured = self.choose_network(size)
        cost = self.cost(spec, nd, size)
        if self.memory_needed(cost, batch) > self.memory_limit:
            raise PlanError(
                f"no configuration fits in {self.memory_limit / 1e9:.2g} GB of memory: {spec['name']} at {fmt(size)} x "
                f"batch {batch} needs {self.memory_needed(cost, batch) / 1e9:.2g} GB (overrides={{'patch_size': [...]}})"
            )
        loss, sampling = self.imbalance(ctype)
        val_cases, val_seconds = self.validation(seconds, batch)
        training, est = self.training(seconds, val_seconds)
        ep, _ = self.epochs(seconds, batch)
        extra_augmentation = self.regularisation(training["iterations"] * batch / self.n_train)
        selection = self.selection()
        self.reason(
            f"training: AdamW (lr {training['optimizer']['lr']:g}, weight decay "
            f"{training['optimizer']['weight_decay']:g}) with warm-up and cosine decay for {training['iterations']} "
            f"iterations of {batch} ({format_seconds(training['iterations'] * seconds)}), {est['validations']} "
            f"validations on up to {val_cases} cases"
        )
        self.reason(
            {
                "binary": "decision: two softmax outputs (MedMNIST's layout); the threshold on the positive "
                "probability is chosen on validation after training (Youden's J, or a target sensitivity)",
                "multiclass": "decision: softmax over the classes, the most probable class",
                "multilabel": "decision: one sigmoid per label; per-label thresholds chosen on validation",
                "ordinal": "ordinal: K-1 cumulative logits P(grade > k) with binary cross-entropy (an extended binary "
                "/ CORAL-style head without weight sharing); class probabilities are differences of the cumulative "
                "probabilities made monotone; the predicted grade is the median of that distribution (#{k: P(grade > k) > 0.5}, CORAL's rule, which minimises the expected absolute grade error)",
            }[ctype]
        )
        name = f"{nd}d"
        config = {
            "spatial_dims": nd,
            "patch_size": list(size),
            "batch_size": batch,
            "preprocessing": {
                "target_spacing": None,
                "orientation": "RAS" if nd == 3 else "none",
                "crop_nonzero": False,
                "resample_data": "linear",
                "normalization": normalization,
                "cache_dtype": "float16",
            },
            "network": spec,
            "loss": loss,
            "sampling": sampling,
            "augmentation": self.augmentation(nd, extra_augmentation),
            "training": training,
            "inference": {"mirror_axes": [], "precision": self.precision},
            "postprocessing": {},
            "validation": {"max_cases": val_cases, "selection": selection},
            "estimates": {
                "seconds_per_iteration": round(seconds, 4),
                "measured": measured,
                "memory_gb": round(self.memory_needed(cost, batch) / 1e9, 3),
                "gflops_per_iteration": round(cost.flops * batch / 1e9, 2),
                "epochs": round(ep, 2),
                "cache_gb": round(cache_bytes / 1e9, 3),
                **est,
            },
        }
        data = {
            **self.plan_header(),
            "fingerprint": {
                "ndim": nd,
                "num_cases": int(self.need("num_cases")),
                "num_channels": int(self.need("num_channels")),
                "modalities": self.fp.get("modalities", {}),
                "classification_type": ctype,
                "class_counts": dict(zip(self.class_names(), self.class_counts(), strict=False)),
                "shape_median": self.fp.get("shape", {}).get("median"),
                "shape_min": self.fp.get("shape", {}).get("min"),
                "shape_max": self.fp.get("shape", {}).get("max"),
            },
            "labels": labels,
            "num_channels": int(self.need("num_channels")),
            "default_configuration": name,
            "configurations": {name: config},
            "reasons": list(self.reasons),
        }
        return Plan(data)
