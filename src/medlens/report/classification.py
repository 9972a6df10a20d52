"""The classification section of a report: metrics with CIs, ROC curve and confusion matrix at the threshold.

:func:`add_classification_section` takes the summary of
:func:`medlens.evaluate.classification.classification_metrics` and the test cases' targets and scores, and adds
to a :class:`~medlens.report.html.Report`: a table of every overall metric with its bootstrap interval (and
MedMNIST's own ACC/AUC), the ROC curve with the operating point of the stored threshold (binary tasks), and the
confusion matrix (counts and row fractions). The figures are built without pyplot, like
:mod:`medlens.report.figures`; matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from medlens.report.html import Report

#: Overall metric key -> label in the table, in display order (keys absent from a summary are skipped).
METRIC_ROWS = {
    "auc": "AUC (ROC)",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "recall": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "npv": "NPV",
    "f1": "F1",
    "mae": "Mean absolute grade error",
    "quadratic_kappa": "Quadratic kappa",
    "subset_accuracy": "Subset accuracy",
}


def ci_text(stat: Mapping[str, Any] | None) -> str:
    """``"0.912 [0.871, 0.950]"`` from a CI dict (``estimate``, ``low``, ``high``); an en dash when undefined."""
    if not stat or stat.get("estimate") is None:
        return "–"

    def f(v: Any) -> str:
        return "–" if v is None or not np.isfinite(float(v)) else f"{float(v):.3f}"

    return f"{f(stat['estimate'])} [{f(stat.get('low'))}, {f(stat.get('high'))}]"


def metric_rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per overall metric (then MedMNIST's ACC and AUC): metric, value with its CI.

    Raises:
        InputError: ``summary`` is not from ``classification_metrics``.
    """
    if "overall" not in summary or "confidence" not in summary:
        raise InputError(
            "the classification section needs the summary of medlens.evaluate.classification_metrics "
            f"(keys 'overall' and 'confidence'); got keys {sorted(summary)}"
        )
    conf = f"{float(summary['confidence']):.0%} CI"
    overall = summary["overall"]
    rows = [
        {"metric": label, f"value [{conf}]": ci_text(overall[k])}
        for k, label in METRIC_ROWS.items()
        if k in overall
    ]
    mm = summary.get("medmnist") or {}
    for key, label in (("auc", "MedMNIST AUC"), ("acc", "MedMNIST ACC")):
        if key in mm:
            rows.append({"metric": label, f"value [{conf}]": ci_text(mm[key])})
    return rows


def roc_figure(
    y_true: Any, score: Any, threshold: float | None = None, auc: Mapping[str, Any] | None = None
) -> Figure:
    """ROC curve of a binary task, with the operating point of ``threshold`` marked.

    Args:
        y_true: 0/1 targets ``(N,)``.
        score: positive-class scores ``(N,)``.
        threshold: the decision threshold (positive when ``score >= threshold``), or None for no point.
        auc: the AUC's CI dict, shown in the legend.

    Raises:
        InputError: shapes that differ, or a single outcome in ``y_true`` (no ROC curve).
    """
    from sklearn.metrics import roc_curve

    y, s = np.asarray(y_true).astype(int).reshape(-1), np.asarray(score, dtype=float).reshape(-1)
    if y.shape != s.shape or y.size == 0:
        raise InputError(f"roc_figure: {y.size} targets for {s.size} scores; give one score per case")
    if np.unique(y).size < 2:
        raise InputError("roc_figure: the targets hold a single class, so there is no ROC curve")
    fpr, tpr, _ = roc_curve(y, s)

    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4.0), layout="constrained")
    a = fig.subplots()
    label = f"ROC, AUC {ci_text(auc)}" if auc else "ROC"
    a.plot(fpr, tpr, color="#0072B2", lw=2, label=label)
    a.plot([0, 1], [0, 1], color="#999999", ls="--", lw=1, label="chance")
    if threshold is not None:
        pred = s >= threshold
        sens = float((pred & (y == 1)).sum() / max((y == 1).sum(), 1))
        spec = float((~pred & (y == 0)).sum() / max((y == 0).sum(), 1))
        a.scatter([1 - spec], [sens], color="#D55E00", zorder=3, s=40,
                  label=f"threshold {threshold:.3g}: sens {sens:.2f}, spec {spec:.2f}")  # fmt: skip
    a.set_xlabel("1 - specificity (false positive rate)")
    a.set_ylabel("sensitivity (true positive rate)")
    a.set_xlim(-0.02, 1.02)
    a.set_ylim(-0.02, 1.02)
    a.set_aspect("equal")
    a.grid(alpha=0.3)
    a.legend(loc="lower right", fontsize=7, frameon=False)
    return fig


