"""Subgroups: a constructed known gap, too-small and single groups, gap CI coverage, age bands."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.evaluate.subgroups import age_bands, auc_metric, subgroup_analysis


def _known_gap(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Site A: 180 of 200 right (0.9); site B: 120 of 200 (0.6); site C: 3 cases, all right."""
    rng = np.random.default_rng(seed)
    a = rng.permutation(np.r_[np.ones(180), np.zeros(20)])
    b = rng.permutation(np.r_[np.ones(120), np.zeros(80)])
    correct = np.r_[a, b, np.ones(3)]
    sites = ["A"] * 200 + ["B"] * 200 + ["C"] * 3
    order = rng.permutation(correct.size)  # interleave the cases: groups are found by value, not position
    return correct[order], [sites[i] for i in order]


def test_known_gap_is_found_with_a_ci_that_contains_it() -> None:
    correct, sites = _known_gap()
    r = subgroup_analysis(correct, len(sites), sites, "site", min_size=5, seed=0, metric_name="accuracy")
    by = {g["group"]: g for g in r["groups"]}
    assert [g["group"] for g in r["groups"]] == ["A", "B", "C"]
    assert by["A"]["estimate"] == pytest.approx(0.9) and by["B"]["estimate"] == pytest.approx(0.6)
    assert by["A"]["n"] == 200 and by["A"]["too_small"] is False
    assert by["A"]["ci"][0] < 0.9 < by["A"]["ci"][1]
    gap = r["gap"]
    assert (gap["high_group"], gap["low_group"]) == ("A", "B")  # C (1.0) is too small to count
    assert gap["estimate"] == pytest.approx(0.3)
    low, high = gap["ci"]
    assert low < 0.3 < high and low > 0 and gap["excludes_zero"]
    # Independent check of the width: normal approximation of a difference of two proportions.
    se = math.sqrt(0.9 * 0.1 / 200 + 0.6 * 0.4 / 200)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert by["C"]["too_small"] and by["C"]["ci"] is None and by["C"]["estimate"] == 1.0
    assert any("'C'" in w and "fewer than 5" in w for w in r["warnings"])
    assert r["overall"]["n"] == 403 and r["overall"]["estimate"] == pytest.approx(correct.mean())
    assert r["reason"] is None


def test_a_function_of_indices_gives_the_same_answer_and_may_be_undefined() -> None:
    correct, sites = _known_gap()
    by_values = subgroup_analysis(correct, len(sites), sites, "site", n_resamples=500)
    by_function = subgroup_analysis(
        lambda idx: float(correct[idx].mean()), len(sites), sites, "site", n_resamples=500
    )
    assert by_function["gap"] == by_values["gap"]
    assert by_function["groups"] == by_values["groups"]
    # A metric that is undefined on a whole group (an AUC without positives) is left out of the gap.
    groups = ["X"] * 30 + ["Y"] * 30 + ["Z"] * 30
    score = np.random.default_rng(0).uniform(size=90)
    target = np.r_[np.arange(30) % 2, np.zeros(30), np.arange(30) % 3 == 0].astype(int)

    def auc(idx: np.ndarray) -> float:  # Mann-Whitney AUC, NaN without positives or negatives
        t, s = target[idx], score[idx]
        pos, neg = s[t == 1], s[t == 0]
        return float(np.mean(pos[:, None] > neg[None, :])) if pos.size and neg.size else math.nan

    r = subgroup_analysis(auc, 90, groups, "site", n_resamples=100)
    assert {g["group"]: g["estimate"] for g in r["groups"]}["Y"] is None
    assert {r["gap"]["high_group"], r["gap"]["low_group"]} == {"X", "Z"} and any(
        "undefined" in w for w in r["warnings"]
    )


def test_single_group_and_all_too_small_are_reported_not_gapped() -> None:
    values = np.linspace(0, 1, 12)
    one = subgroup_analysis(values, 12, ["F"] * 12, "sex")
    assert one["gap"] is None and "single group" in one["reason"] and "'F'" in one["reason"]
    assert len(one["groups"]) == 1 and one["groups"][0]["ci"] is not None
    small = subgroup_analysis(values, 12, ["a", "b", "c", "d"] * 3, "scanner", min_size=5)
    assert small["gap"] is None and "fewer than two groups" in small["reason"]
    assert all(g["too_small"] for g in small["groups"]) and len(small["warnings"]) == 4


