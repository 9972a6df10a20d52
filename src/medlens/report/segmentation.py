"""The segmentation section of a report: metrics with CIs, per-case table, overlays, training curve, plan.

:func:`add_segmentation_section` adds to a :class:`~medlens.report.html.Report` what ``medlens demo`` shows of
its segmentation model; the figures come from :mod:`medlens.report.figures`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medlens.report.html import Report


def add_segmentation_section(
    rep: Report,
    summary: Mapping[str, Any],
    per_case: Sequence[Mapping[str, Any]],
    pictures: Sequence[tuple[str, Any]],
    seconds: Mapping[str, float],
    *,
    history_path: Path | None = None,
    plan_reasons: Sequence[str] = (),
    postprocessing_reasons: Sequence[str] = (),
    title: str = "Brain tissue segmentation",
) -> Report:
    """Add the segmentation section.

    Args:
        rep: the report to extend.
        summary: from :func:`medlens.evaluate.summary.summarise`.
        per_case: the per-case records summarised.
        pictures: ``(case id, overlay figure)`` pairs.
        seconds: prediction time per case id.
        history_path: the fold's ``history.json`` (training curve), if any.
        plan_reasons: the planner's decisions.
        postprocessing_reasons: the post-processing decisions taken on validation.
        title: the section heading.

    Returns:
        The report.
    """
    from medlens.report.figures import per_case_bar_figure, training_curve_figure

    rep.section(
        title,
        "A U-Net planned and trained by medlens on the brain-tissue sample dataset (subjects simulated from the "
        "MNI ICBM152 template: background, CSF, grey matter, white matter), evaluated on held-out subjects in "
        "their original geometry. Intervals are 95% percentile-bootstrap confidence intervals over cases.",
    )
    rep.metric_table_with_ci(summary, title="Held-out test metrics")
    rows = []
    for rec in per_case:
        row: dict[str, Any] = {"case": rec["id"], "site": rec.get("site")}
        for cls, m in rec["metrics"].items():
            row[f"{cls} Dice"] = m.get("dice")
            row[f"{cls} HD95 (mm)"] = m.get("hd95")
        row["prediction seconds"] = seconds.get(rec["id"])
        rows.append(row)
    rep.table("Per case", rows)
    rep.figure("Dice per case", per_case_bar_figure(per_case, metric="dice"))
    for case_id, fig in pictures:
        rep.figure(f"Overlay: {case_id}", fig, caption="image, reference, prediction")
    if history_path is not None and history_path.is_file():
        rep.figure("Training", training_curve_figure(json.loads(history_path.read_text())))
    rep.table("Plan of the segmentation model", [{"decision": r} for r in plan_reasons])
    rep.table("Post-processing (decided on validation)", [{"decision": r} for r in postprocessing_reasons])
    return rep
