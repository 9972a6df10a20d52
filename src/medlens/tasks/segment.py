"""Segmentation: the task adapter the engine trains, and how its predictions are post-processed.

The model family is the MONAI U-Net family chosen by the planner; the loss is Dice + cross-entropy (nnU-Net's);
validation runs sliding-window inference over whole validation cases on the preprocessed grid and reports the
mean foreground Dice. Post-processing (keep the largest connected component of a class) is decided on the
validation cases after training and kept only for the classes where it helps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medlens.data.sampler import PatchSampler
from medlens.errors import unknown_name
from medlens.plan.cache import Cache
from medlens.tasks.inference import dice_per_class, sliding_window_logits

log = logging.getLogger(__name__)

LOSSES = ("dice_ce", "dice", "ce")


def make_loss(spec: Mapping[str, Any]) -> nn.Module:
    """The plan's loss: ``dice_ce`` (nnU-Net: soft Dice over foreground, batch Dice, + cross-entropy)."""
    from monai.losses import DiceCELoss, DiceLoss

    name = str(spec.get("name", "dice_ce"))
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    if name == "ce":
        return _CrossEntropy()
    raise unknown_name("loss", name, LOSSES)


class _CrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, target[:, 0].long())


class SegmentationTask:
    """A :class:`~medlens.engine.task.TrainTask` over a preprocessed cache.

    Args:
        cache: the preprocessed cases.
        train_ids / val_ids: case ids of this fold.
        config: the resolved plan configuration.
        num_classes: classes including background.
        class_names: names of classes 1..K-1 (for the per-class validation scores).
    """

    score_key = "dice"

    def __init__(
        self,
        cache: Cache,
        train_ids: Sequence[str],
        val_ids: Sequence[str],
        config: Mapping[str, Any],
        num_classes: int,
        class_names: Sequence[str],
    ) -> None:
        from medlens.data.augment import make_augment

        self.cache = cache
        self.config = config
        self.num_classes = num_classes
        self.class_names = list(class_names)
        sampling = config.get("sampling", {})
        self.slice_axis = sampling.get("slice_axis") if config["spatial_dims"] == 2 else None
        self.sampler = PatchSampler(
            cache,
            train_ids,
            list(config["patch_size"]),
            int(config["batch_size"]),
            oversample_foreground=float(sampling.get("oversample_foreground", 0.33)),
            seed=int(config["training"].get("seed", 0)),
            augment=make_augment(config.get("augmentation"), int(config["spatial_dims"])),
            slice_axis=self.slice_axis,
        )
        max_cases = int(config.get("validation", {}).get("max_cases", len(val_ids)) or len(val_ids))
        self.val_ids = list(val_ids)[:max_cases]
        self.loss_fn = make_loss(config.get("loss", {}))

    def batches(self, seed: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        return self.sampler.batches(seed, start)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.loss_fn(model(batch["image"]), batch["label"])
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)

    def predict_case(self, model: nn.Module, case_id: str) -> torch.Tensor:
        """Class probabilities ``(K, *spatial)`` of one cached case on the preprocessed grid."""
        inf = self.config.get("inference", {})
        data = torch.from_numpy(np.asarray(self.cache.data(case_id), dtype=np.float32))
        return sliding_window_logits(
            model,
            data,
            list(inf.get("roi_size", self.config["patch_size"])),
            overlap=float(inf.get("overlap", 0.25)),
            sw_batch_size=int(inf.get("sw_batch_size", 4)),
            precision=str(self.config["training"].get("precision", "fp32")),
            slice_axis=self.slice_axis,
        )

    def validate(self, model: nn.Module) -> dict[str, float]:
        per_class: list[list[float]] = []
        for cid in self.val_ids:
            pred = self.predict_case(model, cid).argmax(0)
            seg = self.cache.seg(cid)
            if seg is None:
                continue
            per_class.append(dice_per_class(pred, torch.from_numpy(np.array(seg[0])), self.num_classes))
        scores = np.nanmean(np.asarray(per_class, dtype=float), axis=0) if per_class else []
        out = {f"dice_{n}": float(v) for n, v in zip(self.class_names, scores, strict=False)}
        out["dice"] = float(np.nanmean(scores)) if len(scores) else 0.0
        return out


# ---- post-processing ---------------------------------------------------------------------------------------------


def keep_largest_component(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Keep only the largest connected component of each class in ``classes`` (the rest becomes background)."""
    from scipy import ndimage

    out = labels.copy()
    for k in classes:
        mask = labels == k
        comp, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            out[mask & (comp != int(np.argmax(sizes)) + 1)] = 0
    return out


def postprocessing_effect(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, class_names: Sequence[str]
) -> dict[str, list[float]]:
    """Per class, the validation Dice ``[without, with]`` keeping only the largest component (one case)."""
    t = torch.from_numpy(np.array(truth))
    before = dice_per_class(torch.from_numpy(pred), t, num_classes)
    out = {}
    for k in range(1, num_classes):
        after = dice_per_class(torch.from_numpy(keep_largest_component(pred, [k])), t, num_classes)[k - 1]
        out[class_names[k - 1]] = [before[k - 1], after]
    return out


def decide_postprocessing(
    effects: Mapping[str, Mapping[str, Sequence[float]]],
) -> tuple[dict[str, bool], list[str]]:
    """Keep a class's largest component only where it raised mean validation Dice (nnU-Net's rule, strict).

    Args:
        effects: case id -> :func:`postprocessing_effect` of that case (all validation cases of all folds).

    Returns:
        ``{class name: keep?}`` and one reason line per class with the Dice before and after.
    """
    per_class: dict[str, list[Sequence[float]]] = {}
    for case in effects.values():
        for name, pair in case.items():
            per_class.setdefault(name, []).append(pair)
    decisions, reasons = {}, []
    for name, pairs in per_class.items():
        arr = np.asarray(pairs, dtype=float)
        b, a = float(np.nanmean(arr[:, 0])), float(np.nanmean(arr[:, 1]))
        decisions[name] = bool(a > b)
        verdict = "kept" if a > b else "not used"
        reasons.append(
            f"largest component for {name}: {verdict} (validation Dice {b:.4f} -> {a:.4f}, {len(arr)} cases)"
        )
    return decisions, reasons
