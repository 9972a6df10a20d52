"""Figures of the trust report: reliability diagram, subgroup forest plot, deferral, robustness and PR curves.

Like :mod:`medlens.report.figures`, every function returns a ``matplotlib.figure.Figure`` built without pyplot
(safe in a server thread) and imports matplotlib when called. The figures are small (a few inches, rendered
at 110 dpi by :meth:`medlens.report.html.Report.figure`) so that a report with dozens of them stays light.
Each takes the dict produced by its statistics function in :mod:`medlens.evaluate` and draws exactly those
numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens.errors import InputError
from medlens.report.classification import ci_text
from medlens.report.figures import PALETTE

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_BEFORE, _AFTER, _GREY = "#D55E00", "#0072B2", "#999999"


def _fmt(v: Any) -> str:
    return "–" if v is None or not np.isfinite(float(v)) else f"{float(v):.3f}"


# ---- calibration -----------------------------------------------------------------------------------------------
def reliability_figure(
    ece_before: Mapping[str, Any], ece_after: Mapping[str, Any] | None = None, title: str | None = None
) -> Figure:
    """Reliability diagram: observed accuracy against mean confidence per bin, before (and after) scaling.

    The upper panel draws one point per non-empty bin (mean confidence, accuracy) with the diagonal of
    perfect calibration; the lower panel the number of values per bin. The ECE, binning and the binned
    probability are in the legend and caption line.

    Args:
        ece_before: an ECE dict of :mod:`medlens.evaluate.calibration` (``bins``, ``ece``, ...).
        ece_after: the same after temperature scaling, or ``None``.
        title: figure title.

    Raises:
        InputError: a dict without ``bins``.
    """
    curves = [("before", ece_before, _BEFORE)]
    if ece_after is not None:
        curves.append(("after temperature scaling", ece_after, _AFTER))
    for name, d, _ in curves:
        if not isinstance(d, Mapping) or "bins" not in d or "ece" not in d:
            raise InputError(
                f"reliability_figure: the {name!r} argument must be an ECE dict with 'bins' and 'ece'"
            )

    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4, 4.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color=_GREY, ls="--", lw=1, label="perfect calibration")
    width = 1.0 / max(len(curves[0][1]["bins"]), 1)
    for n, (name, d, colour) in enumerate(curves):
        full = [b for b in d["bins"] if b["count"] > 0 and b["confidence"] is not None]
        x = [b["confidence"] for b in full]
        y = [b["accuracy"] for b in full]
        label = name if ece_after is not None else "model"
        top.plot(x, y, marker="o", ms=4, color=colour, lw=1.5, label=f"{label}: ECE {_fmt(d['ece'])}")
        centres = [(b["lo"] + b["hi"]) / 2 for b in d["bins"]]
        shift = (n - (len(curves) - 1) / 2) * width * 0.4
        bottom.bar(np.asarray(centres) + shift, [b["count"] for b in d["bins"]], width=width * 0.4,
                   color=colour, alpha=0.8)  # fmt: skip
    what = str(ece_before.get("what", "probability"))
    top.set_ylabel("observed accuracy" if "top-label" in what else "observed frequency")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=7, frameon=False)
    top.set_title(title or "Reliability diagram", fontsize=10)
    bottom.set_xlabel(f"{what}\n({ece_before.get('binning', '')})", fontsize=8)
    bottom.set_ylabel("count", fontsize=8)
    bottom.grid(axis="y", alpha=0.3)
    return fig


# ---- subgroups -----------------------------------------------------------------------------------------------
def subgroup_figure(
    analysis: Mapping[str, Any] | Sequence[Mapping[str, Any]], title: str | None = None
) -> Figure:
    """Forest plot of a metric per group with CIs: one panel per column, the largest gap in its title.

    Groups too small to say anything are drawn as hollow grey points without an interval; the dashed line is
    the estimate over all cases.

    Args:
        analysis: a :func:`medlens.evaluate.subgroups.subgroup_analysis` result, or a list of them.
        title: figure title.

    Raises:
        InputError: an argument that is not such a result.
    """
    analyses = [analysis] if isinstance(analysis, Mapping) else list(analysis)
    if not analyses or not all(isinstance(a, Mapping) and "groups" in a for a in analyses):
        raise InputError(
            "subgroup_figure needs the result(s) of medlens.evaluate.subgroups.subgroup_analysis"
        )

    from matplotlib.figure import Figure

    heights = [max(len(a["groups"]), 1) + 1.2 for a in analyses]
    fig = Figure(figsize=(5.6, min(0.32 * sum(heights) + 0.6, 12.0)), layout="constrained")
    axes = fig.subplots(len(analyses), 1, squeeze=False, sharex=True, height_ratios=heights)[:, 0]
    for ax, a in zip(axes, analyses, strict=True):
        _forest(ax, a)
    axes[-1].set_xlabel(str(analyses[0].get("metric_name", "metric")))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _forest(ax: Axes, a: Mapping[str, Any]) -> None:
    rows = list(a["groups"])
    ypos = np.arange(len(rows))[::-1]
    for y, r in zip(ypos, rows, strict=True):
        est = r.get("estimate")
        if est is None:
            continue
        if r.get("too_small") or r.get("ci") is None:
            ax.scatter([est], [y], s=28, facecolors="none", edgecolors=_GREY, zorder=3)
        else:
            lo, hi = r["ci"]
            ax.errorbar(
                [est],
                [y],
                xerr=[[max(est - lo, 0.0)], [max(hi - est, 0.0)]],
                fmt="o",
                ms=5,
                color=_AFTER,
                capsize=3,
                lw=1.5,
            )
    labels = [f"{r['group']} (n={r['n']}{', too small' if r.get('too_small') else ''})" for r in rows]
    ax.set_yticks(ypos, labels, fontsize=8)
    ax.set_ylim(-0.8, len(rows) - 0.2)
    overall = (a.get("overall") or {}).get("estimate")
    if overall is not None:
        ax.axvline(overall, color=_GREY, ls="--", lw=1)
    gap = a.get("gap")
    if gap:
        lo, hi = gap["ci"] if gap.get("ci") else (None, None)
        head = f"gap {gap['high_group']} − {gap['low_group']}: {ci_text({'estimate': gap['estimate'], 'low': lo, 'high': hi})}"
    else:
        head = str(a.get("reason") or "no gap")
    ax.set_title(f"{a.get('column', '')}: {head}", fontsize=8, loc="left")
    ax.grid(axis="x", alpha=0.3)


# ---- deferral -------------------------------------------------------------------------------------------------
def deferral_figure(curve: Mapping[str, Any], title: str | None = None) -> Figure:
    """Metric on the kept cases against the fraction referred, with random referral and the oracle.

    Args:
        curve: a :func:`medlens.evaluate.deferral.deferral_curve` result.
        title: figure title.

    Raises:
        InputError: an argument that is not such a result.
    """
    need = ("fractions", "kept_metric", "random_metric", "oracle_metric", "auc", "auc_random")
    if not isinstance(curve, Mapping) or any(k not in curve for k in need):
        raise InputError("deferral_figure needs the result of medlens.evaluate.deferral.deferral_curve")

    from matplotlib.figure import Figure

    f = np.asarray(curve["fractions"], dtype=float)
    fig = Figure(figsize=(4.6, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(f, curve["oracle_metric"], color=PALETTE[2], ls=":", lw=1.5,
            label=f"oracle (area {_fmt(curve.get('auc_oracle'))})")  # fmt: skip
    ax.plot(f, curve["kept_metric"], color=_AFTER, lw=2, marker="o", ms=3,
            label=f"refer by uncertainty (area {_fmt(curve['auc'])})")  # fmt: skip
    ax.plot(f, curve["random_metric"], color=_GREY, ls="--", lw=1.2,
            label=f"random referral (area {_fmt(curve['auc_random'])})")  # fmt: skip
    ax.set_xlabel("fraction of cases referred to an expert")
    ax.set_ylabel(f"{curve.get('metric_name', 'metric')} on the kept cases")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=True, framealpha=0.85, edgecolor="none", loc="best")
    ax.set_title(title or f"Deferral ({curve.get('n_cases', '?')} cases)", fontsize=10)
    return fig


# ---- robustness -----------------------------------------------------------------------------------------------
def robustness_figure(curves: Mapping[str, Mapping[str, Any]], title: str | None = None) -> Figure:
    """One small panel per perturbation: the metric (with its CI whiskers) against the stated strength.

    Args:
        curves: ``{kind: {"strengths", "unit", "metric_name", "metric", "ci"}}`` from
            :func:`medlens.evaluate.robustness.robustness_curves`; ``ci`` entries may be ``None``.
        title: figure title.

    Raises:
        InputError: no curves, or a curve without strengths and metric of the same length.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise InputError(
            "robustness_figure needs {kind: {'strengths', 'metric', ...}} with at least one curve"
        )
    for kind, c in curves.items():
        s, m = c.get("strengths"), c.get("metric")
        if s is None or m is None or len(s) != len(m) or len(s) == 0:
            raise InputError(
                f"robustness curve {kind!r} needs 'strengths' and 'metric' of the same non-zero length"
            )

    from matplotlib.figure import Figure

    n = len(curves)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3.0 * ncols, 2.5 * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()  # one scale: panels compare
    for ax, (kind, c) in zip(axes, curves.items(), strict=False):
        x = np.asarray(c["strengths"], dtype=float)
        y = np.asarray([np.nan if v is None else v for v in c["metric"]], dtype=float)
        ci = c.get("ci") or []
        if len(ci) == len(x):
            lo = np.asarray([np.nan if b is None or b[0] is None else b[0] for b in ci], dtype=float)
            hi = np.asarray([np.nan if b is None or b[1] is None else b[1] for b in ci], dtype=float)
            ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
            if ok.any():  # whiskers, so that an interval next to a missing one is still shown
                err = [np.maximum(y[ok] - lo[ok], 0), np.maximum(hi[ok] - y[ok], 0)]
                ax.errorbar(x[ok], y[ok], yerr=err, fmt="none", ecolor=_AFTER, alpha=0.6, capsize=2, lw=1)
        ax.plot(x, y, marker="o", ms=3, color=_AFTER, lw=1.5)
        ax.set_title(str(kind), fontsize=9)
        ax.set_xlabel(str(c.get("unit", "strength")), fontsize=8)
        ax.set_ylabel(str(c.get("metric_name", "metric")), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---- precision-recall -------------------------------------------------------------------------------------------
def pr_figure(y: Any, scores: Any, class_names: Sequence[str], title: str | None = None) -> Figure:
    """Precision-recall curve(s): the positive class for a binary task, one-vs-rest per class otherwise.

    Each curve's legend gives its average precision (scikit-learn ``average_precision_score``) and the
    dotted line of its colour is the prevalence (the precision of a random ranking). A class with no positive
    case has no curve and says so in the legend.

    Args:
        y: class indices ``(N,)`` or 0/1 labels ``(N, K)`` (multilabel).
        scores: probabilities ``(N, K)``, or ``(N,)`` positive-class scores for a binary task.
        class_names: one name per class (binary: the two names, the positive one last).
        title: figure title.

    Raises:
        InputError: shapes that do not match the names or each other.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve

    s = np.asarray(scores, dtype=float)
    t = np.asarray(y)
    names = [str(n) for n in class_names]
    if s.ndim == 1:
        s = np.stack([1.0 - s, s], axis=1)
    if s.ndim != 2 or s.shape[0] != t.shape[0] or s.shape[0] == 0:
        raise InputError(
            f"pr_figure: scores {s.shape} must be (cases, classes) with one row per target ({t.shape[0]})"
        )
    k = s.shape[1]
    if len(names) != k:
        raise InputError(
            f"pr_figure: {len(names)} class names for {k} score columns; give one name per column"
        )
    if t.ndim == 2:
        if t.shape != s.shape:
            raise InputError(f"pr_figure: multilabel targets {t.shape} must match the scores {s.shape}")
        truth = t.astype(bool)
    else:
        truth = t.reshape(-1)[:, None] == np.arange(k)[None, :]
    columns = [k - 1] if k == 2 and t.ndim == 1 else list(range(k))

    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for n, j in enumerate(columns):
        colour = PALETTE[n % len(PALETTE)]
        pos = truth[:, j]
        if not pos.any():
            ax.plot([], [], color=colour, label=f"{names[j]}: no positive case")
            continue
        precision, recall, _ = precision_recall_curve(pos, s[:, j])
        ap = average_precision_score(pos, s[:, j])
        ax.step(recall, precision, where="post", color=colour, lw=1.8, label=f"{names[j]}: AP {ap:.3f}")
        ax.axhline(float(pos.mean()), color=colour, ls=":", lw=1)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="lower left")
    ax.set_title(title or "Precision-recall (dotted: prevalence)", fontsize=10)
    return fig
