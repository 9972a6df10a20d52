"""Classification metrics with case-level bootstrap CIs, and MedMNIST's own ACC and AUC, reproduced exactly.

Inputs, one row per case:

* ``y_true``: class indices ``(N,)`` (binary, multiclass, ordinal) or 0/1 labels ``(N, K)`` (multilabel);
* ``scores``: probabilities ``(N, K)``: softmax over the classes (binary: ``(N, 2)``, or ``(N,)`` positive
  scores), class probabilities derived from the cumulative outputs (ordinal), or one sigmoid per label
  (multilabel).

Decision rules (stated once): binary and multi-label cases are positive when the score is ``>= threshold``
(0.5 unless given; a run stores the threshold chosen on validation, see :mod:`medlens.tasks.threshold`);
multiclass cases take the class of highest probability (the first on ties, as ``np.argmax``); ordinal cases
the median grade of the predicted distribution (the first grade whose cumulative probability reaches 0.5: it
minimises the expected absolute grade error, and is CORAL's rule ``#{k: P(grade > k) > 0.5}``).

Every metric comes with a percentile bootstrap CI over cases, the scheme of
:mod:`medlens.evaluate.bootstrap` (same :class:`~medlens.evaluate.bootstrap.CI` type): the resamples are drawn
once, as case-count weights, and every metric is a vectorised function of those weights, so all metrics share
resamples and 2,000 resamples of 20,000 cases take seconds. A resample where a metric is undefined (e.g. no
positive case, so no AUC) is left out of its interval. Per-class values undefined on the data (a class never
predicted has no precision) are NaN and left out of the macro averages.

MedMNIST (``medmnist/evaluator.py`` of MedMNIST v2/v3, ``getACC``/``getAUC``): binary-class: ACC with
``score[:, -1] > 0.5`` (strict), AUC of ``score[:, -1]``; multi-class and ordinal-regression (treated alike
there): ACC of the argmax, AUC = mean over the score columns of the one-vs-rest AUC; multi-label: per-label ACC
with ``score > 0.5`` averaged over labels, AUC = mean of the per-label AUCs. :func:`medmnist_acc` and
:func:`medmnist_auc` follow that code line by line (scikit-learn's ``accuracy_score``/``roc_auc_score``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from medlens.errors import InputError
from medlens.evaluate.bootstrap import CI

CLASSIFICATION_TYPES = ("binary", "multiclass", "multilabel", "ordinal")
#: medlens classification type -> MedMNIST's task name.
MEDMNIST_TASKS = {
    "binary": "binary-class",
    "multiclass": "multi-class",
    "multilabel": "multi-label, binary-class",
    "ordinal": "ordinal-regression",
}
_CHUNK_VALUES = 4_000_000

Metric = Callable[[np.ndarray], np.ndarray]  # case weights (R, N) -> value per resample (R,)


# ---- MedMNIST's definitions -------------------------------------------------------------------------------------
def medmnist_acc(y_true: Any, y_score: Any, task: str, threshold: float = 0.5) -> float:
    """MedMNIST's ``getACC``: see the module docstring; ``task`` is a MedMNIST task name."""
    from sklearn.metrics import accuracy_score

    y_true, y_score = np.asarray(y_true).squeeze(), np.asarray(y_score).squeeze()
    _check_medmnist_task(task)
    if task == "multi-label, binary-class":
        pred = y_score > threshold
        return float(
            sum(accuracy_score(y_true[:, k], pred[:, k]) for k in range(y_true.shape[1])) / y_true.shape[1]
        )
    if task == "binary-class":
        if y_score.ndim == 2:
            y_score = y_score[:, -1]
        return float(accuracy_score(y_true, y_score > threshold))
    return float(accuracy_score(y_true, np.argmax(y_score, axis=-1)))