def test_missing_values_form_their_own_group_outside_the_gap() -> None:
    values = np.r_[np.ones(10), np.zeros(10), np.full(10, 0.5)]
    groups = ["M"] * 10 + ["F"] * 10 + [None] * 5 + [math.nan] * 5
    r = subgroup_analysis(values, 30, groups, "sex")
    assert [g["group"] for g in r["groups"]] == ["F", "M", "missing"]
    assert (r["gap"]["high_group"], r["gap"]["low_group"]) == ("M", "F")
    assert r["gap"]["estimate"] == pytest.approx(1.0)
    assert any("no value" in w for w in r["warnings"])


def test_deterministic_by_seed_and_bad_input() -> None:
    correct, sites = _known_gap()
    a = subgroup_analysis(correct, len(sites), sites, "site", seed=3, n_resamples=300)
    assert a == subgroup_analysis(correct, len(sites), sites, "site", seed=3, n_resamples=300)
    assert (
        a["gap"]["ci"]
        != subgroup_analysis(correct, len(sites), sites, "site", seed=4, n_resamples=300)["gap"]["ci"]
    )
    with pytest.raises(InputError, match="403 cases"):
        subgroup_analysis(correct, 403, sites[:-1], "site")
    with pytest.raises(InputError, match="one value per case"):
        subgroup_analysis(correct[:-1], 403, sites, "site")
    with pytest.raises(InputError, match="min_size"):
        subgroup_analysis(correct, 403, sites, "site", min_size=1)


def test_gap_ci_covers_the_true_gap_at_about_the_nominal_rate() -> None:
    # 200 repetitions: two groups of 50 normal draws (means 0.8 and 0.7, sd 0.1): the 95% gap CI must cover
    # the true gap 0.1 in about 95% of them. (The single-group CI coverage is tested in test_eval_bootstrap.)
    rng = np.random.default_rng(11)
    groups = ["a"] * 50 + ["b"] * 50
    hits = 0
    for rep in range(200):
        values = np.r_[rng.normal(0.8, 0.1, 50), rng.normal(0.7, 0.1, 50)]
        gap = subgroup_analysis(values, 100, groups, "g", n_resamples=500, seed=rep)["gap"]
        sign = 1 if gap["high_group"] == "a" else -1
        low, high = sorted(sign * np.asarray(gap["ci"]))
        hits += low <= 0.1 <= high
    assert 0.90 <= hits / 200 <= 0.99


def test_age_bands() -> None:
    assert age_bands([3, 19.9, 20, 85, None, math.nan, "45", ""]) == [
        "0-19",
        "0-19",
        "20-39",
        "80-99",
        "missing",
        "missing",
        "40-59",
        "missing",
    ]
    assert age_bands([34, 35], width=5) == ["30-34", "35-39"]
    with pytest.raises(InputError, match="'old' is not a number"):
        age_bands([40, "old"])
    with pytest.raises(InputError, match="width"):
        age_bands([40], width=0)
    # Bands sort numerically in an analysis, not as text.
    r = subgroup_analysis(np.ones(30), 30, age_bands([5] * 10 + [105] * 10 + [25] * 10), "age")
    assert [g["group"] for g in r["groups"]] == ["0-19", "20-39", "100-119"]


def test_fast_auc_metric_matches_sklearn_with_ties_and_repeats() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=80)
    score = np.round(rng.uniform(size=80) + 0.3 * y, 1)  # rounded: many ties
    auc = auc_metric(y, score)
    for idx in (np.arange(80), rng.integers(0, 80, size=80), np.arange(0, 80, 3)):
        assert auc(idx) == pytest.approx(roc_auc_score(y[idx], score[idx]))
    assert math.isnan(auc(np.flatnonzero(y == 1)))
    with pytest.raises(InputError, match="one score per case"):
        auc_metric(y, score[:-1])
