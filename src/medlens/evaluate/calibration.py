"""Calibration: expected calibration error with its binning stated, temperature scaling, voxel calibration.

Which probability is binned (stated in every result's ``what``):

* binary: the positive-class probability ``P(y = 1)``; a bin's "accuracy" is the fraction of positive cases
  in it (the reliability diagram of scikit-learn's ``calibration_curve``);
* multiclass and ordinal: the top-label confidence ``max_k p_k``; a bin's accuracy is the fraction of cases
  whose argmax class is the true one (Guo et al. 2017);
* multilabel: every (case, label) probability, all labels pooled; accuracy = fraction of positive labels;
* segmentation voxels (:func:`voxel_calibration`): the top-label confidence of sampled voxels.

Binning: ``strategy="uniform"`` (default) splits [0, 1] into ``n_bins`` equal-width bins; ``"quantile"``
uses equal-mass bins (edges at quantiles of the binned probabilities, so each bin holds about the same number
of values). A bin holds the values ``lo < p <= hi`` (the first bin also holds ``p = lo``), the convention of
``sklearn.calibration.calibration_curve``. ``ECE = sum_b n_b / n * |accuracy_b - confidence_b|``; ``MCE`` is
the largest of those gaps over non-empty bins.

Temperature scaling (Guo et al. 2017) is fitted on validation probabilities, since a run stores probabilities,
not logits: logits are recovered as ``log p`` for softmax outputs (multiclass; any constant per case cancels
in the softmax), as ``logit p`` of the positive class for binary (a 2-class softmax of ``log p / T`` equals
the sigmoid of ``logit(p) / T``) and for each multilabel sigmoid; for ordinal tasks the cumulative
probabilities ``P(y > k)`` are scaled (``sigmoid(logit / T)``), which is exact for CORAL outputs and keeps the
median-grade decision unchanged. One temperature ``T`` minimises the validation negative log-likelihood
(bounded scalar minimisation of ``log T``); ``T > 1`` softens over-confident outputs. Decisions by argmax (and
binary decisions at 0.5) are unchanged by ``T``.

Proper scores reported with it: NLL (mean ``-log p[y]``; per-label binary cross-entropy averaged over labels
for multilabel) and Brier score (binary: ``mean (p - y)^2`` of the positive class, as
``sklearn.metrics.brier_score_loss``; multiclass and ordinal: ``mean_i sum_k (p_ik - 1[y_i = k])^2``;
multilabel: the per-label Brier score averaged over labels).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medlens.errors import InputError
from medlens.evaluate.classification import CLASSIFICATION_TYPES, check_inputs

log = logging.getLogger(__name__)

STRATEGIES = ("uniform", "quantile")
_EPS = 1e-12
#: Search range of the temperature (log-spaced): far beyond anything a trained network needs.
_T_BOUNDS = (0.05, 20.0)


# ---- ECE ---------------------------------------------------------------------------------------------------------
def expected_calibration_error(
    probs: Any, y: Any, ctype: str, n_bins: int = 15, strategy: str = "uniform"
) -> dict[str, Any]:
    """Expected calibration error and the reliability bins of classifier probabilities.

    Args:
        probs: probabilities ``(N, K)`` (binary also ``(N,)`` positive-class scores), as in
            :mod:`medlens.evaluate.classification`.
        y: class indices ``(N,)``, or 0/1 labels ``(N, K)`` for multilabel.
        ctype: ``binary``, ``multiclass``, ``multilabel`` or ``ordinal`` (selects the binned probability, see
            the module docstring).
        n_bins: number of bins.
        strategy: ``"uniform"`` (equal-width bins) or ``"quantile"`` (equal-mass bins).

    Returns:
        ``{ece, mce, n_bins, strategy, binning, what, n, bins}``; ``bins`` lists every bin as
        ``{lo, hi, count, confidence, accuracy}`` (confidence and accuracy are ``None`` for an empty bin).

    Raises:
        InputError: unknown type or strategy, shapes that do not match, probabilities outside [0, 1].
    """
    conf, hit, what = _binned_values(probs, y, ctype)
    return _ece(conf, hit, n_bins, strategy, what)


def _binned_values(probs: Any, y: Any, ctype: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The probabilities to bin and their 0/1 outcomes, for a classification type."""
    yy, p = _check(probs, y, ctype)
    if ctype == "binary":
        return p[:, -1], (yy == 1).astype(np.float64), "positive-class probability P(y=1)"
    if ctype == "multilabel":
        return p.reshape(-1), yy.reshape(-1).astype(np.float64), "per-label probability, all labels pooled"
    what = "top-label confidence (probability of the argmax class)"
    return p.max(axis=1), (np.argmax(p, axis=1) == yy).astype(np.float64), what


