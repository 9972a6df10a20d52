"""The sections of the trust report, one function each, reading ``evaluation.json`` (and its pictures).

Every function takes the report, the evaluation dict and a title prefix, and adds its section; the figures come
from :mod:`medlens.report.figures`, :mod:`medlens.report.classification`, :mod:`medlens.report.trust_figures`
and :mod:`medlens.report.explain_figures`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medlens.report.classification import ci_text


def _f(v: Any, digits: int = 3) -> str:
    return "–" if v is None or not np.isfinite(float(v)) else f"{float(v):.{digits}f}"


def sanity_verdict(check: Mapping[str, Any]) -> str:
    """``passed``, ``FAILED`` or ``not checkable`` (a constant map has no ranking to compare)."""
    if check.get("spearman") is None:
        return "not checkable"
    return "passed" if check.get("passed") else "FAILED"


def gap_text(gap: Mapping[str, Any]) -> str:
    """``"0.123 [0.050, 0.200] (B vs A)"`` from a subgroup gap (``estimate``, ``ci``, ``high_group``, ``low_group``)."""
    lo, hi = _lohi(gap.get("ci")).values()
    return (
        f"{_f(gap.get('estimate'))} [{_f(lo)}, {_f(hi)}] ({gap.get('high_group')} vs {gap.get('low_group')})"
    )


# ---- at a glance ---------------------------------------------------------------------------------------------
def headline(ev: Mapping[str, Any]) -> tuple[str, str]:
    """The headline metric of a run's evaluation: (name, value with CI)."""
    m = ev["metrics"]
    if ev["task"] == "segmentation":
        return "mean Dice", ci_text(_ci_from_summary(m["foreground_mean"].get("dice")))
    overall = m.get("overall", {})
    key = "auc" if overall.get("auc", {}).get("estimate") is not None else "accuracy"
    return key.upper() if key == "auc" else key, ci_text(overall.get(key))