def medmnist_auc(y_true: Any, y_score: Any, task: str) -> float:
    """MedMNIST's ``getAUC``: see the module docstring; ``task`` is a MedMNIST task name.

    Raises:
        InputError: a class or label has only positive or only negative cases (MedMNIST's code fails there).
    """
    from sklearn.metrics import roc_auc_score

    y_true, y_score = np.asarray(y_true).squeeze(), np.asarray(y_score).squeeze()
    _check_medmnist_task(task)

    def auc(t: np.ndarray, s: np.ndarray, what: str) -> float:
        if np.unique(t).size < 2:
            raise InputError(f"MedMNIST AUC: {what} has only one outcome in y_true, so its AUC is undefined")
        return float(roc_auc_score(t, s))

    if task == "multi-label, binary-class":
        return (
            sum(auc(y_true[:, k], y_score[:, k], f"label {k}") for k in range(y_score.shape[1]))
            / y_score.shape[1]
        )
    if task == "binary-class":
        return auc(y_true, y_score[:, -1] if y_score.ndim == 2 else y_score, "the task")
    total = sum(
        auc((y_true == k).astype(float), y_score[:, k], f"class {k}") for k in range(y_score.shape[1])
    )
    return total / y_score.shape[1]


def _check_medmnist_task(task: str) -> None:
    if task not in MEDMNIST_TASKS.values():
        raise InputError(f"unknown MedMNIST task {task!r}; use one of: {', '.join(MEDMNIST_TASKS.values())}")


# ---- inputs ------------------------------------------------------------------------------------------------------
def check_inputs(y_true: Any, scores: Any, classification_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise ``(y_true, scores)``: ``(N,)`` int / ``(N, K)`` 0-1 labels and ``(N, K)`` floats."""
    if classification_type not in CLASSIFICATION_TYPES:
        raise InputError(
            f"classification_type {classification_type!r}: use one of {', '.join(CLASSIFICATION_TYPES)}"
        )
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if classification_type == "binary" and s.ndim == 1:
        s = np.stack([1.0 - s, s], axis=1)
    if s.ndim != 2 or s.shape[0] != y.shape[0] or s.shape[0] == 0:
        raise InputError(
            f"scores must be (cases, classes) with one row per case, got {s.shape} for {y.shape[0]} cases"
        )
    if not np.all(np.isfinite(s)):
        raise InputError("scores hold NaN or infinite values")
    k = s.shape[1]
    if classification_type == "multilabel":
        if y.shape != s.shape or not np.isin(y, (0, 1)).all():
            raise InputError(f"multilabel y_true must be 0/1 of shape {s.shape}, got shape {y.shape}")
        return y.astype(bool), s
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1:
        raise InputError(
            f"y_true must be one class index per case for {classification_type}, got shape {y.shape}"
        )
    if y.dtype.kind == "f" and np.any(y != np.round(y)):
        raise InputError("y_true must hold class indices (integers)")
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 0) | (y >= k))
    if bad.size:
        raise InputError(f"y_true[{bad[0]}] = {y[bad[0]]} is not one of the {k} classes of the scores")
    return y, s


def predict(
    scores: np.ndarray, classification_type: str, threshold: float | Sequence[float] | None = None
) -> np.ndarray:
    """The decision rule of the module docstring: class indices ``(N,)`` or 0/1 labels ``(N, K)``."""
    if classification_type == "binary":
        t0 = 0.5 if threshold is None else float(np.asarray(threshold).reshape(-1)[0])
        return (scores[:, -1] >= t0).astype(np.int64)
    if classification_type == "multilabel":
        t = (
            np.full(scores.shape[1], 0.5)
            if threshold is None
            else np.broadcast_to(np.asarray(threshold, float), scores.shape[1:])
        )
        return (scores >= t).astype(np.int64)
    if classification_type == "ordinal":
        return np.argmax(np.cumsum(scores, axis=1) >= 0.5 - 1e-9, axis=1).astype(np.int64)
    return np.argmax(scores, axis=1).astype(np.int64)


# ---- vectorised metrics of case weights ----------------------------------------------------------------------------
def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN; NaN (without a warning) where every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_auc(score: np.ndarray, positive: np.ndarray) -> Metric:
    """AUC (Mann-Whitney, ties count 1/2, as ``roc_auc_score``) of ``score`` for ``positive`` cases, as a
    function of case weights ``(R, N)``; NaN where a resample has no positive or no negative case."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    pos = positive[order].astype(np.float32)
    neg = 1.0 - pos
    ties = bool(np.any(s[1:] == s[:-1]))
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])

    def auc(w: np.ndarray) -> np.ndarray:
        wo = w[:, order]
        wp, wn = wo * pos, wo * neg
        if ties:  # pool tied scores: a tie between a positive and a negative counts 1/2
            wp, wn = np.add.reduceat(wp, starts, axis=1), np.add.reduceat(wn, starts, axis=1)
        below = np.cumsum(wn, axis=1)
        if ties:  # a case is positive or negative, so without ties wp * wn == 0 and this term vanishes
            below -= 0.5 * wn
        num = np.einsum("ij,ij->i", wp, below, dtype=np.float64)
        return _ratio(num, wp.sum(axis=1, dtype=np.float64) * wn.sum(axis=1, dtype=np.float64))

    return auc


