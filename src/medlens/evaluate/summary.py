"""Summaries of per-case metrics: means with bootstrap CIs per class, over foreground classes, per group.

A *per-case record* is a plain dict (build one with :func:`case_record`)::

    {"id": "case_007", "site": "A", "meta": {"sex": "F", "scanner": "X"},
     "metrics": {"liver": {"dice": 0.93, "hd95": 4.1, ...}, "tumour": {...}}}

``site`` and ``meta`` are optional. :func:`summarise` turns a list of them into a JSON-able dict::

    {"n_cases": 40, "classes": [...], "metrics": [...], "confidence": 0.95, "n_resamples": 2000, "seed": 0,
     "missing_rule": "...",
     "per_class": {"liver": {"dice": STAT, ...}, ...},
     "foreground_mean": {"dice": STAT, ...},
     "groups": {"site": {"A": {"n_cases": 20, "per_class": {...}, "foreground_mean": {...}}, ...}, "sex": {...}}}

where ``STAT = {"mean", "low", "high", "n", "n_missing"}``: the mean over cases, its percentile bootstrap
interval (cases resampled), the number of cases it is based on and the number where the metric was
undefined (NaN) or absent.

Missing values (the rule, stated once)
--------------------------------------
A metric is *missing* for a case when it is NaN (a surface distance when exactly one of prediction and
reference is empty, see :mod:`medlens.evaluate.segmentation`) or the case does not report that class.
By default the mean and CI are over the cases where it is defined and ``n_missing`` says how many were left
out; the overlap scores are never missing (they are 0 in that situation, the worst case already). Pass
``worst_case={"hd95": 100.0, "asd": 100.0}`` to substitute a worst-case value (e.g. the image diagonal in mm)
for every missing value instead; ``n_missing`` still counts them. The foreground mean of a case is the mean
over the classes where the metric is defined; its ``n_missing`` counts the cases where at least one class
was missing.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlens._fs import atomic_write_json, atomic_write_text
from medlens.errors import InputError
from medlens.evaluate.bootstrap import bootstrap_ci
from medlens.evaluate.segmentation import METRICS

#: Keys of a per-case record that are not metadata.
RECORD_KEYS = ("id", "site", "meta", "metrics")
#: A numeric metadata column with more distinct values than this is not used to form groups (e.g. age).
MAX_NUMERIC_LEVELS = 10
#: Group label for cases that lack the grouping column.
UNKNOWN_LEVEL = "unknown"


def case_record(
    case_id: str,
    metrics: Mapping[str, Mapping[str, float]],
    site: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one per-case record (the input of :func:`summarise`).

    Args:
        case_id: the case identifier.
        metrics: ``{class_name: {metric: value}}``, e.g. the output of ``segmentation_metrics``.
        site: acquisition site, if known.
        meta: any other case metadata (sex, scanner, ...), JSON-able values.
    """
    rec: dict[str, Any] = {"id": str(case_id), "site": None if site is None else str(site)}
    rec["meta"] = dict(meta or {})
    rec["metrics"] = {str(c): {str(k): float(v) for k, v in m.items()} for c, m in metrics.items()}
    return rec


