"""The trust report and model card of evaluated runs: every section present, numbers taken from the evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medlens.errors import RunError
from medlens.report.trust import build_report

SECTIONS = (
    "At a glance",
    "Performance",
    "Calibration",
    "Subgroups (fairness)",
    "Domain shift",
    "Robustness",
    "Explanations",
    "Uncertainty and deferral",
    "How the model was made",
)


@pytest.mark.parametrize("which", ["seg_evaluated", "cls_evaluated"])
def test_report_has_every_section_and_the_evaluations_numbers(which: str, request: Any) -> None:
    _, run, path = request.getfixturevalue(which)
    html_path = build_report(run)
    html = html_path.read_text()
    for title in SECTIONS:
        assert f">{title}<" in html, title
    assert html.count("<img") >= 8 and "http://" not in html.replace("http://www.w3.org", "")
    ev = json.loads(Path(path).read_text())
    ece = ev["calibration"]["before"]["ece"]
    assert f"{ece:.3f}" in html
    assert html_path.stat().st_size < 10 * 2**20
    card = json.loads((run / "model_card.json").read_text())
    assert card["evaluation"]["n_cases"] == ev["n_cases"]
    assert set(card["evaluation"]["explanation_sanity"]) == set(ev["explanations"]["sanity"])
    md = (run / "model_card.md").read_text()
    for heading in (
        "## Intended use",
        "## Data",
        "## Plan",
        "## Evaluation",
        "## Known limitations",
        "## Versions",
    ):
        assert heading in md


def test_report_of_an_unevaluated_run_says_what_to_run(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(RunError, match="medlens evaluate"):
        build_report(tmp_path)