def confusion_figure(counts: Any, class_names: Sequence[str], title: str | None = None) -> Figure:
    """Confusion matrix (rows = true class, columns = predicted): counts and row fractions in each cell.

    Raises:
        InputError: a matrix that is not square or does not match the class names.
    """
    c = np.asarray(counts, dtype=float)
    k = len(class_names)
    if c.shape != (k, k):
        raise InputError(f"confusion_figure: a {c.shape} matrix for {k} class names; give a {k}x{k} matrix")
    rows = c.sum(axis=1, keepdims=True)
    frac = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)

    from matplotlib.figure import Figure

    side = 2.2 + 0.7 * k
    fig = Figure(figsize=(side + 0.8, side), layout="constrained")
    a = fig.subplots()
    im = a.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            colour = "white" if frac[i, j] > 0.6 else "black"
            a.text(
                j, i, f"{int(c[i, j])}\n{frac[i, j]:.0%}", ha="center", va="center", color=colour, fontsize=9
            )
    a.set_xticks(range(k), list(class_names), rotation=30, ha="right")
    a.set_yticks(range(k), list(class_names))
    a.set_xlabel("predicted")
    a.set_ylabel("true")
    fig.colorbar(im, ax=a, fraction=0.046, label="fraction of the true class")
    if title:
        a.set_title(title)
    return fig


def add_classification_section(
    rep: Report,
    summary: Mapping[str, Any],
    y_true: Any,
    scores: Any,
    *,
    title: str = "Lesion classification",
    description: str = "",
    plan_reasons: Sequence[str] = (),
    decision_reasons: Sequence[str] = (),
) -> Report:
    """Add a classification section: metrics with CIs, ROC with the threshold's point, confusion matrix.

    Args:
        rep: the report to extend.
        summary: from :func:`medlens.evaluate.classification.classification_metrics` on the test cases.
        y_true: the test cases' targets, as given to ``classification_metrics``.
        scores: their probabilities ``(N, K)``.
        title: the section heading.
        description: text under the heading.
        plan_reasons: the planner's decisions, listed in a table.
        decision_reasons: how the decision threshold was chosen (``run.json`` ``decision.reasons``).

    Returns:
        The report.
    """
    rows = metric_rows(summary)
    ctype = str(summary.get("classification_type"))
    names = list(summary.get("class_names") or [])
    decision = summary.get("decision") or {}
    rep.section(title, description)
    thr = decision.get("threshold")
    rule = f"{decision.get('rule')}" + (f" with threshold {thr:.4g}" if isinstance(thr, float) else "")
    caption = (
        f"{summary.get('n_cases')} held-out test cases; decision: {rule}. Intervals: percentile bootstrap over "
        f"cases ({summary.get('n_resamples')} resamples). Sensitivity, specificity, precision, NPV and F1 are "
        f"those of the positive class ({names[-1] if names else '?'})."
    )
    rep.table("Held-out test metrics", rows, caption=caption)
    s = np.asarray(scores, dtype=float)
    if ctype == "binary":
        auc = (summary.get("overall") or {}).get("auc")
        positive = s[:, -1] if s.ndim == 2 else s
        if np.unique(np.asarray(y_true)).size > 1:
            rep.figure("ROC curve", roc_figure(y_true, positive, thr if isinstance(thr, float) else None, auc),
                       caption="the dot is the operating point of the stored threshold")  # fmt: skip
        else:
            rep.text("No ROC curve: the test cases hold a single class.")
    cm = summary.get("confusion_matrix") or {}
    if "counts" in cm:
        rep.figure("Confusion matrix", confusion_figure(cm["counts"], names),
                   caption=f"at the decision rule ({rule}); each cell: count and fraction of its true class")  # fmt: skip
    if decision_reasons:
        rep.table("Decision threshold (chosen on validation)", [{"decision": r} for r in decision_reasons])
    if plan_reasons:
        rep.table("Plan of the classifier", [{"decision": r} for r in plan_reasons])
    return rep