def _check(probs: Any, y: Any, ctype: str) -> tuple[np.ndarray, np.ndarray]:
    if ctype not in CLASSIFICATION_TYPES:
        raise InputError(f"classification type {ctype!r}: use one of {', '.join(CLASSIFICATION_TYPES)}")
    yy, p = check_inputs(y, probs, ctype)
    if p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise InputError(
            f"probabilities must lie in [0, 1], got values from {p.min():.4g} to {p.max():.4g}; "
            "pass softmax/sigmoid outputs, not logits"
        )
    return yy, np.clip(p, 0.0, 1.0)


def _ece(conf: np.ndarray, hit: np.ndarray, n_bins: int, strategy: str, what: str) -> dict[str, Any]:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise InputError(f"n_bins={n_bins!r} must be a positive integer (15 is usual)")
    if strategy not in STRATEGIES:
        raise InputError(
            f"binning strategy {strategy!r}: use 'uniform' (equal-width) or 'quantile' (equal-mass)"
        )
    if conf.size == 0:
        raise InputError("no probabilities to calibrate (no cases)")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        binning = f"{n_bins} equal-width bins over [0, 1]"
    else:
        edges = np.quantile(conf, np.linspace(0.0, 1.0, n_bins + 1))
        edges[0], edges[-1] = min(edges[0], 0.0), max(edges[-1], 1.0)
        binning = f"{n_bins} equal-mass bins (edges at quantiles of the binned probabilities)"
    ids = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(ids, minlength=n_bins).astype(np.float64)
    sum_conf = np.bincount(ids, weights=conf, minlength=n_bins)
    sum_hit = np.bincount(ids, weights=hit, minlength=n_bins)
    full = counts > 0
    mean_conf = np.divide(sum_conf, counts, out=np.full(n_bins, np.nan), where=full)
    mean_hit = np.divide(sum_hit, counts, out=np.full(n_bins, np.nan), where=full)
    gaps = np.abs(mean_hit - mean_conf)
    ece = float(np.sum(counts[full] / conf.size * gaps[full]))
    bins = [
        {
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "count": int(counts[b]),
            "confidence": float(mean_conf[b]) if full[b] else None,
            "accuracy": float(mean_hit[b]) if full[b] else None,
        }
        for b in range(n_bins)
    ]
    return {
        "ece": ece,
        "mce": float(gaps[full].max()),
        "n_bins": int(n_bins),
        "strategy": strategy,
        "binning": binning,
        "what": what,
        "n": int(conf.size),
        "bins": bins,
    }


# ---- temperature scaling -------------------------------------------------------------------------------------------
def _logits(p: np.ndarray, ctype: str) -> np.ndarray:
    """Logits recovered from probabilities ``(N, K)`` (see the module docstring)."""
    if ctype == "multiclass":
        return np.log(np.clip(p, _EPS, 1.0))
    if ctype == "binary":
        q = np.clip(p[:, -1], _EPS, 1.0 - _EPS)
        return np.log(q) - np.log1p(-q)
    if ctype == "multilabel":
        q = np.clip(p, _EPS, 1.0 - _EPS)
        return np.log(q) - np.log1p(-q)
    above = np.clip(1.0 - np.cumsum(p, axis=1)[:, :-1], _EPS, 1.0 - _EPS)  # ordinal: P(y > k), k < K-1
    return np.log(above) - np.log1p(-above)


def _from_logits(z: np.ndarray, ctype: str, k: int) -> np.ndarray:
    from scipy.special import expit, softmax

    if ctype == "multiclass":
        return np.asarray(softmax(z, axis=1))
    if ctype == "binary":
        q = expit(z)
        return np.stack([1.0 - q, q], axis=1)
    if ctype == "multilabel":
        return np.asarray(expit(z))
    above = np.minimum.accumulate(expit(z), axis=1)  # ordinal: non-increasing, as tasks.classify
    n = z.shape[0]
    cum = np.concatenate([np.ones((n, 1)), above, np.zeros((n, 1))], axis=1)
    return np.clip(cum[:, :-1] - cum[:, 1:], 0.0, 1.0)[:, :k]


def _nll(p: np.ndarray, y: np.ndarray, ctype: str) -> float:
    if ctype == "multilabel":
        q = np.clip(p, _EPS, 1.0 - _EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], _EPS, 1.0))))