def _ci_from_summary(stat: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``summarise`` writes mean/low/high; ``ci_text`` reads estimate/low/high."""
    if not stat:
        return None
    return {
        "estimate": stat.get("mean", stat.get("estimate")),
        "low": stat.get("low"),
        "high": stat.get("high"),
    }


def findings(ev: Mapping[str, Any]) -> list[str]:
    """Plain-language warnings a reader must not miss (small groups, failed sanity checks, ...)."""
    out: list[str] = []
    n = int(ev["n_cases"])
    if n < 30:
        out.append(
            f"Only {n} evaluated cases: every interval below is wide; treat the estimates as preliminary."
        )
    cal = ev.get("calibration") or {}
    ece = (cal.get("before") or {}).get("ece")  # what predict returns: the run does not apply the temperature
    if ece is not None and ece > 0.1:
        out.append(f"Calibration error (ECE) {ece:.3f} > 0.1: the probabilities should not be read as risks.")
    for col, a in ((ev.get("subgroups") or {}).get("columns") or {}).items():
        gap = a.get("gap")
        if gap and gap.get("excludes_zero"):
            out.append(f"Subgroup gap by {col}: {gap_text(gap)}, an interval that excludes 0.")
        small = [g["group"] for g in a.get("groups", []) if g.get("too_small")]
        if small:
            out.append(
                f"{col}: {len(small)} group(s) below {a.get('min_size', 'the minimum')} cases "
                f"({', '.join(map(str, small[:6]))}{', ...' if len(small) > 6 else ''}): too few to compare"
                + ("; no gap is estimated for this column." if not gap else ".")
            )
    for method, check in ((ev.get("explanations") or {}).get("sanity") or {}).items():
        if check.get("spearman") is None:
            out.append(
                f"Explanation method {method} could not be checked ({check.get('note', '')}); do not rely on it."
            )
        elif not check.get("passed"):
            out.append(
                f"Explanation method {method} FAILED the model-randomisation check (Spearman "
                f"{_f(check.get('spearman'))}): its maps do not depend on what the network learnt; do not use them."
            )
    shift = ev.get("shift") or {}
    if shift.get("held_out_sites"):
        out.append(
            f"Site(s) {', '.join(shift['held_out_sites'])} were never seen in training (domain shift)."
        )
    curve = (ev.get("uncertainty") or {}).get("curve") or {}
    if (
        curve.get("auc") is not None
        and curve.get("auc_random") is not None
        and curve["auc"] <= curve["auc_random"]
    ):
        out.append(
            "Uncertainty does not identify the worse cases: deferral by uncertainty is no better than random."
        )
    return out


def at_a_glance(rep: Any, ev: Mapping[str, Any], prefix: str) -> None:
    name, value = headline(ev)
    cal = ev.get("calibration") or {}
    before, after = cal.get("before") or {}, cal.get("after") or {}
    curve = (ev.get("uncertainty") or {}).get("curve") or {}
    sanity = (ev.get("explanations") or {}).get("sanity") or {}
    rep.section(
        f"{prefix}At a glance",
        f"Evidence for run {ev['run_name']} ({ev['task']}) on {ev['n_cases']} {ev['split']} cases of dataset "
        f"{ev['dataset']['name']}. Intervals are 95% percentile-bootstrap confidence intervals over cases.",
    )
    rep.key_values(
        None,
        {
            name: value,
            "calibration (ECE)": (
                f"{_f(before.get('ece'))} -> {_f(after.get('ece'))} after temperature scaling"
                if after
                else _f(before.get("ece"))
            ),
            "largest subgroup gap": _largest_gap_text(ev),
            "deferral (area under kept-metric curve)": (
                f"{_f(curve.get('auc'))} vs {_f(curve.get('auc_random'))} for random referral"
                if curve
                else "–"
            ),
            "explanation sanity checks": ", ".join(f"{m} {sanity_verdict(c)}" for m, c in sanity.items())
            or "–",
            "evaluation time": f"{ev.get('seconds', {}).get('total', '–')} s",
        },
    )
    notes = findings(ev)
    if notes:
        rep.table("Read before use", [{"finding": t} for t in notes])


def _largest_gap_text(ev: Mapping[str, Any]) -> str:
    best: tuple[float, str] | None = None
    for col, a in ((ev.get("subgroups") or {}).get("columns") or {}).items():
        gap = a.get("gap")
        if gap and gap.get("estimate") is not None and (best is None or gap["estimate"] > best[0]):
            best = (float(gap["estimate"]), f"{gap_text(gap)} by {col}")
    return best[1] if best else "no column with two groups large enough to compare"


# ---- performance ---------------------------------------------------------------------------------------------
def performance(rep: Any, ev: Mapping[str, Any], pictures: Any, prefix: str) -> None:
    from medlens.report.figures import overlay_figure, per_case_bar_figure

    if ev["task"] == "classification":
        from medlens.report.classification import add_classification_section
        from medlens.report.trust_figures import pr_figure

        add_classification_section(
            rep, ev["metrics"], ev["targets"], ev["scores"], title=f"{prefix}Performance",
            description="Held-out metrics at the decision threshold stored in the run (chosen on validation).",
        )  # fmt: skip
        if len(np.unique(np.asarray(ev["targets"]))) > 1:
            rep.figure("Precision-recall", pr_figure(ev["targets"], ev["scores"], ev["class_names"]))
        rows = [
            {"case": c["id"], "site": c.get("site"), "target": ev["class_names"][int(t)] if np.ndim(t) == 0 else t,
             "scores": ", ".join(f"{v:.3f}" for v in s), "correct": bool(c["performance"])}
            for c, t, s in zip(ev["cases"], ev["targets"], ev["scores"], strict=True)
        ]  # fmt: skip
        worst = set(ev.get("worst_cases", []))
        rep.table("Worst cases (largest loss)", [r for r in rows if r["case"] in worst])
        for cid in ev.get("worst_cases", []):
            key = f"{cid}/image"
            if key in pictures:
                rep.figure(
                    f"Worst case {cid}", _image_figure(pictures[key], cid), caption=_case_caption(ev, cid)
                )
        return
    rep.section(f"{prefix}Performance", "Held-out metrics in mm, in each case's original geometry.")
    rep.metric_table_with_ci(ev["metrics"], title="Held-out test metrics", groups=False)
    rows = []
    for rec in ev["per_case"]:
        row: dict[str, Any] = {"case": rec["id"], "site": rec.get("site")}
        for cls, m in rec["metrics"].items():
            row[f"{cls} Dice"] = m.get("dice")
            row[f"{cls} HD95 (mm)"] = m.get("hd95")
        row["uncertainty"] = (ev.get("uncertainty") or {}).get("scores", {}).get(rec["id"])
        row["seconds (with uncertainty)"] = ev.get("prediction_seconds", {}).get(rec["id"])
        rows.append(row)
    rep.table("Per case", rows)
    rep.figure("Dice per case", per_case_bar_figure(ev["per_case"], metric="dice"))
    labels = _labels(ev)
    for cid in ev.get("worst_cases", []):
        if f"{cid}/image" in pictures:
            fig = overlay_figure(
                pictures[f"{cid}/image"], pictures[f"{cid}/truth"], pictures[f"{cid}/pred"], labels,
                spacing=[float(v) for v in pictures[f"{cid}/spacing"]], title=f"worst case {cid}",
            )  # fmt: skip
            rep.figure(
                f"Worst case {cid}", fig, caption="image, reference, prediction (slice with most reference)"
            )


def _labels(ev: Mapping[str, Any]) -> dict[str, int]:
    names = list((ev["metrics"].get("per_class") or {}).keys())
    return {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}


def _case_caption(ev: Mapping[str, Any], cid: str) -> str:
    i = [c["id"] for c in ev["cases"]].index(cid)
    t, s = ev["targets"][i], ev["scores"][i]
    names = ev["class_names"]
    truth = names[int(t)] if np.ndim(t) == 0 else str(t)
    return f"reference {truth}; probabilities " + ", ".join(
        f"{n} {v:.3f}" for n, v in zip(names, s, strict=True)
    )


def _image_figure(image: np.ndarray, title: str) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.6, 2.6), dpi=100)
    ax.imshow(np.asarray(image).T, cmap="gray", origin="lower")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    return fig


# ---- calibration, subgroups, shift ---------------------------------------------------------------------------
def calibration(rep: Any, ev: Mapping[str, Any], prefix: str) -> None:
    from medlens.report.trust_figures import reliability_figure

    cal = ev.get("calibration") or {}
    before, after = cal.get("before") or {}, cal.get("after")
    binning = f"{before.get('n_bins')} {before.get('strategy')} bins of {before.get('what')}"
    if cal.get("kind") == "voxel":
        text = (
            f"Voxel-level calibration of the predicted class probabilities on the evaluated cases ({binning}). "
            "ECE is the case-weighted mean |accuracy - confidence| over the bins."
        )
    else:
        text = (
            f"Expected calibration error ({binning}). A temperature T was fitted on the run's "
            f"{cal.get('n_validation', '?')} validation predictions (minimum NLL) and applied to the test "
            f"predictions: T = {_f(cal.get('temperature'))}. " + str(cal.get("note", ""))
        )
    rep.section(f"{prefix}Calibration", text)
    rows = [
        {
            "": "before",
            "ECE": before.get("ece"),
            "NLL": cal.get("nll_before"),
            "Brier": cal.get("brier_before"),
        }
    ]
    if after:
        rows.append({"": "after temperature scaling", "ECE": after.get("ece"), "NLL": cal.get("nll_after"),
                     "Brier": cal.get("brier_after")})  # fmt: skip
    rep.table(None, rows)
    rep.figure("Reliability diagram", reliability_figure(before, after))


def subgroups(rep: Any, ev: Mapping[str, Any], prefix: str) -> None:
    from medlens.report.trust_figures import subgroup_figure

    sg = ev.get("subgroups") or {}
    rep.section(
        f"{prefix}Subgroups (fairness)",
        f"{sg.get('metric')} per group of every metadata column, with 95% bootstrap CIs; the largest gap is taken "
        f"between groups of at least {sg.get('min_size')} cases, with its own bootstrap CI. "
        + str(sg.get("note", "")),
    )
    for col, a in (sg.get("columns") or {}).items():
        rows = [
            {"group": g.get("group"), "n": g.get("n"), sg.get("metric", "metric"):
             ci_text({"estimate": g.get("estimate"), **_lohi(g.get("ci"))}),
             "note": "too small to compare" if g.get("too_small") else ""}
            for g in a.get("groups", [])
        ]  # fmt: skip
        gap = a.get("gap")
        cap = (
            f"largest gap {gap_text(gap)}"
            if gap
            else str(a.get("reason") or "no gap: fewer than two groups large enough")
        )
        rep.table(
            f"By {col}", rows, caption=cap + ("; " + "; ".join(a["warnings"]) if a.get("warnings") else "")
        )
        if len(a.get("groups", [])) > 1:
            rep.figure(None, subgroup_figure(a))


def _lohi(ci: Any) -> dict[str, Any]:
    if isinstance(ci, Mapping):
        return {"low": ci.get("low"), "high": ci.get("high")}
    if isinstance(ci, list | tuple) and len(ci) == 2:
        return {"low": ci[0], "high": ci[1]}
    return {"low": None, "high": None}


def shift(rep: Any, ev: Mapping[str, Any], prefix: str) -> None:
    sh = ev.get("shift") or {}
    text = (
        f"Sites seen in training: {', '.join(sh.get('training_sites', [])) or 'none recorded'}; evaluated: "
        f"{', '.join(sh.get('evaluated_sites', [])) or 'none recorded'}. " + str(sh.get("note", ""))
    )
    rep.section(f"{prefix}Domain shift", text)
    per_site = sh.get("per_site") or {}
    if per_site.get("groups"):
        rep.table(
            "Per site",
            [{"site": g.get("group"), "n": g.get("n"), "seen in training": g.get("group") in sh.get("training_sites", []),
              sh.get("metric", "metric"): ci_text({"estimate": g.get("estimate"), **_lohi(g.get("ci"))})}
             for g in per_site["groups"]],
        )  # fmt: skip
    if sh.get("held_out"):
        held, seen = sh["held_out"], sh.get("seen") or {}
        rep.key_values(
            "Held-out site(s) vs seen sites",
            {"held-out": f"{ci_text({'estimate': held['estimate'], **_lohi(held.get('ci'))})} (n={held['n']})",
             "seen": f"{ci_text({'estimate': seen.get('estimate'), **_lohi(seen.get('ci'))})} (n={seen.get('n')})",
             "gap": gap_text(sh["gap"]) if sh.get("gap") else "–"},
        )  # fmt: skip


# ---- robustness, explanations, uncertainty -------------------------------------------------------------------
def robustness(rep: Any, ev: Mapping[str, Any], prefix: str) -> None:
    from medlens.report.trust_figures import robustness_figure

    rob = ev.get("robustness") or {}
    curves = rob.get("curves") or {}
    rep.section(
        f"{prefix}Robustness",
        f"The metric on {rob.get('n_cases')} cases under perturbations of stated strength (0 = clean), with 95% "
        "bootstrap CIs. Noise, blur, contrast and bias field act on the input image; FGSM and PGD are "
        "adversarial (L-infinity, in the network's normalised intensity units).",
    )
    rows = []
    for kind, c in curves.items():
        cis = c.get("ci") or [[None, None]] * len(c["metric"])
        for strength, value, ci in zip(c["strengths"], c["metric"], cis, strict=True):
            rows.append(
                {"perturbation": kind, "strength": strength, "unit": c.get("unit", ""),
                 c.get("metric_name", "metric"): ci_text({"estimate": value, **_lohi(ci)})}
            )  # fmt: skip
    rep.figure("Metric under perturbation", robustness_figure(curves))
    rep.table("Values", rows)


def explanations(rep: Any, ev: Mapping[str, Any], pictures: Any, prefix: str) -> None:
    from medlens.report.explain_figures import explanation_figure

    ex = ev.get("explanations") or {}
    rep.section(
        f"{prefix}Explanations",
        "Grad-CAM, occlusion sensitivity and integrated gradients of fold 0's network on the worst and chosen "
        "cases, overlaid on the input the network sees (after preprocessing). Sanity check (Adebayo et al. "
        "2018): each method's map is recomputed with the network's weights randomised; a method whose maps stay "
        "similar (high Spearman rank correlation) does not explain the trained model and is flagged.",
    )
    rep.table(
        "Model-randomisation sanity check",
        [{"method": m, "Spearman (trained vs randomised)": c.get("spearman"), "threshold": c.get("threshold"),
          "result": sanity_verdict(c), "note": c.get("note", "")}
         for m, c in (ex.get("sanity") or {}).items()],
    )  # fmt: skip
    for case in ex.get("cases", []):
        cid = case["id"]
        maps = {
            m: pictures[f"{cid}/explain/{m}"] for m in case["methods"] if f"{cid}/explain/{m}" in pictures
        }
        if maps and f"{cid}/explain/image" in pictures:
            rep.figure(f"Explanations: {cid}", explanation_figure(pictures[f"{cid}/explain/image"], maps, title=cid, checks=ex.get("sanity")),
                       caption=f"explained class index {case.get('target')}")  # fmt: skip


def uncertainty(rep: Any, ev: Mapping[str, Any], pictures: Any, prefix: str) -> None:
    from medlens.report.trust_figures import deferral_figure

    un = ev.get("uncertainty") or {}
    curve = un.get("curve") or {}
    referral = un.get("referral") or {}
    rep.section(
        f"{prefix}Uncertainty and deferral",
        f"Per-case uncertainty: {un.get('score_name', '?')} ({un.get('method', '?')}). The deferral curve shows "
        f"the metric ({un.get('performance')}) on the cases the model keeps when the most uncertain fraction is "
        "referred to an expert, against random referral and the oracle.",
    )
    rep.key_values(
        None,
        {"area under the deferral curve": _f(curve.get("auc")), "random referral": _f(curve.get("auc_random")),
         "oracle": _f(curve.get("auc_oracle")),
         "referral threshold (run.json)": (f"{_f(referral.get('threshold'))} ({referral.get('reason', '')})"
                                           if referral else "not decided: run 'medlens evaluate' decides it"),
         "referred here": (f"{un['referred']['n']} of {un['referred']['of']}" if un.get("referred") else "–")},
    )  # fmt: skip
    if curve:
        rep.figure("Deferral curve", deferral_figure(curve))
    if ev["task"] == "segmentation":
        for cid in ev.get("worst_cases", [])[:2]:
            if f"{cid}/uncertainty" in pictures:
                rep.figure(f"Uncertainty map: {cid}", _uncertainty_figure(pictures, cid),
                           caption="voxel-wise predictive entropy, slice with most reference")  # fmt: skip


def _uncertainty_figure(pictures: Any, cid: str) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(5.2, 2.6), dpi=100)
    axes[0].imshow(np.asarray(pictures[f"{cid}/image"]).T, cmap="gray", origin="lower")
    axes[0].set_title("image", fontsize=8)
    im = axes[1].imshow(np.asarray(pictures[f"{cid}/uncertainty"]).T, cmap="magma", origin="lower")
    axes[1].set_title("uncertainty", fontsize=8)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


# ---- how the model was made ----------------------------------------------------------------------------------
def how_made(rep: Any, run_dir: Path, info: Mapping[str, Any], prefix: str) -> None:
    from medlens.report.figures import training_curve_figure

    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else {}
    rep.section(
        f"{prefix}How the model was made",
        f"Configuration {info.get('configuration')}, folds {info.get('folds')}; the plan's decisions and each "
        "fold's training curve.",
    )
    for fold in info.get("folds", []):
        hist = run_dir / f"fold_{fold}" / "history.json"
        if hist.is_file():
            rep.figure(f"Training, fold {fold}", training_curve_figure(json.loads(hist.read_text())))
    reasons = plan.get("reasons") or []
    if reasons:
        rep.table("Plan", [{"decision": r} for r in reasons])
    extra = [*info.get("postprocessing_reasons", []), *(info.get("decision") or {}).get("reasons", [])]
    if extra:
        rep.table("Decisions taken on validation", [{"decision": r} for r in extra])
