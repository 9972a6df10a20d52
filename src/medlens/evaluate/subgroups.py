"""Subgroups (fairness): a metric per value of a metadata column, and the largest gap between groups.

For one column (site, sex, an age band, ...) every group gets its estimate with a percentile bootstrap CI over
its cases (the scheme of :mod:`medlens.evaluate.bootstrap`). The gap is that between the best and the worst
group among the groups with at least ``min_size`` cases, with a CI from a stratified bootstrap (each group
resampled on its own, :func:`~medlens.evaluate.bootstrap.group_gap_ci`); an interval that excludes 0 is a
difference the data support. The two groups are chosen after looking at the estimates, so with many groups
the observed largest gap is biased upwards (a reader should treat it as a screening result, not a test).

Groups below ``min_size`` are listed with their estimate but no interval, flagged ``too_small``, warned
about and left out of the gap; a column with a single group (or fewer than two adequate groups) has no gap
and says why. Missing values form the group ``"missing"``, which is reported but never part of the gap.

The metric is either a function of case indices, ``metric(idx) -> float`` (any metric, e.g. an AUC; ``idx``
may repeat cases, as a bootstrap resample does; return NaN where the metric is undefined, such resamples are
left out of the interval), or an array of per-case values whose mean is the metric (accuracy from 0/1
correctness, mean Dice), which is bootstrapped vectorised and much faster.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medlens.errors import InputError
from medlens.evaluate.bootstrap import CI, bootstrap_ci, group_gap_ci

MISSING = "missing"

IndexMetric = Callable[[np.ndarray], float]


def age_bands(values: Sequence[Any], width: int = 20) -> list[str]:
    """Ages as band labels ``"0-19"``, ``"20-39"``, ... (``width`` years each); ``"missing"`` for no value.

    Raises:
        InputError: a value that is not a number (naming it), a negative age, or a bad ``width``.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise InputError(f"age band width={width!r} must be a positive whole number of years (e.g. 20)")
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            out.append(MISSING)
            continue
        try:
            age = float(v)
        except (TypeError, ValueError):
            raise InputError(
                f"age {v!r} is not a number; give ages in years (or leave the value empty)"
            ) from None
        if not math.isfinite(age) or age < 0:
            raise InputError(f"age {v!r} must be a non-negative number of years")
        lo = int(age // width) * width
        out.append(f"{lo}-{lo + width - 1}")
    return out


def auc_metric(y_true: Any, score: Any) -> IndexMetric:
    """A fast ROC AUC of a subset of cases, ``metric(idx)``, for :func:`subgroup_analysis`.

    The Mann-Whitney statistic from average ranks (ties count 1/2, as ``sklearn.metrics.roc_auc_score``),
    about 50x faster than scikit-learn on small subsets, which matters for thousands of bootstrap resamples.
    NaN when the subset lacks positive or negative cases.

    Args:
        y_true: 0/1 (or boolean) target per case.
        score: the positive-class score per case.

    Raises:
        InputError: lengths differ.
    """
    from scipy.stats import rankdata

    y = np.asarray(y_true).reshape(-1).astype(bool)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise InputError(f"auc_metric: {y.size} targets for {s.size} scores; give one score per case")

    def auc(idx: np.ndarray) -> float:
        t = y[idx]
        n_pos = int(t.sum())
        n_neg = t.size - n_pos
        if n_pos == 0 or n_neg == 0:
            return math.nan
        ranks = rankdata(s[idx])
        return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

    return auc


def subgroup_analysis(
    metric: IndexMetric | Sequence[float] | np.ndarray,
    n_cases: int,
    groups: Sequence[Any],
    column: str,
    *,
    min_size: int = 5,
    seed: int = 0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    metric_name: str = "metric",
) -> dict[str, Any]:
    """The metric per group of one metadata column, and the largest gap between adequately sized groups.

    Args:
        metric: ``metric(idx) -> float`` on a subset of case indices, or per-case values (length
            ``n_cases``) whose mean is the metric (see the module docstring).
        n_cases: number of cases.
        groups: the column's value for each case (``None``/NaN/empty = missing).
        column: the column's name (for messages and the report).
        min_size: groups with fewer cases are reported as too small and left out of the gap.
        seed: bootstrap seed; the same seed gives the same result.
        n_resamples: bootstrap resamples per interval.
        confidence: coverage of the intervals.
        metric_name: the metric's name, for the report.

    Returns:
        ``{column, metric_name, n_cases, min_size, confidence, n_resamples, seed, overall, groups, gap,
        reason, warnings}``: ``overall`` and each group ``{group, n, estimate, ci, too_small}`` (``ci`` is
        ``[low, high]``, ``None`` for a too-small group); ``gap`` is ``{high_group, low_group, estimate, ci,
        excludes_zero}`` or ``None`` with the ``reason``.

    Raises:
        InputError: the group list or per-case values do not have one entry per case, or bad options.
    """
    if isinstance(n_cases, bool) or not isinstance(n_cases, int | np.integer) or n_cases < 1:
        raise InputError(f"n_cases={n_cases!r} must be a positive number of cases")
    if len(groups) != n_cases:
        raise InputError(f"column {column!r} has {len(groups)} values for {n_cases} cases; give one per case")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 2:
        raise InputError(f"min_size={min_size!r} must be a whole number of cases, at least 2")
    stat = _Stat(metric, n_cases, n_resamples, confidence)
    labels = [_label(g) for g in groups]
    label_array = np.array(labels, dtype=object)
    levels = sorted(set(labels), key=_natural)
    rng_seeds = np.random.SeedSequence(seed).spawn(len(levels) + 2)

    overall = stat.interval(np.arange(n_cases), int(rng_seeds[0].generate_state(1)[0]))
    rows: list[dict[str, Any]] = []
    warn: list[str] = []
    members: dict[str, np.ndarray] = {}
    for level, ss in zip(levels, rng_seeds[2:], strict=True):
        idx = np.flatnonzero(label_array == level)
        members[level] = idx
        too_small = idx.size < min_size
        if too_small:
            est = stat.point(idx)
            rows.append(
                {"group": level, "n": int(idx.size), "estimate": _num(est), "ci": None, "too_small": True}
            )
            warn.append(
                f"{column} = {level!r}: {idx.size} case(s), fewer than {min_size}: too few to say anything; "
                "no interval and left out of the gap"
            )
            continue
        ci = stat.interval(idx, int(ss.generate_state(1)[0]))
        rows.append({"group": level, "n": int(idx.size), **_ci_dict(ci), "too_small": False})
        if level == MISSING:
            warn.append(
                f"{column}: {idx.size} case(s) have no value; shown as {MISSING!r}, not part of the gap"
            )
        elif rows[-1]["estimate"] is None:
            warn.append(
                f"{column} = {level!r}: the {metric_name} is undefined on this group; left out of the gap"
            )

    eligible = [r for r in rows if not r["too_small"] and r["group"] != MISSING and r["estimate"] is not None]
    gap: dict[str, Any] | None = None
    reason: str | None = None
    named = [lv for lv in levels if lv != MISSING]
    if len(named) <= 1:
        reason = (
            f"column {column!r} has a single group ({named[0]!r}): there is no gap to report"
            if named
            else f"column {column!r} has no values"
        )
    elif len(eligible) < 2:
        reason = (
            f"column {column!r}: fewer than two groups have at least {min_size} cases "
            f"({len(eligible)} do), so no gap can be estimated"
        )
    else:
        hi = max(eligible, key=lambda r: r["estimate"])
        lo = min(eligible, key=lambda r: r["estimate"])
        ci = stat.gap(members[hi["group"]], members[lo["group"]], int(rng_seeds[1].generate_state(1)[0]))
        d = _ci_dict(ci)
        gap = {
            "high_group": hi["group"],
            "low_group": lo["group"],
            **d,
            "excludes_zero": bool(d["ci"] is not None and (d["ci"][0] > 0 or d["ci"][1] < 0)),
            "groups_compared": len(eligible),
        }
    return {
        "column": column,
        "metric_name": metric_name,
        "n_cases": int(n_cases),
        "min_size": min_size,
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
        "overall": {"group": "all", "n": int(n_cases), **_ci_dict(overall), "too_small": False},
        "groups": rows,
        "gap": gap,
        "reason": reason,
        "warnings": warn,
    }


# ---- the statistic: per-case values (vectorised) or a function of indices ---------------------------------------
class _Stat:
    def __init__(self, metric: Any, n: int, n_resamples: int, confidence: float) -> None:
        if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
            raise InputError(f"n_resamples={n_resamples!r} must be a positive integer (2000 is typical)")
        if not isinstance(confidence, int | float) or not 0.0 < confidence < 1.0:
            raise InputError(f"confidence={confidence!r} must be between 0 and 1 (e.g. 0.95)")
        self.n_resamples, self.confidence = n_resamples, float(confidence)
        self.fn: IndexMetric | None = None
        self.values: np.ndarray | None = None
        if callable(metric):
            self.fn = metric
        else:
            try:
                v = np.asarray(metric, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError("metric must be a function of case indices or one number per case") from None
            if v.shape != (n,):
                raise InputError(
                    f"per-case metric values have shape {v.shape}; give one value per case ({n})"
                )
            self.values = v

    def point(self, idx: np.ndarray) -> float:
        if self.fn is not None:
            return float(self.fn(idx)) if idx.size else math.nan
        assert self.values is not None
        v = self.values[idx]
        return float(np.mean(v[~np.isnan(v)])) if (~np.isnan(v)).any() else math.nan

    def interval(self, idx: np.ndarray, seed: int) -> CI:
        if self.values is not None:
            v = self.values[idx]
            if np.isnan(v).all():
                return CI(math.nan, math.nan, math.nan, 0, self.confidence)
            return bootstrap_ci(v, n_resamples=self.n_resamples, confidence=self.confidence, seed=seed)
        rng = np.random.default_rng(seed)
        draws = idx[rng.integers(0, idx.size, size=(self.n_resamples, idx.size))]
        stats = np.array([self._call(d) for d in draws])
        return self._ci(self.point(idx), stats, idx.size)

    def gap(self, a: np.ndarray, b: np.ndarray, seed: int) -> CI:
        if self.values is not None:
            return group_gap_ci(
                self.values[a],
                self.values[b],
                n_resamples=self.n_resamples,
                confidence=self.confidence,
                seed=seed,
            )
        rng = np.random.default_rng(seed)
        da = a[rng.integers(0, a.size, size=(self.n_resamples, a.size))]
        db = b[rng.integers(0, b.size, size=(self.n_resamples, b.size))]
        stats = np.array([self._call(x) - self._call(y) for x, y in zip(da, db, strict=True)])
        return self._ci(self.point(a) - self.point(b), stats, a.size + b.size)

    def _call(self, idx: np.ndarray) -> float:
        assert self.fn is not None
        return float(self.fn(idx))

    def _ci(self, estimate: float, stats: np.ndarray, n: int) -> CI:
        alpha = (1.0 - self.confidence) / 2.0
        ok = stats[np.isfinite(stats)]
        if ok.size < max(10, stats.size // 2):  # undefined in most resamples: no interval
            return CI(estimate, math.nan, math.nan, n, self.confidence)
        low, high = np.quantile(ok, [alpha, 1.0 - alpha])
        return CI(estimate, float(low), float(high), n, self.confidence)


# ---- helpers --------------------------------------------------------------------------------------------------------
def _label(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    text = str(value).strip()
    return text if text else MISSING


def _natural(label: str) -> tuple[Any, ...]:
    """Sort key: numbers (and bands like ``"20-39"``) numerically, then text, ``"missing"`` last."""
    if label == MISSING:
        return (2, 0.0, label)
    m = re.match(r"^-?\d+(\.\d+)?", label)
    return (0, float(m.group(0)), label) if m else (1, 0.0, label)


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _ci_dict(ci: CI) -> dict[str, Any]:
    bounds = [_num(ci.low), _num(ci.high)]
    return {"estimate": _num(ci.estimate), "ci": None if None in bounds else bounds}
