"""Classification: targets, the network outputs and loss per classification type, and the task adapter the
engine trains.

=============  ===========================  ======================  ===========================================
type           network outputs              loss (plan ``loss``)    class probabilities
=============  ===========================  ======================  ===========================================
binary         2 logits (MedMNIST layout)   ``ce`` (+ weights)      softmax; decision on P(positive)
multiclass     K logits                     ``ce`` (+ weights)      softmax; decision: argmax
multilabel     K logits                     ``bce``                 one sigmoid per label; per-label threshold
ordinal        K-1 cumulative logits        ``coral``               P(y=k) = P(y>k-1) - P(y>k); median grade
               (or K logits with ``ce``)    (or ``ce``)
=============  ===========================  ======================  ===========================================

Ordinal (``coral``): logit k models P(grade > k) and is trained with binary cross-entropy on the K-1 "grade
above k" targets (extended binary classification, as CORAL but without CORAL's weight sharing, so any
registry network serves). The cumulative probabilities are made non-increasing (a running minimum) before the
class probabilities are taken as their differences, so they are never negative and sum to 1.

Images come from :mod:`medlens.tasks.classify_data` (each image preprocessed once into one array); batches
are sampled from that array as a pure function of ``(seed, index)`` and augmented as a whole batch with
:class:`medlens.data.augment.BatchAugment`, then mixed (``augmentation.mixup``) if the plan says so.

Regularisation keys the planner sets for small datasets: ``loss.label_smoothing``, ``augmentation.mixup``, and
``validation.selection`` (which weights the engine keeps: best validation AUC, its running mean, or the last).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medlens.data.dataset import Case, Dataset
from medlens.errors import DatasetError, PlanError

log = logging.getLogger(__name__)

#: Losses each classification type accepts (the first is the planner's choice).
LOSSES = {"binary": ("ce",), "multiclass": ("ce",), "multilabel": ("bce",), "ordinal": ("coral", "ce")}
#: validation.selection -> the validation metric the engine maximises to choose the weights it keeps:
#: ``best`` the best validation AUC (MedMNIST's rule); ``smoothed`` the best mean AUC of the last
#: :data:`SMOOTHING_WINDOW` validations (after a resume the window restarts); ``last`` the final weights (the
#: number of batches trained, which only rises, also across a resume).
SELECTIONS = {"best": "auc", "smoothed": "auc_smoothed", "last": "trained_batches"}
SMOOTHING_WINDOW = 3


def check_loss(ctype: str, spec: Mapping[str, Any], where: str = "plan.json") -> str:
    """The plan's loss name, checked against the classification type."""
    name = str(spec.get("name", LOSSES[ctype][0]))
    if name not in LOSSES[ctype]:
        raise PlanError(
            f"{where}: loss.name {name!r} does not fit a {ctype} task; use {' or '.join(LOSSES[ctype])}"
        )
    return name


def num_outputs(ctype: str, num_classes: int, loss: str) -> int:
    """Network output channels for ``num_classes`` classes (labels for multilabel)."""
    if ctype == "binary":
        return 2
    if ctype == "ordinal" and loss == "coral":
        return num_classes - 1
    return num_classes


def class_probabilities(logits: torch.Tensor, ctype: str, loss: str) -> torch.Tensor:
    """Per-class probabilities ``(B, K)`` from network outputs (see the module docstring)."""
    logits = logits.float()
    if ctype == "multilabel":
        return torch.sigmoid(logits)
    if ctype == "ordinal" and loss == "coral":
        above = torch.cummin(torch.sigmoid(logits), dim=1).values  # P(y > k), non-increasing in k
        ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
        cum = torch.cat([ones, above, zeros], dim=1)
        return (cum[:, :-1] - cum[:, 1:]).clamp_min(0)
    return torch.softmax(logits, dim=1)


