"""Deferral (selective prediction): the metric on the cases the model keeps when the most uncertain are referred.

For a referred fraction ``f`` the ``round(f * N)`` cases of highest uncertainty go to an expert and the metric
is the mean per-case performance (1/0 correct, or a Dice) of the others. Cases tied in uncertainty are
referred in random order, and the curve holds the expectation over that order (the tied group counts with
its mean), so a constant uncertainty gives exactly the random-referral curve and no tie is broken by case
order. Two references: random referral (expected kept metric = the mean over all cases, at every fraction)
and the oracle, which refers the worst-performing cases first (the best any uncertainty score could do).

The areas are the mean of each curve over the referred-fraction range (trapezoidal area divided by the range's
width), so they are on the metric's own scale: a useful uncertainty has ``auc > auc_random``, and
``auc_oracle`` is the ceiling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medlens.errors import InputError

#: Referred fractions of the curve unless given: 0 to 0.5 in steps of 0.025.
DEFAULT_FRACTIONS = tuple(round(0.025 * i, 3) for i in range(21))


def deferral_curve(
    performance: Any, uncertainty: Any, fractions: Any = None, *, metric_name: str = "metric"
) -> dict[str, Any]:
    """The deferral curve of per-case performance against the referred fraction, with random and oracle.

    Args:
        performance: one value per case, higher is better (1/0 correct, Dice, ...); NaN cases are dropped.
        uncertainty: one score per case, higher = more uncertain (referred first).
        fractions: referred fractions in [0, 1), increasing (default 0, 0.025, ..., 0.5).
        metric_name: the name of the per-case metric, for the report.

    Returns:
        ``{fractions, n_referred, kept_metric, random_metric, oracle_metric, auc, auc_random, auc_oracle,
        n_cases, metric_name}``.

    Raises:
        InputError: lengths differ, non-finite uncertainty, no cases, or bad fractions.
    """
    perf = np.asarray(performance, dtype=np.float64).reshape(-1)
    unc = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    if perf.shape != unc.shape:
        raise InputError(f"deferral curve: {perf.size} performance values for {unc.size} uncertainty scores")
    keep = ~np.isnan(perf)
    perf, unc = perf[keep], unc[keep]
    if perf.size == 0:
        raise InputError("deferral curve: no case has a performance value")
    if not np.all(np.isfinite(unc)):
        raise InputError("deferral curve: the uncertainty scores hold NaN or infinite values")
    f = np.asarray(DEFAULT_FRACTIONS if fractions is None else fractions, dtype=np.float64).reshape(-1)
    if f.size < 2 or np.any(f < 0) or np.any(f >= 1) or np.any(np.diff(f) <= 0):
        raise InputError(f"fractions {f.tolist()} must be at least two increasing values in [0, 1)")
    n = perf.size
    n_ref = np.minimum(np.rint(f * n).astype(np.int64), n - 1)
    kept_n = n - n_ref

    kept = _kept_sums(perf, unc, kept_n) / kept_n
    best_first = np.concatenate([[0.0], np.cumsum(np.sort(perf)[::-1])])
    oracle = best_first[kept_n] / kept_n
    random = np.full(f.size, float(perf.mean()))
    width = float(f[-1] - f[0])

    def area(y: np.ndarray) -> float:
        return float(np.trapezoid(y, f) / width)

    return {
        "metric_name": metric_name,
        "n_cases": int(n),
        "fractions": f.tolist(),
        "n_referred": n_ref.tolist(),
        "kept_metric": kept.tolist(),
        "random_metric": random.tolist(),
        "oracle_metric": oracle.tolist(),
        "auc": area(kept),
        "auc_random": area(random),
        "auc_oracle": area(oracle),
    }


def _kept_sums(perf: np.ndarray, unc: np.ndarray, kept_n: np.ndarray) -> np.ndarray:
    """Expected sum of performance over the ``kept_n`` least uncertain cases, ties in random order."""
    order = np.argsort(unc, kind="stable")
    u, p = unc[order], perf[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], u.size]
    group_sum = np.add.reduceat(p, starts)
    before = np.concatenate([[0.0], np.cumsum(group_sum)])  # sum of all groups before group g
    g = np.searchsorted(ends, kept_n, side="left")  # the tie group holding the kept_n-th case
    g = np.minimum(g, starts.size - 1)
    partial = kept_n - starts[g]  # how many of group g are kept
    group_mean = group_sum[g] / (ends[g] - starts[g])
    return np.asarray(before[g] + partial * group_mean)


def refer_threshold(uncertainty_val: Any, fraction: float) -> float:
    """The uncertainty above which a case is referred, so that about ``fraction`` of validation cases are.

    A case is referred when ``uncertainty > threshold``; the threshold is the ``1 - fraction`` quantile of
    the validation uncertainty (linear interpolation), so ``fraction = 0`` refers nothing seen so far.

    Raises:
        InputError: no finite validation scores, or a fraction outside [0, 1).
    """
    u = np.asarray(uncertainty_val, dtype=np.float64).reshape(-1)
    u = u[np.isfinite(u)]
    if u.size == 0:
        raise InputError("refer_threshold needs at least one finite validation uncertainty score")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction < 1.0:
        raise InputError(f"referral fraction {fraction!r} must be in [0, 1) (e.g. 0.1 refers 10% of cases)")
    return float(np.quantile(u, 1.0 - float(fraction)))
