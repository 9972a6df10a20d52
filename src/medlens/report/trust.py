"""``medlens report RUN``: the trust report, one self-contained HTML file a clinician can read.

Reads what ``medlens evaluate`` wrote (``RUN/evaluation/evaluation.json`` and ``pictures.npz``) and the run
itself (``run.json``, ``plan.json``, each fold's ``history.json``), and lays out: the evidence at a glance;
metrics with bootstrap CIs (ROC, precision-recall, confusion matrix at the stored threshold for classifiers);
the per-case table with the worst cases as pictures; calibration; subgroups; domain shift; robustness;
explanations with their sanity check; uncertainty and deferral; how the model was made (training curves, the
plan's choices). The model card (:mod:`medlens.report.model_card`) is written beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import RunError


def load_evaluation(run_dir: Path, evaluation_dir: Path | None = None) -> tuple[dict[str, Any], Any]:
    """``evaluation.json`` and the pictures of a run, with a clear error when ``evaluate`` was not run."""
    folder = evaluation_dir or run_dir / "evaluation"
    path = folder / "evaluation.json"
    if not path.is_file():
        raise RunError(
            f"{run_dir}: has no evaluation ({path} is missing); run 'medlens evaluate {run_dir} --data DATASET' "
            "first"
        )
    evaluation = json.loads(path.read_text())
    pictures = np.load(folder / "pictures.npz") if (folder / "pictures.npz").is_file() else {}
    return evaluation, pictures


def build_report(
    run_dir: str | Path, *, evaluation_dir: str | Path | None = None, out: str | Path | None = None
) -> Path:
    """Write the trust report of an evaluated run (default ``RUN/report.html``) and its model card.

    Raises:
        RunError: the run has not been evaluated.
    """
    from medlens.report.html import Report
    from medlens.report.model_card import write_model_card

    run_dir = Path(run_dir)
    ev, pictures = load_evaluation(run_dir, None if evaluation_dir is None else Path(evaluation_dir))
    rep = Report(
        f"medlens trust report: {ev['run_name']} ({ev['task']})",
        subtitle=f"dataset {ev['dataset']['name']}, {ev['n_cases']} {ev['split']} cases",
    )
    add_trust_sections(rep, run_dir, ev, pictures)
    path = rep.write(Path(out) if out is not None else run_dir / "report.html")
    write_model_card(run_dir, ev)
    return path


def add_trust_sections(
    rep: Any, run_dir: Path, ev: Mapping[str, Any], pictures: Any, prefix: str = ""
) -> Any:
    """Add every section of the trust report of one evaluated run to ``rep`` (the demo puts two runs in one
    report, so section titles take a ``prefix``)."""
    from medlens.report import trust_sections as s

    info = json.loads((run_dir / "run.json").read_text())
    s.at_a_glance(rep, ev, prefix)
    s.performance(rep, ev, pictures, prefix)
    s.calibration(rep, ev, prefix)
    s.subgroups(rep, ev, prefix)
    s.shift(rep, ev, prefix)
    s.robustness(rep, ev, prefix)
    s.explanations(rep, ev, pictures, prefix)
    s.uncertainty(rep, ev, pictures, prefix)
    s.how_made(rep, run_dir, info, prefix)
    return rep
