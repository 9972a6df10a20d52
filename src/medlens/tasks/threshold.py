"""Decision thresholds chosen on validation predictions, for binary tasks and each label of a multi-label task.

A case is called positive when its score is ``>= threshold``. Two rules:

* ``youden`` (default): maximise Youden's J = sensitivity + specificity - 1 on the validation cases;
* ``sensitivity``: the highest threshold whose validation sensitivity is at least the target (e.g. 0.95), so
  specificity is as high as that sensitivity allows.

Any threshold between two consecutive distinct validation scores classifies the validation cases the same
way; the midpoint between them is taken (not the score itself), so a new case scoring just below the lowest
accepted positive is not pushed over the line by chance. Ties in J go to the threshold closest to 0.5.
When validation holds no positive or no negative case, no threshold can be chosen: 0.5 is kept and the
reason says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medlens.errors import InputError

RULES = ("youden", "sensitivity")


@dataclass(frozen=True)
class ThresholdChoice:
    """A chosen threshold and what it achieves on the validation cases.

    Attributes:
        threshold: positive when ``score >= threshold``.
        rule: ``"youden"``, ``"sensitivity"`` or ``"default"`` (nothing to choose from).
        sensitivity / specificity: on the validation cases at ``threshold`` (None when undefined).
        target_sensitivity: the target of the ``sensitivity`` rule.
        n_positive / n_negative: validation cases behind the choice.
        reason: one sentence for ``run.json`` and the report.
    """

    threshold: float
    rule: str
    sensitivity: float | None
    specificity: float | None
    target_sensitivity: float | None
    n_positive: int
    n_negative: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_target_sensitivity(value: Any) -> float:
    """Validate a target sensitivity (``--sensitivity``): a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
        raise InputError(
            f"--sensitivity {value!r}: give the target sensitivity as a fraction in (0, 1], e.g. 0.95"
        )
    return float(value)


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Thresholds that split the sorted distinct scores: below all, midpoints, above all."""
    u = np.unique(scores)
    mids = (u[1:] + u[:-1]) / 2.0
    return np.concatenate([[u[0] - 1e-6], mids, [u[-1] + 1e-6]])


def _rates(y: np.ndarray, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity at every threshold in ``t``."""
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    sens = 1.0 - np.searchsorted(pos, t, side="left") / pos.size  # positives scoring >= t
    spec = np.searchsorted(neg, t, side="left") / neg.size  # negatives scoring < t
    return sens, spec


def choose_threshold(
    y_true: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    rule: str = "youden",
    target_sensitivity: float | None = None,
    name: str = "the positive class",
) -> ThresholdChoice:
    """Choose a decision threshold on validation scores.

    Args:
        y_true: 0/1 truth per validation case.
        scores: the positive-class score (probability) per case.
        rule: ``"youden"`` or ``"sensitivity"``.
        target_sensitivity: the sensitivity to reach (rule ``"sensitivity"``), in (0, 1].
        name: how the reason names the class or label.

    Raises:
        InputError: unknown rule, a missing or bad target, or truth and scores of different lengths.
    """
    if rule not in RULES:
        raise InputError(f"threshold rule {rule!r}: use one of {', '.join(RULES)}")
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise InputError(f"threshold: {y.size} truth values but {s.size} scores")
    target = None
    if rule == "sensitivity":
        if target_sensitivity is None:
            raise InputError(
                "threshold rule 'sensitivity' needs a target sensitivity (e.g. --sensitivity 0.95)"
            )
        target = check_target_sensitivity(target_sensitivity)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        missing = "positive" if n_pos == 0 else "negative"
        return ThresholdChoice(
            0.5, "default", None, None, target, n_pos, n_neg,
            f"threshold for {name}: 0.5 (validation has no {missing} case to choose from)",
        )  # fmt: skip
    cand = _candidates(s)
    sens, spec = _rates(y, s, cand)
    if rule == "youden":
        j = sens + spec - 1.0
        best = np.flatnonzero(np.isclose(j, j.max(), rtol=0, atol=1e-12))
        i = int(best[np.argmin(np.abs(cand[best] - 0.5))])
        reason = (
            f"threshold for {name}: {cand[i]:.4g}, maximising Youden's J ({j[i]:.3f}) on {n_pos} positive and "
            f"{n_neg} negative validation cases: sensitivity {sens[i]:.3f}, specificity {spec[i]:.3f}"
        )
    else:
        assert target is not None
        ok = np.flatnonzero(sens >= target - 1e-12)
        i = int(
            ok[np.argmax(cand[ok])]
        )  # sensitivity falls as the threshold rises: the highest that keeps it
        reason = (
            f"threshold for {name}: {cand[i]:.4g}, the highest reaching the target sensitivity {target:g} on "
            f"{n_pos} positive validation cases (sensitivity {sens[i]:.3f}, specificity {spec[i]:.3f} on "
            f"{n_neg} negative cases)"
        )
    thr = round(float(np.clip(cand[i], 0.0, 1.0)) if s.min() >= 0.0 and s.max() <= 1.0 else float(cand[i]), 6)
    return ThresholdChoice(thr, rule, float(sens[i]), float(spec[i]), target, n_pos, n_neg, reason)


def choose_thresholds(
    y_true: np.ndarray,
    scores: np.ndarray,
    *,
    rule: str = "youden",
    target_sensitivity: float | None = None,
    names: Sequence[str] | None = None,
) -> list[ThresholdChoice]:
    """:func:`choose_threshold` for each column of multi-label truth and scores ``(N, K)``."""
    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape:
        raise InputError(
            f"multi-label thresholds need truth and scores of one shape (N, K), got {y.shape} and {s.shape}"
        )
    labels = list(names) if names is not None else [f"label {k}" for k in range(s.shape[1])]
    return [
        choose_threshold(y[:, k], s[:, k], rule=rule, target_sensitivity=target_sensitivity, name=labels[k])
        for k in range(s.shape[1])
    ]