def _brier(p: np.ndarray, y: np.ndarray, ctype: str) -> float:
    if ctype == "binary":
        return float(np.mean((p[:, -1] - (y == 1)) ** 2))
    if ctype == "multilabel":
        return float(np.mean((p - y) ** 2))
    onehot = np.zeros_like(p)
    onehot[np.arange(y.size), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def fit_temperature(probs_val: Any, y_val: Any, ctype: str) -> float:
    """The temperature ``T`` minimising the NLL of the validation cases (see the module docstring).

    Args:
        probs_val: validation probabilities ``(N, K)`` (binary also ``(N,)``).
        y_val: their targets, as for :func:`expected_calibration_error`.
        ctype: the classification type.

    Returns:
        ``T`` in [0.01, 100]; a value at a bound is logged as a warning (e.g. perfectly separated validation
        cases push ``T`` towards 0).

    Raises:
        InputError: bad inputs.
    """
    from scipy.optimize import minimize_scalar

    y, p = _check(probs_val, y_val, ctype)
    z = _logits(p, ctype)
    k = p.shape[1]
    yf = y.astype(np.float64)

    def nll(log_t: float) -> float:
        return _nll(_from_logits(z / math.exp(log_t), ctype, k), y if ctype != "multilabel" else yf, ctype)

    lo, hi = math.log(_T_BOUNDS[0]), math.log(_T_BOUNDS[1])
    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    t = float(math.exp(res.x))
    if min(res.x - lo, hi - res.x) < 1e-3:
        log.warning("temperature scaling: T=%.3g is at the search bound; validation data may be separable", t)
    return t


def apply_temperature(probs: Any, temperature: float, ctype: str) -> np.ndarray:
    """Probabilities after temperature scaling, in the shape given (binary ``(N,)`` stays ``(N,)``).

    Raises:
        InputError: a temperature that is not a positive finite number, or bad probabilities.
    """
    if not isinstance(temperature, int | float | np.floating) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise InputError(
            f"temperature={temperature!r} must be a positive number (1 leaves probabilities as they are)"
        )
    p_in = np.asarray(probs, dtype=np.float64)
    if ctype not in CLASSIFICATION_TYPES:
        raise InputError(f"classification type {ctype!r}: use one of {', '.join(CLASSIFICATION_TYPES)}")
    dummy = np.zeros(p_in.shape if ctype == "multilabel" else p_in.shape[:1], dtype=np.int64)
    _, p = _check(p_in, dummy, ctype)
    out = _from_logits(_logits(p, ctype) / float(temperature), ctype, p.shape[1])
    return out[:, -1] if ctype == "binary" and p_in.ndim == 1 else out


def calibration_report(
    val_probs: Any,
    val_y: Any,
    test_probs: Any,
    test_y: Any,
    ctype: str,
    n_bins: int = 15,
    strategy: str = "uniform",
) -> dict[str, Any]:
    """Temperature scaling fitted on validation cases, and the test cases' calibration before and after.

    Returns:
        ``{temperature, method, before, after, nll_before, nll_after, brier_before, brier_after, n_val,
        n_test}`` (and a ``note`` when ``T`` is at the edge of its range); ``before``/``after`` are :func:`expected_calibration_error` dicts of the test cases that
        also hold their ``nll`` and ``brier``.

    Raises:
        InputError: bad inputs (the message names validation or test).
    """
    try:
        y_val, _ = _check(val_probs, val_y, ctype)
    except InputError as e:
        raise InputError(f"validation cases: {e}") from None
    try:
        y_test, p_test = _check(test_probs, test_y, ctype)
    except InputError as e:
        raise InputError(f"test cases: {e}") from None
    t = fit_temperature(val_probs, val_y, ctype)
    p_after = apply_temperature(p_test, t, ctype)
    yt = y_test.astype(np.float64) if ctype == "multilabel" else y_test
    out: dict[str, Any] = {"temperature": t, "method": _method(ctype)}
    if not _T_BOUNDS[0] * 1.01 < t < _T_BOUNDS[1] / 1.01:
        out["note"] = (
            f"the fitted temperature T={t:.3g} is at the edge of its search range {_T_BOUNDS}: the validation "
            "predictions are (nearly) separable or too few, so T is poorly determined; treat 'after' with care"
        )
    for key, p in (("before", p_test), ("after", p_after)):
        ece = expected_calibration_error(p, y_test, ctype, n_bins=n_bins, strategy=strategy)
        ece["nll"], ece["brier"] = _nll(p, yt, ctype), _brier(p, yt, ctype)
        out[key] = ece
        out[f"nll_{key}"], out[f"brier_{key}"] = ece["nll"], ece["brier"]
    out["n_val"], out["n_test"] = int(y_val.shape[0]), int(y_test.shape[0])
    return out


def _method(ctype: str) -> str:
    how = {
        "multiclass": "softmax(log p / T)",
        "binary": "sigmoid(logit p / T) of the positive class",
        "multilabel": "sigmoid(logit p / T) per label",
        "ordinal": "sigmoid(logit P(y > k) / T) of the cumulative probabilities",
    }[ctype]
    return f"temperature scaling {how}, T minimising the validation NLL"


# ---- segmentation: voxel calibration -------------------------------------------------------------------------------
def voxel_calibration(
    probs: Sequence[Any],
    labels: Sequence[Any],
    n_bins: int = 15,
    max_voxels: int = 200_000,
    seed: int = 0,
    strategy: str = "uniform",
) -> dict[str, Any]:
    """Voxel-level calibration of segmentation probabilities: top-label confidence of sampled voxels.

    Voxels are sampled uniformly over all cases together (each case contributes in proportion to its size),
    without replacement, deterministically for a ``seed``; all voxels are used when there are at most
    ``max_voxels``. Background voxels far from any structure dominate such a sample and are almost always
    confidently right, so the result also holds ``foreground``: the same ECE over the sampled voxels where the
    reference or the prediction is foreground (``None`` when there are none).

    Args:
        probs: per case, class probabilities ``(K, *S)`` (class 0 = background; ``K = 1`` is read as a
            foreground probability). An object with an ``.array`` (a medlens ``Image``) is accepted.
        labels: per case, the reference label map ``(*S)`` (or ``(1, *S)``) with values in ``0..K-1``.
        n_bins: number of bins.
        max_voxels: at most this many voxels are binned.
        seed: sampling seed.
        strategy: ``"uniform"`` or ``"quantile"``.

    Returns:
        An ECE dict as :func:`expected_calibration_error`, plus ``n_voxels_total``, ``sampled`` and
        ``foreground``.

    Raises:
        InputError: no cases, different counts of probabilities and labels, or shapes that do not match.
    """
    if len(probs) == 0 or len(probs) != len(labels):
        raise InputError(
            f"voxel_calibration needs one label map per probability map, got {len(probs)} and {len(labels)}"
        )
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1:
        raise InputError(f"max_voxels={max_voxels!r} must be a positive integer")
    cases = []  # (probabilities (K, V), labels (V,)) as views: nothing is copied before sampling
    for i, (p, lab) in enumerate(zip(probs, labels, strict=True)):
        pa = np.asarray(getattr(p, "array", p))
        la = np.asarray(getattr(lab, "array", lab))
        if la.ndim == pa.ndim and la.shape[0] == 1:
            la = la[0]
        if pa.ndim < 2 or pa.shape[1:] != la.shape:
            raise InputError(
                f"case {i}: probabilities {pa.shape} must be (classes, *spatial) over the label map {la.shape}"
            )
        k = max(pa.shape[0], 2)
        if la.size and (la.min() < 0 or la.max() >= k):
            raise InputError(
                f"case {i}: label values {int(la.min())}..{int(la.max())} are not classes 0..{k - 1}"
            )
        cases.append((pa.reshape(pa.shape[0], -1), la.reshape(-1)))
    if len({c[0].shape[0] for c in cases}) > 1:
        raise InputError("every case must have the same number of classes in its probabilities")
    sizes = np.array([c[1].size for c in cases])
    total = int(sizes.sum())
    rng = np.random.default_rng(seed)
    take = min(total, max_voxels)
    chosen = np.sort(rng.choice(total, size=take, replace=False)) if take < total else np.arange(total)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    conf, hit, fg = [], [], []
    for c, (pa, la) in enumerate(cases):
        sel = chosen[(chosen >= starts[c]) & (chosen < starts[c + 1])] - starts[c]
        pv = np.clip(pa[:, sel].astype(np.float64), 0.0, 1.0)
        if pv.shape[0] == 1:  # a single foreground-probability channel
            pv = np.concatenate([1.0 - pv, pv])
        pred = np.argmax(pv, axis=0)
        truth = la[sel].astype(np.int64)
        conf.append(pv.max(axis=0))
        hit.append((pred == truth).astype(np.float64))
        fg.append((pred > 0) | (truth > 0))
    conf_a, hit_a, fg_a = np.concatenate(conf), np.concatenate(hit), np.concatenate(fg)
    what = "voxel top-label confidence (probability of the argmax class)"
    out = _ece(conf_a, hit_a, n_bins, strategy, what)
    out["n_voxels_total"] = total
    out["sampled"] = f"{take} of {total} voxels, uniformly without replacement (seed {seed})"
    out["foreground"] = (
        _ece(
            conf_a[fg_a],
            hit_a[fg_a],
            n_bins,
            strategy,
            what + ", voxels in the reference or predicted foreground",
        )
        if fg_a.any()
        else None
    )
    return out
