"""The model card of a run (``RUN/model_card.md`` and ``RUN/model_card.json``), after Mitchell et al. 2019.

Intended use, the data and its sites, the plan, metrics with CIs, calibration, subgroup gaps, robustness,
uncertainty, known limitations (derived from the evidence, not written by hand) and the software versions. The
JSON holds the same fields for machines (the service's model-card endpoint serves it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

INTENDED_USE = (
    "Research use: {task} of {modality} images like those of dataset '{dataset}' ({channels}). Not a medical "
    "device; not validated for clinical decisions. A prediction is a second opinion for a trained reader, who "
    "should review every case the model flags for referral."
)


def model_card(run_dir: str | Path, evaluation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model card of a run as a dict (evaluation: the run's ``evaluation.json``, if evaluated)."""
    from medlens.report.trust_sections import findings, headline, sanity_verdict

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else {}
    ds = info.get("dataset", {})
    config = (plan.get("configurations") or {}).get(info.get("configuration"), {})
    modalities = sorted(set((ds.get("modalities") or {}).values())) or ["unspecified"]
    card: dict[str, Any] = {
        "model": run_dir.resolve().name,
        "task": info.get("task"),
        "intended_use": INTENDED_USE.format(
            task=info.get("task"),
            modality="/".join(modalities),
            dataset=ds.get("name"),
            channels=", ".join(map(str, (ds.get("channels") or {}).values())) or "one channel",
        ),
        "classes": ds.get("labels"),
        "data": _data(info),
        "plan": {
            "configuration": info.get("configuration"),
            "network": config.get("network"),
            "input": config.get("patch_size") or config.get("input_size"),
            "spacing": (config.get("preprocessing") or {}).get("spacing"),
            "budget": (config.get("training") or {}).get("time_limit_seconds"),
            "folds_trained": info.get("folds"),
            "decisions": plan.get("reasons", []),
        },
        "training": info.get("fold_results"),
        "decision": info.get("decision"),
        "referral": info.get("referral"),
        "versions": _versions(run_dir, info),
    }
    if evaluation is None:
        card["evaluation"] = None
        card["limitations"] = [
            "Not evaluated: run 'medlens evaluate' to add metrics, calibration and subgroups."
        ]
        return card
    name, value = headline(evaluation)
    cal = evaluation.get("calibration") or {}
    card["evaluation"] = {
        "dataset": evaluation["dataset"]["name"],
        "split": evaluation["split"],
        "n_cases": evaluation["n_cases"],
        "headline": {name: value},
        "metrics": _metrics(evaluation),
        "calibration": {
            "ece_before": (cal.get("before") or {}).get("ece"),
            "ece_after_temperature": (cal.get("after") or {}).get("ece"),
            "temperature": cal.get("temperature"),
            "binning": f"{(cal.get('before') or {}).get('n_bins')} {(cal.get('before') or {}).get('strategy')} bins",
        },
        "subgroup_gaps": {
            col: a.get("gap") or {"reason": a.get("reason")}
            for col, a in ((evaluation.get("subgroups") or {}).get("columns") or {}).items()
        },
        "held_out_sites": (evaluation.get("shift") or {}).get("held_out_sites", []),
        "robustness": {
            kind: dict(zip(map(str, c["strengths"]), c["metric"], strict=True))
            for kind, c in ((evaluation.get("robustness") or {}).get("curves") or {}).items()
        },
        "explanation_sanity": {
            m: sanity_verdict(c)
            for m, c in ((evaluation.get("explanations") or {}).get("sanity") or {}).items()
        },
        "deferral": (evaluation.get("uncertainty") or {}).get("curve", {}).get("auc"),
    }
    card["limitations"] = [*findings(evaluation), *_standing_limits(info)]
    return card


