"""Summaries per class, over classes and per group; the metrics JSON + CSV files."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.evaluate import case_record, load_metrics, summarise, write_metrics


def records() -> list[dict]:
    """Six cases, two sites with clearly different Dice, one missing distance (empty prediction at site B)."""
    rows = [
        ("a1", "A", "F", 61, 0.90, 0.80, 2.0),
        ("a2", "A", "M", 45, 0.92, 0.84, 3.0),
        ("a3", "A", "F", 70, 0.94, 0.88, 4.0),
        ("b1", "B", "M", 52, 0.60, 0.50, 6.0),
        ("b2", "B", "F", 38, 0.70, 0.00, math.nan),
        ("b3", "B", "M", 66, 0.65, 0.60, 8.0),
    ]
    return [
        case_record(
            cid,
            {"liver": {"dice": d1, "hd95": 1.0}, "tumour": {"dice": d2, "hd95": hd}},
            site=site,
            meta={"sex": sex, "age": age},
        )
        for cid, site, sex, age, d1, d2, hd in rows
    ]


def test_means_and_intervals_per_class_and_over_classes() -> None:
    s = summarise(records(), seed=1)
    assert s["n_cases"] == 6 and s["classes"] == ["liver", "tumour"] and s["metrics"] == ["dice", "hd95"]
    liver = s["per_class"]["liver"]["dice"]
    assert liver["mean"] == pytest.approx(np.mean([0.90, 0.92, 0.94, 0.60, 0.70, 0.65]))
    assert 0.60 <= liver["low"] < liver["mean"] < liver["high"] <= 0.94
    assert liver["n"] == 6 and liver["n_missing"] == 0
    hd = s["per_class"]["tumour"]["hd95"]
    assert hd["n"] == 5 and hd["n_missing"] == 1
    assert hd["mean"] == pytest.approx(np.mean([2.0, 3.0, 4.0, 6.0, 8.0]))
    fg = s["foreground_mean"]
    case_means = [(0.90 + 0.80) / 2, (0.92 + 0.84) / 2, (0.94 + 0.88) / 2, 0.55, 0.35, 0.625]
    assert fg["dice"]["mean"] == pytest.approx(np.mean(case_means))
    # b2's foreground hd95 is its liver value alone; the case counts as having a missing class.
    assert fg["hd95"]["mean"] == pytest.approx(np.mean([1.5, 2.0, 2.5, 3.5, 1.0, 4.5]))
    assert fg["hd95"]["n_missing"] == 1
    assert "defined" in s["missing_rule"]
    json.dumps(s, allow_nan=False)  # JSON-able as is


def test_per_site_and_metadata_tables() -> None:
    s = summarise(records())
    assert list(s["groups"]) == ["site", "sex"]  # age is numeric with many levels: not a grouping column
    site = s["groups"]["site"]
    assert site["A"]["n_cases"] == 3 and site["B"]["n_cases"] == 3
    a, b = site["A"]["per_class"]["liver"]["dice"], site["B"]["per_class"]["liver"]["dice"]
    assert a["mean"] == pytest.approx(0.92) and b["mean"] == pytest.approx(0.65)
    assert b["high"] < a["low"]  # the site gap is resolved by the intervals
    assert site["B"]["per_class"]["tumour"]["hd95"]["n_missing"] == 1
    assert s["groups"]["sex"]["F"]["n_cases"] == 3
    by_age = summarise(records(), group_by=["age"])
    assert len(by_age["groups"]["age"]) == 6


def test_missing_site_goes_to_unknown() -> None:
    recs = records()
    recs[0]["site"] = None
    s = summarise(recs, group_by=["site"])
    assert s["groups"]["site"]["unknown"]["n_cases"] == 1


def test_worst_case_substitution() -> None:
    s = summarise(records(), worst_case={"hd95": 100.0})
    hd = s["per_class"]["tumour"]["hd95"]
    assert hd["mean"] == pytest.approx(np.mean([2.0, 3.0, 4.0, 6.0, 100.0, 8.0]))
    assert hd["n"] == 6 and hd["n_missing"] == 1
    assert "worst case" in s["missing_rule"] and "hd95 = 100" in s["missing_rule"]
    with pytest.raises(InputError, match="no case reports"):
        summarise(records(), worst_case={"hd59": 1.0})


def test_deterministic_per_seed() -> None:
    assert summarise(records(), seed=3) == summarise(records(), seed=3)
    assert summarise(records(), seed=3) != summarise(records(), seed=4)


@pytest.mark.parametrize(
    ("per_case", "match"),
    [
        ([], "non-empty list"),
        ([{"metrics": {}}], "'id' and 'metrics'"),
        ([{"id": "x", "metrics": {}}, {"id": "x", "metrics": {}}], "appears twice"),
        ([{"id": "x", "metrics": {}, "sex": "F"}], "under 'meta'"),
        ([{"id": "x", "metrics": {"c": {"dice": "high"}}}], "not a number"),
    ],
)
def test_bad_records(per_case, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=match):
        summarise(per_case)


def test_unknown_group_column() -> None:
    with pytest.raises(InputError, match="cannot group by 'scanner'"):
        summarise(records(), group_by=["scanner"])


def test_write_metrics_json_and_csv_round_trip(tmp_path: Path) -> None:
    recs = records()
    s = summarise(recs, n_resamples=200)
    json_path, csv_path = write_metrics(tmp_path / "metrics.json", recs, s)
    assert csv_path == tmp_path / "metrics.csv"
    raw = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert raw["per_case"][4]["metrics"]["tumour"]["hd95"] is None
    assert raw["summary"]["per_class"]["liver"]["dice"]["mean"] == pytest.approx(
        s["per_class"]["liver"]["dice"]["mean"]
    )
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["a1", "a2", "a3", "b1", "b2", "b3"]
    assert list(rows[0]) == [
        "id",
        "site",
        "sex",
        "age",
        "liver/dice",
        "liver/hd95",
        "tumour/dice",
        "tumour/hd95",
    ]
    assert float(rows[3]["tumour/dice"]) == 0.5 and rows[4]["tumour/hd95"] == "" and rows[4]["site"] == "B"
    per_case, summary = load_metrics(json_path)
    assert math.isnan(per_case[4]["metrics"]["tumour"]["hd95"])
    assert per_case[0]["metrics"]["liver"]["dice"] == 0.90 and summary == raw["summary"]


def test_write_metrics_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = records()
    s = summarise(recs, n_resamples=100)
    path = tmp_path / "metrics.json"
    write_metrics(path, recs, s)
    before = path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    recs[0]["metrics"]["liver"]["dice"] = 0.0
    with pytest.raises(OSError, match="disk full"):
        write_metrics(path, recs, s)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.csv",
        "metrics.json",
    ]  # no temporaries left


def test_write_and_load_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"ending in \.json"):
        write_metrics(tmp_path / "metrics.csv", records(), {})
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read metrics JSON"):
        load_metrics(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[]")
    with pytest.raises(InputError, match="not a medlens metrics file"):
        load_metrics(tmp_path / "y.json")