def summarise(
    per_case: Sequence[Mapping[str, Any]],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    group_by: Sequence[str] | None = None,
    worst_case: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Summarise per-case metrics: means with bootstrap CIs per class, over classes, and per group.

    Args:
        per_case: per-case records (module docstring).
        confidence: CI coverage.
        n_resamples: bootstrap resamples per interval.
        seed: bootstrap seed (the same records and seed give the same summary).
        group_by: columns to tabulate by: ``"site"`` or a ``meta`` key. ``None`` means ``site`` (when any
            case has one) plus every categorical ``meta`` column: strings, booleans, or numbers taking at
            most :data:`MAX_NUMERIC_LEVELS` distinct values and at most one per two cases (so a field
            strength of 1.5/3 T is a group, an age is not; name a numeric column here to force it).
        worst_case: metric -> value substituted for missing values (module docstring); ``None`` leaves them
            out of the means.

    Returns:
        A JSON-able dict (NaN written as ``None``), layout in the module docstring.

    Raises:
        InputError: no records, a record without ``id``/``metrics``, duplicate ids, or an unknown group column.
    """
    records = _check_records(per_case)
    classes = _ordered_union(rec["metrics"].keys() for rec in records)
    metrics = _ordered_union(m.keys() for rec in records for m in rec["metrics"].values())
    metrics = sorted(metrics, key=lambda m: (METRICS.index(m) if m in METRICS else len(METRICS), m))
    worst = dict(worst_case or {})
    for m in worst:
        if m not in metrics:
            raise InputError(f"worst_case names metric {m!r}, which no case reports (metrics: {metrics})")
    # values[class][metric] -> (n_cases,) float array, NaN where missing
    values = {
        c: {m: np.array([_get(rec, c, m) for rec in records], dtype=np.float64) for m in metrics}
        for c in classes
    }
    options: dict[str, Any] = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}

    def table(rows: np.ndarray) -> dict[str, Any]:
        per_class = {
            c: {m: _stat(values[c][m][rows], worst.get(m), **options) for m in metrics} for c in classes
        }
        fg = {}
        for m in metrics:
            stacked = np.stack([_fill(values[c][m][rows], worst.get(m)) for c in classes])
            with np.errstate(invalid="ignore"):
                case_means = _nanmean_rows(stacked.T)
            fg[m] = _stat(case_means, None, **options)
            any_missing = np.stack([np.isnan(values[c][m][rows]) for c in classes]).any(axis=0)
            fg[m]["n_missing"] = int(any_missing.sum())
        return {"n_cases": int(rows.size), "per_class": per_class, "foreground_mean": fg}

    everything = table(np.arange(len(records)))
    summary: dict[str, Any] = {
        "n_cases": len(records),
        "classes": classes,
        "metrics": metrics,
        **options,
        "statistic": "mean",
        "missing_rule": _missing_rule(worst),
        "per_class": everything["per_class"],
        "foreground_mean": everything["foreground_mean"],
        "groups": {},
    }
    for column in _group_columns(records, group_by):
        levels: dict[str, list[int]] = {}
        for i, rec in enumerate(records):
            levels.setdefault(_level(rec, column), []).append(i)
        summary["groups"][column] = {
            level: table(np.asarray(rows)) for level, rows in sorted(levels.items(), key=lambda kv: kv[0])
        }
    return summary


def write_metrics(
    path: str | Path, per_case: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write ``{"summary": ..., "per_case": [...]}`` to ``path`` (JSON) and the per-case table beside it (CSV).

    Both files are written atomically. NaN becomes ``null`` in the JSON and an empty cell in the CSV. The CSV
    (``path`` with suffix ``.csv``) has one row per case: ``id``, ``site``, the metadata columns, then one
    ``<class>/<metric>`` column per class and metric.

    Returns:
        The JSON path and the CSV path.
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise InputError(
            f"{path}: metrics are written as JSON; give a path ending in .json (e.g. metrics.json)"
        )
    records = _check_records(per_case)
    atomic_write_json(path, _jsonable({"summary": dict(summary), "per_case": records}))
    csv_path = path.with_suffix(".csv")
    atomic_write_text(csv_path, per_case_csv(records))
    return path, csv_path


def load_metrics(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a file written by :func:`write_metrics`; returns ``(per_case, summary)`` with ``null`` metrics as NaN."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read metrics JSON ({exc}); was it written by medlens?") from None
    if not isinstance(raw, dict) or "per_case" not in raw or "summary" not in raw:
        raise InputError(f"{path}: not a medlens metrics file (expected keys 'summary' and 'per_case')")
    per_case = []
    for rec in raw["per_case"]:
        rec = dict(rec)
        rec["metrics"] = {
            c: {m: (math.nan if v is None else float(v)) for m, v in ms.items()}
            for c, ms in rec["metrics"].items()
        }
        per_case.append(rec)
    return per_case, raw["summary"]


def per_case_csv(per_case: Sequence[Mapping[str, Any]]) -> str:
    """The per-case table as CSV text (layout in :func:`write_metrics`)."""
    records = _check_records(per_case)
    meta_cols = _ordered_union(rec["meta"].keys() for rec in records)
    classes = _ordered_union(rec["metrics"].keys() for rec in records)
    pairs = [
        (c, m) for c in classes for m in _ordered_union(rec["metrics"].get(c, {}).keys() for rec in records)
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "site", *meta_cols, *(f"{c}/{m}" for c, m in pairs)])
    for rec in records:
        row: list[Any] = [rec["id"], rec.get("site") or ""]
        row += ["" if rec["meta"].get(k) is None else rec["meta"][k] for k in meta_cols]
        for c, m in pairs:
            v = _get(rec, c, m)
            row.append("" if math.isnan(v) else repr(v))
        writer.writerow(row)
    return buf.getvalue()


# ---- internals -------------------------------------------------------------------------------------------


def _check_records(per_case: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(per_case, Mapping) or not isinstance(per_case, Sequence) or len(per_case) == 0:
        raise InputError(
            "per_case must be a non-empty list of case records (see medlens.evaluate.case_record)"
        )
    seen: set[str] = set()
    out = []
    for i, rec in enumerate(per_case):
        if not isinstance(rec, Mapping) or "id" not in rec or not isinstance(rec.get("metrics"), Mapping):
            raise InputError(
                f"per_case[{i}] must be a dict with 'id' and 'metrics' ({{class: {{metric: value}}}}); "
                "build it with medlens.evaluate.case_record"
            )
        cid = str(rec["id"])
        if cid in seen:
            raise InputError(f"case id {cid!r} appears twice in per_case; every case must be scored once")
        seen.add(cid)
        unknown = sorted(set(rec) - set(RECORD_KEYS))
        if unknown:
            raise InputError(f"case {cid!r} has unknown keys {unknown}; put metadata under 'meta'")
        meta = rec.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise InputError(f"case {cid!r}: 'meta' must be a dict, got {type(meta).__name__}")
        out.append(
            {
                "id": cid,
                "site": None if rec.get("site") is None else str(rec["site"]),
                "meta": dict(meta),
                "metrics": {str(c): dict(m) for c, m in rec["metrics"].items()},
            }
        )
    return out


def _get(rec: Mapping[str, Any], cls: str, metric: str) -> float:
    v = rec["metrics"].get(cls, {}).get(metric)
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        raise InputError(f"case {rec['id']!r}: {cls}/{metric} = {v!r} is not a number") from None


def _ordered_union(groups: Iterable[Iterable[str]]) -> list[str]:
    out: dict[str, None] = {}
    for g in groups:
        for k in g:
            out.setdefault(str(k), None)
    return list(out)


def _fill(x: np.ndarray, worst: float | None) -> np.ndarray:
    return x if worst is None else np.where(np.isnan(x), float(worst), x)


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    counts = (~np.isnan(a)).sum(axis=1)
    sums = np.nansum(a, axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _stat(
    x: np.ndarray, worst: float | None, confidence: float, n_resamples: int, seed: int
) -> dict[str, Any]:
    n_missing = int(np.isnan(x).sum())
    filled = _fill(x, worst)
    if np.isnan(filled).all():
        return {"mean": None, "low": None, "high": None, "n": 0, "n_missing": n_missing}
    ci = bootstrap_ci(filled, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {"mean": ci.estimate, "low": ci.low, "high": ci.high, "n": ci.n, "n_missing": n_missing}


def _missing_rule(worst: Mapping[str, float]) -> str:
    rule = (
        "A metric is missing for a case when it is undefined (a surface distance with exactly one of "
        "prediction and reference empty) or not reported. "
    )
    if worst:
        subs = ", ".join(f"{m} = {v:g}" for m, v in worst.items())
        rule += f"Missing values were replaced by the worst case ({subs}); "
        rule += "other metrics' means are over the cases where they are defined. "
    else:
        rule += (
            "Means and intervals are over the cases where the metric is defined; n_missing counts the rest. "
        )
    rule += "Dice, Jaccard and NSD are 0 when one mask is empty and 1 when both are."
    return rule


def _level(rec: Mapping[str, Any], column: str) -> str:
    v = rec.get("site") if column == "site" else rec["meta"].get(column)
    return UNKNOWN_LEVEL if v is None or v == "" else str(v)


def _group_columns(records: list[dict[str, Any]], group_by: Sequence[str] | None) -> list[str]:
    meta_cols = _ordered_union(rec["meta"].keys() for rec in records)
    if group_by is not None:
        if isinstance(group_by, str):
            group_by = [group_by]
        for col in group_by:
            if col != "site" and col not in meta_cols:
                raise InputError(
                    f"cannot group by {col!r}: no case has it. Available: {['site', *meta_cols]}"
                )
        return list(group_by)
    cols = ["site"] if any(rec["site"] is not None for rec in records) else []
    for col in meta_cols:
        vals = [rec["meta"].get(col) for rec in records if rec["meta"].get(col) is not None]
        if all(isinstance(v, str | bool) for v in vals) or (
            all(isinstance(v, int | float) for v in vals)
            and len(set(vals)) <= min(MAX_NUMERIC_LEVELS, len(vals) // 2)
        ):
            cols.append(col)
    return cols


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if math.isnan(obj) or math.isinf(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