def write_model_card(run_dir: str | Path, evaluation: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``model_card.json`` and ``model_card.md`` into the run (atomically); returns both paths."""
    from medlens._fs import atomic_path, atomic_write_json

    run_dir = Path(run_dir)
    card = model_card(run_dir, evaluation)
    js = run_dir / "model_card.json"
    atomic_write_json(js, card)
    md = run_dir / "model_card.md"
    with atomic_path(md) as tmp:
        Path(tmp).write_text(to_markdown(card))
    return md, js


def to_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown, section by section."""
    lines = [f"# Model card: {card['model']}", "", f"Task: {card['task']}", "", "## Intended use", "",
             card["intended_use"], "", "## Data", ""]  # fmt: skip
    data = card["data"]
    lines += [f"- {k}: {v}" for k, v in data.items()]
    lines += ["", "## Plan", ""]
    plan = card["plan"]
    lines += [
        f"- {k}: {json.dumps(v) if isinstance(v, dict | list) else v}"
        for k, v in plan.items()
        if k != "decisions"
    ]
    lines += [f"  - {r}" for r in plan.get("decisions", [])]
    ev = card.get("evaluation")
    lines += ["", "## Evaluation", ""]
    if ev is None:
        lines.append("Not evaluated.")
    else:
        lines.append(f"{ev['n_cases']} {ev['split']} cases of {ev['dataset']}.")
        lines += ["", "| metric | value [95% CI] |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in ev["metrics"].items()]
        cal = ev["calibration"]
        lines += ["", "### Calibration", "", f"ECE {cal['ece_before']} before, {cal['ece_after_temperature']} after "
                  f"temperature scaling (T={cal['temperature']}; {cal['binning']})."]  # fmt: skip
        lines += ["", "### Subgroup gaps", ""]
        lines += [f"- {col}: {json.dumps(g)}" for col, g in ev["subgroup_gaps"].items()] or ["- none"]
        lines += ["", "### Robustness", ""]
        lines += [f"- {k}: {json.dumps(v)}" for k, v in ev["robustness"].items()]
        lines += ["", "### Explanations (model-randomisation check)", ""]
        lines += [f"- {k}: {v}" for k, v in ev["explanation_sanity"].items()]
        lines += ["", f"Deferral: area under the kept-metric curve {ev['deferral']}."]
    lines += ["", "## Known limitations", ""] + [f"- {t}" for t in card["limitations"]]
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in (card.get("versions") or {}).items()]
    return "\n".join(lines) + "\n"


def _data(info: Mapping[str, Any]) -> dict[str, Any]:
    splits = info.get("splits") or {}
    folds = splits.get("folds") or []
    trained = sorted({c for f in info.get("folds", []) for c in folds[int(f)]["train"]}) if folds else []
    return {
        "dataset": (info.get("dataset") or {}).get("name"),
        "training cases": len(trained),
        "test cases": len(splits.get("test") or []),
        "folds": splits.get("n_folds"),
        "split stratified by": splits.get("stratified_by"),
        "dimensionality": (info.get("dataset") or {}).get("ndim"),
    }


def _metrics(evaluation: Mapping[str, Any]) -> dict[str, str]:
    from medlens.report.classification import ci_text
    from medlens.report.trust_sections import _ci_from_summary

    m = evaluation["metrics"]
    if evaluation["task"] == "segmentation":
        fg = m.get("foreground_mean") or {}
        return {k: ci_text(_ci_from_summary(v)) for k, v in fg.items() if isinstance(v, Mapping)}
    return {k: ci_text(v) for k, v in (m.get("overall") or {}).items() if isinstance(v, Mapping)}


def _standing_limits(info: Mapping[str, Any]) -> list[str]:
    out = []
    if len(info.get("folds", [])) < 2:
        out.append(
            "One fold trained: no deep ensemble; uncertainty comes from MC-dropout or test-time augmentation."
        )
    name = str((info.get("dataset") or {}).get("name", ""))
    if name in ("brain-tissue", "brain-lesion"):
        out.append(
            f"Trained on the simulated sample dataset '{name}': not evidence of performance on patients."
        )
    return out


def _versions(run_dir: Path, info: Mapping[str, Any]) -> dict[str, Any]:
    for fold in info.get("folds", []):
        path = run_dir / f"fold_{fold}" / "versions.json"
        if path.is_file():
            return dict(json.loads(path.read_text()))
    return {"medlens": info.get("medlens_version")}
