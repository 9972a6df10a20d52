"""Percentile bootstrap confidence intervals over cases.

The unit of resampling is the case (a patient, a study): metrics of the voxels of one case are not
independent, cases are. Every function is deterministic for a given ``seed`` and vectorised (the resamples
are drawn as one index matrix and the statistic is applied along an axis), in chunks so that memory stays
bounded for large case counts.

NaN values (e.g. a surface distance that is undefined because one mask is empty) are dropped before
resampling; ``CI.n`` counts the values actually used, so the caller can report how many were missing.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medlens.errors import InputError

Statistic = Callable[..., Any]

#: Upper bound on the number of resampled values held in memory at once (floats).
_CHUNK_VALUES = 4_000_000


@dataclass(frozen=True)
class CI:
    """A point estimate with a percentile bootstrap confidence interval.

    Attributes:
        estimate: the statistic on the observed values (for a difference: statistic(a) - statistic(b)).
        low: lower bound of the interval.
        high: upper bound of the interval.
        n: number of (non-NaN) values the estimate is based on; for an unpaired gap, both groups together.
        confidence: the coverage the interval was built for, e.g. 0.95.
    """

    estimate: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN becomes ``None``)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Statistic = np.nanmean,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CI:
    """Percentile bootstrap CI of ``statistic`` over cases.

    Args:
        values: one value per case; NaNs are dropped.
        statistic: a reducing function accepting ``axis=`` (``np.nanmean``, ``np.nanmedian``, ...); one
            without ``axis`` also works, applied row by row (slower).
        n_resamples: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling; the same seed and values give the same interval.

    Returns:
        The estimate on the observed values, the interval, and the number of values used.

    Raises:
        InputError: no non-NaN values, or a bad ``n_resamples``/``confidence``.
    """
    x = _clean(values, "values")
    _check_options(n_resamples, confidence)
    rng = np.random.default_rng(seed)
    stats = _resampled(x, statistic, n_resamples, rng)
    low, high = _percentiles(stats, confidence)
    return CI(float(statistic(x)), low, high, int(x.size), float(confidence))


def paired_difference_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    statistic: Statistic = np.nanmean,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CI:
    """CI of ``statistic(a) - statistic(b)`` when ``a[i]`` and ``b[i]`` were measured on the same case.

    Use it to compare two models (or two settings) on one test set: cases are resampled jointly, so the
    between-case variation common to both cancels and the interval is much narrower than two separate ones.
    Pairs where either value is NaN are dropped.

    Args:
        a: one value per case for the first model.
        b: one value per case for the second model, in the same case order.
        statistic: as in :func:`bootstrap_ci`.
        n_resamples: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: resampling seed.

    Raises:
        InputError: different lengths, no complete pair, or bad options.
    """
    xa = _as_1d(a, "a")
    xb = _as_1d(b, "b")
    if xa.size != xb.size:
        raise InputError(
            f"paired values need one value per case in both lists, got {xa.size} and {xb.size}; "
            "use group_gap_ci for two independent groups"
        )
    keep = ~(np.isnan(xa) | np.isnan(xb))
    if not keep.any():
        raise InputError("no case has both paired values (all pairs contain NaN or the lists are empty)")
    xa, xb = xa[keep], xb[keep]
    _check_options(n_resamples, confidence)
    rng = np.random.default_rng(seed)
    n = xa.size
    diffs = np.empty(n_resamples)
    for start, stop in _chunks(n_resamples, n):
        idx = rng.integers(0, n, size=(stop - start, n))
        diffs[start:stop] = _apply(statistic, xa[idx]) - _apply(statistic, xb[idx])
    low, high = _percentiles(diffs, confidence)
    return CI(float(statistic(xa) - statistic(xb)), low, high, int(n), float(confidence))


def group_gap_ci(
    values_a: Sequence[float] | np.ndarray,
    values_b: Sequence[float] | np.ndarray,
    statistic: Statistic = np.nanmean,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CI:
    """CI of the gap ``statistic(values_a) - statistic(values_b)`` between two independent groups.

    Each group is resampled on its own (a stratified bootstrap), e.g. the Dice gap between two sites or
    between female and male patients. ``CI.n`` is the total number of values used in both groups.

    Raises:
        InputError: a group has no non-NaN value, or bad options.
    """
    xa = _clean(values_a, "values_a")
    xb = _clean(values_b, "values_b")
    _check_options(n_resamples, confidence)
    rng = np.random.default_rng(seed)
    gaps = _resampled(xa, statistic, n_resamples, rng) - _resampled(xb, statistic, n_resamples, rng)
    low, high = _percentiles(gaps, confidence)
    return CI(float(statistic(xa) - statistic(xb)), low, high, int(xa.size + xb.size), float(confidence))


# ---- internals -------------------------------------------------------------------------------------------


def _as_1d(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a list of numbers, got {type(values).__name__}") from None
    if x.ndim != 1:
        raise InputError(f"{what} must be one value per case (1D), got shape {x.shape}")
    return x


def _clean(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    x = _as_1d(values, what)
    x = x[~np.isnan(x)]
    if x.size == 0:
        raise InputError(f"{what} has no values to bootstrap (empty or all NaN)")
    return x


def _check_options(n_resamples: int, confidence: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise InputError(f"n_resamples={n_resamples!r} must be a positive integer (2000 is typical)")
    if not isinstance(confidence, int | float) or not 0.0 < confidence < 1.0:
        raise InputError(f"confidence={confidence!r} must be between 0 and 1 (e.g. 0.95)")


def _chunks(n_resamples: int, n: int) -> list[tuple[int, int]]:
    rows = max(1, _CHUNK_VALUES // max(n, 1))
    return [(s, min(s + rows, n_resamples)) for s in range(0, n_resamples, rows)]


def _resampled(x: np.ndarray, statistic: Statistic, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(n_resamples)
    for start, stop in _chunks(n_resamples, x.size):
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        out[start:stop] = _apply(statistic, x[idx])
    return out


def _accepts_axis(statistic: Statistic) -> bool:
    try:
        params = inspect.signature(statistic).parameters
    except (TypeError, ValueError):  # builtins and ufunc reductions without a signature: assume numpy-like
        return True
    return "axis" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _apply(statistic: Statistic, samples: np.ndarray) -> np.ndarray:
    """``statistic`` of each row of ``samples`` (resamples x cases)."""
    if _accepts_axis(statistic):
        return np.asarray(statistic(samples, axis=1), dtype=np.float64)
    return np.array([float(statistic(row)) for row in samples])


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)