class ClassificationLoss(nn.Module):
    """The plan's loss: ``ce`` (optionally class-weighted), ``bce`` (``class_weights`` = per-label positive
    weights), ``coral`` (BCE on the cumulative targets; ``class_weights`` weight each case by its grade).

    ``label_smoothing`` (eps, default 0) softens the targets: for ``ce`` as torch's ``label_smoothing`` (1 - eps on
    the class, eps spread uniformly), for ``bce``/``coral`` each 0/1 target becomes eps/2 / 1 - eps/2.
    """

    def __init__(self, spec: Mapping[str, Any], ctype: str, num_classes: int) -> None:
        super().__init__()
        self.name = check_loss(ctype, spec)
        self.ctype, self.k = ctype, num_classes
        eps = spec.get("label_smoothing", 0.0)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < 1:
            raise PlanError(f"plan.json: loss.label_smoothing must be a number in [0, 1), got {eps!r}")
        self.smoothing = float(eps)
        weights = spec.get("class_weights")
        if weights is not None and len(weights) != num_classes:
            raise PlanError(
                f"plan.json: loss.class_weights has {len(weights)} values for {num_classes} classes; give one per class"
            )
        self.weights: torch.Tensor | None
        self.register_buffer(
            "weights", None if weights is None else torch.tensor(weights, dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        w = None if self.weights is None else self.weights.to(logits.device)
        eps = self.smoothing
        if self.name == "ce":
            return nn.functional.cross_entropy(logits, target.long(), weight=w, label_smoothing=eps)
        if self.name == "bce":
            soft = target.float() * (1 - eps) + eps / 2
            return nn.functional.binary_cross_entropy_with_logits(logits, soft, pos_weight=w)
        levels = (target.long()[:, None] > torch.arange(self.k - 1, device=logits.device)[None, :]).float()
        levels = levels * (1 - eps) + eps / 2
        per_case = nn.functional.binary_cross_entropy_with_logits(logits, levels, reduction="none").mean(
            dim=1
        )
        if w is None:
            return per_case.mean()
        cw = w[target.long()]
        return (per_case * cw).sum() / cw.sum()


# ---- targets ---------------------------------------------------------------------------------------------------
def targets(dataset: Dataset, cases: Sequence[Case]) -> np.ndarray:
    """Class indices ``(N,)`` (0..K-1 by label value, so index k is ``dataset.class_names[k]``) or 0/1 labels
    ``(N, K)`` for multilabel, checked.

    Raises:
        DatasetError: a missing label, a label outside the declared classes, or a multi-label list given to a
            single-label task (or the reverse), naming ``dataset.json`` and the case.
    """
    ctype = dataset.classification_type or "multiclass"
    values = sorted(dataset.labels.values())
    index = {v: i for i, v in enumerate(values)}
    declared = ", ".join(f"{v} {n}" for n, v in sorted(dataset.labels.items(), key=lambda kv: kv[1]))
    where = dataset.json_path
    out: list[Any] = []
    for c in cases:
        lab = c.label
        if lab is None:
            raise DatasetError(f"{where}: case {c.id!r} has no 'label'; every training case needs one")
        if ctype == "multilabel":
            k = len(values)
            ok = (
                isinstance(lab, list)
                and len(lab) == k
                and all(v in (0, 1) and not isinstance(v, bool) for v in lab)
            )
            if not ok:
                hint = " (a class index: is this a multiclass dataset?)" if isinstance(lab, int) else ""
                raise DatasetError(
                    f"{where}: case {c.id!r} has label {lab!r}; a multilabel case needs a list of {k} values 0/1, one "
                    f"per declared label{hint}"
                )
            out.append(lab)
            continue
        if isinstance(lab, list):
            raise DatasetError(
                f"{where}: case {c.id!r} has the multi-label list {lab!r}, but classification_type is {ctype!r}; "
                'set "classification_type": "multilabel" in dataset.json, or give one class index per case'
            )
        if isinstance(lab, bool) or not isinstance(lab, int) or lab not in index:
            raise DatasetError(
                f"{where}: case {c.id!r} has label {lab!r}, which is not a declared class (labels: {declared}); "
                "fix the case or add the class to 'labels'"
            )
        out.append(index[lab])
    if ctype == "multilabel":
        return np.asarray(out, dtype=np.float32).reshape(len(out), len(values))
    return np.asarray(out, dtype=np.int64)


# ---- the engine's task ------------------------------------------------------------------------------------------
class ClassificationTask:
    """A :class:`~medlens.engine.task.TrainTask` over preprocessed images held in one array.

    Args:
        images: ``(N, C, *size)`` preprocessed images (float16/32, in memory or memory-mapped).
        targets: per image, as :func:`targets` returns.
        train_rows / val_rows: rows of ``images`` that train and validate.
        config: the resolved plan configuration.
        ctype: the classification type.
        num_classes: classes (labels) K.
    """

    score_key = "auc"

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        train_rows: Sequence[int] | np.ndarray,
        val_rows: Sequence[int] | np.ndarray,
        config: Mapping[str, Any],
        ctype: str,
        num_classes: int,
    ) -> None:
        from medlens.data.augment import make_augment

        self.images, self.targets = images, targets
        self.train_rows = np.asarray(train_rows, dtype=np.int64)
        if self.train_rows.size == 0:
            raise DatasetError("no training images in this fold")
        self.config, self.ctype, self.k = config, ctype, num_classes
        self.batch_size = int(config["batch_size"])
        self.loss_fn = ClassificationLoss(config.get("loss", {}), ctype, num_classes)
        self.augment = make_augment(config.get("augmentation"), int(config["spatial_dims"]))
        self.mixup = mixup_params(config.get("augmentation"))
        self.balanced = bool(config.get("sampling", {}).get("balanced", False)) and ctype != "multilabel"
        if self.balanced:
            labels = targets[self.train_rows]
            self.by_class = [self.train_rows[labels == k] for k in range(num_classes) if np.any(labels == k)]
        cap = config.get("validation", {}).get("max_cases") or len(val_rows)
        val = np.asarray(val_rows, dtype=np.int64)
        if len(val) > cap:  # a fixed random subset: sorted ids may be grouped by class
            val = np.sort(np.random.default_rng(0).choice(val, size=int(cap), replace=False))
        self.val_rows = val
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        # Which weights the engine keeps (the plan's validation.selection; see SELECTIONS).
        self.selection = str(config.get("validation", {}).get("selection", "best"))
        if self.selection not in SELECTIONS:
            raise PlanError(
                f"plan.json: validation.selection {self.selection!r} is not one of {', '.join(SELECTIONS)}"
            )
        self.score_key = SELECTIONS[self.selection]
        self._recent: list[float] = []
        self._trained = 0  # batches handed to the engine (its iteration count)

    def _epoch_perm(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[key] = np.random.default_rng([seed, 1_000_003, epoch]).permutation(self.train_rows)
        return self._perms[key]

    def rows(self, seed: int, index: int) -> np.ndarray:
        """Image rows of batch ``index``: epoch-wise shuffles, or class-balanced draws."""
        b, n = self.batch_size, len(self.train_rows)
        if self.balanced:
            rng = np.random.default_rng([seed, index])
            classes = rng.integers(len(self.by_class), size=b)
            return np.array([self.by_class[c][rng.integers(len(self.by_class[c]))] for c in classes])
        pos = index * b + np.arange(b)
        return np.array([self._epoch_perm(seed, int(p // n))[p % n] for p in pos])

    def batch(self, seed: int, index: int) -> dict[str, torch.Tensor]:
        """Batch number ``index`` of the stream for ``seed`` (a pure function of both)."""
        rows = self.rows(seed, index)
        self._trained = max(self._trained, index + 1)
        order = np.argsort(rows, kind="stable")  # sorted reads are kinder to a memory-mapped array
        data = np.empty((len(rows), *self.images.shape[1:]), dtype=np.float32)
        data[order] = self.images[rows[order]]
        out = {"image": torch.from_numpy(data)}
        if self.augment is not None:
            gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, index, 7]).integers(2**62)))
            out = self.augment(out, gen)
        out["target"] = torch.from_numpy(np.asarray(self.targets[rows]))
        if self.mixup is not None:
            rng = np.random.default_rng([seed, index, 11])
            p, alpha = self.mixup
            if rng.random() < p:  # mixup (Zhang et al. 2018): convex pairs of images, the loss mixed alike
                lam = float(rng.beta(alpha, alpha))
                lam = max(lam, 1.0 - lam)  # the first image dominates, so its augmentation stays meaningful
                perm = torch.from_numpy(rng.permutation(len(rows)))
                out["image"] = lam * out["image"] + (1.0 - lam) * out["image"][perm]
                out["target_mixed"] = out["target"][perm]
                out["mix"] = torch.tensor(lam, dtype=torch.float32)
        return out

    def batches(self, seed: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        index = int(start)
        while True:
            yield self.batch(int(seed), index)
            index += 1

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["image"])
        if "mix" not in batch:
            return self.loss_fn(logits, batch["target"])
        lam = batch["mix"].to(logits.device)
        return lam * self.loss_fn(logits, batch["target"]) + (1 - lam) * self.loss_fn(
            logits, batch["target_mixed"]
        )

    def validate(self, model: nn.Module) -> dict[str, float]:
        """AUC as MedMNIST defines it (its model selection), accuracy and balanced accuracy."""
        from medlens.evaluate.classification import point_metrics

        scores = predict_scores(
            model, self.images, self.val_rows, self.ctype, self.loss_fn.name, self.batch_size * 2
        )
        m = point_metrics(self.targets[self.val_rows], scores, classification_type=self.ctype)
        out = {"auc": m["medmnist_auc"], "acc": m["accuracy"], "balanced_acc": m["balanced_accuracy"]}
        self._recent.append(float(m["medmnist_auc"]))
        out["auc_smoothed"] = float(np.mean(self._recent[-SMOOTHING_WINDOW:]))
        out["trained_batches"] = float(self._trained)
        return out


def mixup_params(augmentation: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """(probability per batch, Beta alpha) of the plan's ``augmentation.mixup``, or None when it is off.

    The section is validated with the rest of ``augmentation`` by :func:`medlens.data.augment.parse_augmentation`.
    """
    from medlens.data.augment import DEFAULTS

    spec = (augmentation or {}).get("mixup")
    if not spec:
        return None
    v = {**DEFAULTS["mixup"], **spec}
    return (float(v["p"]), float(v["alpha"])) if float(v["p"]) > 0 else None


@torch.no_grad()
def predict_scores(
    model: nn.Module,
    images: np.ndarray,
    rows: Sequence[int] | np.ndarray | None,
    ctype: str,
    loss: str,
    batch_size: int = 64,
    *,
    mirror_axes: Sequence[int] = (),
    autocast: Any = None,
) -> np.ndarray:
    """Class probabilities ``(N, K)`` of ``images[rows]`` (all rows when None), in batches.

    Args:
        mirror_axes: test-time augmentation: probabilities are averaged over every combination of flips.
        autocast: a context-manager factory (e.g. from :func:`medlens.tasks.inference.autocast_for`).
    """
    import contextlib
    import itertools

    device = next(model.parameters()).device
    rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
    axes = [int(a) + 2 for a in mirror_axes]
    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    out = []
    for start in range(0, len(rows), max(1, batch_size)):
        x = torch.from_numpy(np.asarray(images[rows[start : start + batch_size]], dtype=np.float32)).to(
            device
        )
        probs = torch.zeros(0)
        for dims in combos:
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = model(torch.flip(x, dims) if dims else x)
            p = class_probabilities(logits, ctype, loss)
            probs = p if probs.numel() == 0 else probs + p
        out.append((probs / len(combos)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