def _binary_counts(t: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Weighted TP, FP, FN, TN of 0/1 truth ``t`` and prediction ``p``, each ``(R,)`` (or ``(R, K)`` for
    ``(N, K)`` inputs), from one matrix product."""
    t, p = t.astype(bool), p.astype(bool)
    masks = np.concatenate([np.atleast_2d(m.T).T for m in (t & p, ~t & p, t & ~p, ~t & ~p)], axis=1)
    counts = (w @ masks.astype(w.dtype)).astype(np.float64)
    return tuple(
        np.squeeze(part, axis=1) if part.shape[1] == 1 else part for part in np.split(counts, 4, axis=1)
    )


def _binary_rates(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "balanced_accuracy": (sens + spec) / 2,
        "precision": _ratio(tp, tp + fp),
        "recall": sens,
        "specificity": spec,
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _metric_table(
    y: np.ndarray, s: np.ndarray, ctype: str, threshold: Any
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """All metrics as one function of case weights ``(R, N)`` -> ``{key: (R,)}``; per-class keys are
    ``"metric/j"``; single-label types add ``"cm"``, the confusion matrices ``(R, K, K)``."""
    n, k = s.shape
    pred = predict(s, ctype, threshold)
    if ctype == "multilabel":
        aucs = [weighted_auc(s[:, j], y[:, j]) for j in range(k)]
        all_correct = (pred == y).all(axis=1).astype(np.float64)
        mm_correct = ((s > 0.5) == y).mean(axis=1)

        def multilabel(w: np.ndarray) -> dict[str, np.ndarray]:
            rates = _binary_rates(*_binary_counts(y, pred, w))  # each (R, K)
            auc = np.stack([a(w) for a in aucs])
            out = {key: _nanmean(rates[key], axis=1) for key in _OVERALL}
            out.update(subset_accuracy=_ratio(w @ all_correct, w.sum(1)), auc=_nanmean(auc, axis=0))
            for j in range(k):
                out.update({f"{key}/{j}": rates[key][:, j] for key in _PER_CLASS[:-1]})
                out[f"auc/{j}"] = auc[j]
            out["medmnist_acc"] = _ratio(w @ mm_correct, w.sum(1))
            out["medmnist_auc"] = out["auc"]
            return out

        return multilabel

    onehot = np.zeros((n, k * k))
    onehot[np.arange(n), y * k + pred] = 1.0
    aucs = [weighted_auc(s[:, j], y == j) for j in range(k)]
    mm_correct = (
        ((s[:, -1] > 0.5).astype(np.int64) == y) if ctype == "binary" else (np.argmax(s, axis=1) == y)
    )
    abs_err = np.abs(pred - y).astype(np.float64)

    def single_label(w: np.ndarray) -> dict[str, np.ndarray]:
        c = (w @ onehot).reshape(-1, k, k)
        tp = np.diagonal(c, axis1=1, axis2=2)
        fn, fp = c.sum(2) - tp, c.sum(1) - tp
        per = _binary_rates(tp, fp, fn, c.sum((1, 2))[:, None] - tp - fn - fp)
        auc = np.stack([a(w) for a in aucs])
        out: dict[str, np.ndarray] = {"cm": c}
        if ctype == "binary":  # the positive class's rates are the task's
            out.update({key: per[key][:, 1] for key in (*_OVERALL, "npv")})
            out["accuracy"] = _ratio(tp.sum(1), w.sum(1))
            out["auc"] = out["medmnist_auc"] = auc[1]
        else:
            out.update({key: _nanmean(per[key], axis=1) for key in _OVERALL})
            out["accuracy"] = _ratio(tp.sum(1), w.sum(1))
            out["balanced_accuracy"] = _nanmean(per["recall"], axis=1)
            out["auc"] = out["medmnist_auc"] = _nanmean(auc, axis=0)
        for j in range(k):
            out.update({f"{key}/{j}": per[key][:, j] for key in _PER_CLASS[:-1]})
            out[f"auc/{j}"] = auc[j]
        if ctype == "ordinal":
            out["mae"] = _ratio(w @ abs_err, w.sum(1))
            out["quadratic_kappa"] = _quadratic_kappa(c)
        out["medmnist_acc"] = _ratio(w @ mm_correct.astype(np.float64), w.sum(1))
        return out

    return single_label


_OVERALL = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1")
_PER_CLASS = ("precision", "recall", "specificity", "f1", "auc")


def _quadratic_kappa(c: np.ndarray) -> np.ndarray:
    """Cohen's kappa with quadratic weights (as ``cohen_kappa_score(weights="quadratic")``) per resample."""
    k = c.shape[1]
    i = np.arange(k)
    weights = (i[:, None] - i[None, :]) ** 2 / max((k - 1) ** 2, 1)
    total = c.sum((1, 2))
    expected = c.sum(2)[:, :, None] * c.sum(1)[:, None, :] / np.where(total > 0, total, 1.0)[:, None, None]
    return 1.0 - _ratio((weights * c).sum((1, 2)), (weights * expected).sum((1, 2)))


def _weights(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap case-count weights ``(rows, n)``, in chunks of bounded size."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_VALUES // max(n, 1))
    for start in range(0, n_resamples, rows):
        r = min(rows, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n)) + (np.arange(r) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=r * n).reshape(r, n).astype(np.float32)


def point_metrics(
    y_true: Any, scores: Any, *, classification_type: str, threshold: float | Sequence[float] | None = None
) -> dict[str, float]:
    """The metrics of :func:`classification_metrics` without intervals, as plain floats (NaN where undefined):
    fast enough to run at every validation during training. Per-class keys are ``"metric/j"``."""
    y, s = check_inputs(y_true, scores, classification_type)
    values = _metric_table(y, s, classification_type, threshold)(np.ones((1, s.shape[0]), dtype=np.float32))
    return {key: float(v[0]) for key, v in values.items() if key != "cm"}


# ---- the summary ---------------------------------------------------------------------------------------------------
def classification_metrics(
    y_true: Any,
    scores: Any,
    *,
    classification_type: str,
    class_names: Sequence[str] | None = None,
    threshold: float | Sequence[float] | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every classification metric with a bootstrap CI (JSON-able).

    Args:
        y_true: class indices ``(N,)``, or 0/1 labels ``(N, K)`` for multilabel.
        scores: probabilities ``(N, K)`` (see the module docstring).
        classification_type: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal``.
        class_names: names of the K classes (labels); default ``class_0``...
        threshold: binary: the decision threshold on the positive score; multilabel: one per label (or one for
            all); default 0.5. Ignored for multiclass (argmax) and ordinal (median grade).
        n_resamples / confidence / seed: the bootstrap (same seed, same intervals).

    Returns:
        ``{"classification_type", "n_cases", "class_names", "decision", "overall": {metric: CI dict},
        "per_class": {name: {metric: CI dict, "support": n}}, "confusion_matrix": {...},
        "medmnist": {"task", "acc", "auc"}, "confidence", "n_resamples", "seed"}``. Overall metrics: accuracy,
        balanced_accuracy, precision, recall (= sensitivity), specificity, f1 and auc (binary: of the positive
        class; otherwise macro over classes, one-vs-rest), plus npv (binary), mae and quadratic_kappa (ordinal),
        subset_accuracy (multilabel).

    Raises:
        InputError: shapes or values that do not fit the classification type.
    """
    y, s = check_inputs(y_true, scores, classification_type)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise InputError(f"n_resamples={n_resamples!r} must be a positive integer")
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence={confidence!r} must be between 0 and 1")
    n, k = s.shape
    names = list(class_names) if class_names is not None else [f"class_{j}" for j in range(k)]
    if len(names) != k:
        raise InputError(f"{len(names)} class names for {k} score columns")
    evaluate = _metric_table(y, s, classification_type, threshold)
    observed = evaluate(np.ones((1, n), dtype=np.float32))
    keys = [key for key in observed if key != "cm"]
    estimate = {key: float(observed[key][0]) for key in keys}
    samples: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    cm_samples: list[np.ndarray] = []
    for w in _weights(n, n_resamples, seed):
        values = evaluate(w)
        for key in keys:
            samples[key].append(values[key])
        if "cm" in values:
            c = values["cm"]
            cm_samples.append(_ratio(c, c.sum(2, keepdims=True)))
    alpha = (1.0 - confidence) / 2.0

    def stat(key: str) -> dict[str, Any]:
        vals = np.concatenate(samples[key])
        vals = vals[np.isfinite(vals)]
        low, high = (
            (float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha)))
            if vals.size
            else (np.nan, np.nan)
        )
        return CI(estimate[key], low, high, n, confidence).to_dict()

    overall = {key: stat(key) for key in keys if "/" not in key and not key.startswith("medmnist")}
    per_class: dict[str, dict[str, Any]] = {}
    support = y.sum(axis=0) if classification_type == "multilabel" else np.bincount(y, minlength=k)
    for j, name in enumerate(names):
        entry: dict[str, Any] = {key.split("/")[0]: stat(key) for key in keys if key.endswith(f"/{j}")}
        entry["support"] = int(support[j])
        per_class[name] = entry
    return {
        "classification_type": classification_type,
        "n_cases": n,
        "class_names": names,
        "decision": _decision(classification_type, threshold, k),
        "overall": overall,
        "per_class": per_class,
        "confusion_matrix": _confusion(y, s, classification_type, threshold, names, cm_samples, alpha),
        "medmnist": {
            "task": MEDMNIST_TASKS[classification_type],
            "acc": stat("medmnist_acc"),
            "auc": stat("medmnist_auc"),
        },
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
    }


def _decision(ctype: str, threshold: Any, k: int) -> dict[str, Any]:
    if ctype in ("multiclass", "ordinal"):
        return {"rule": "argmax" if ctype == "multiclass" else "median grade"}
    if threshold is None:
        return {"rule": "score >= threshold", "threshold": 0.5}
    t = np.asarray(threshold, float).reshape(-1)
    return {
        "rule": "score >= threshold",
        "threshold": float(t[0]) if ctype == "binary" or t.size == 1 else t.tolist(),
    }


def _confusion(
    y: np.ndarray,
    s: np.ndarray,
    ctype: str,
    threshold: Any,
    names: list[str],
    cm_samples: list[np.ndarray],
    alpha: float,
) -> dict[str, Any]:
    pred = predict(s, ctype, threshold)
    if ctype == "multilabel":
        per = {}
        for j, name in enumerate(names):
            t, p = y[:, j].astype(bool), pred[:, j].astype(bool)
            per[name] = [
                [int((~t & ~p).sum()), int((~t & p).sum())],
                [int((t & ~p).sum()), int((t & p).sum())],
            ]
        return {"layout": "per label [[TN, FP], [FN, TP]]", "labels": per}
    k = s.shape[1]
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y, pred), 1)
    rates = np.concatenate(cm_samples) if cm_samples else np.empty((0, k, k))
    observed = _ratio(counts.astype(float), counts.sum(1, keepdims=True).astype(float))
    with np.errstate(all="ignore"):
        lo = np.nanquantile(rates, alpha, axis=0) if rates.size else np.full((k, k), np.nan)
        hi = np.nanquantile(rates, 1 - alpha, axis=0) if rates.size else np.full((k, k), np.nan)

    def clean(a: np.ndarray) -> list[list[float | None]]:
        return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in a]

    return {
        "layout": "rows = true class, columns = predicted class",
        "labels": names,
        "counts": counts.tolist(),
        "row_fraction": clean(observed),
        "row_fraction_low": clean(lo),
        "row_fraction_high": clean(hi),
    }
