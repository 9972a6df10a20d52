"""Bootstrap CIs: coverage on a known distribution, width shrinking with n, determinism, paired vs unpaired."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.evaluate import CI, bootstrap_ci, group_gap_ci, paired_difference_ci
from medlens.evaluate import bootstrap as bootstrap_module


def test_ci_contains_the_true_mean_at_about_the_nominal_rate() -> None:
    # 150 independent samples of 40 cases from a skewed distribution with a known mean (gamma(2, 1.5): 3.0).
    rng = np.random.default_rng(1)
    hits = 0
    trials = 150
    for t in range(trials):
        ci = bootstrap_ci(rng.gamma(2.0, 1.5, size=40), n_resamples=1000, seed=t)
        hits += ci.low <= 3.0 <= ci.high
        assert ci.low <= ci.estimate <= ci.high
    # Percentile bootstrap under-covers slightly at n=40 for a skewed law; 95% nominal -> expect ~0.90-0.96.
    assert 0.85 <= hits / trials <= 0.99
    # A 50% interval must miss about half the time (so the 95% one is not just trivially wide).
    rng = np.random.default_rng(2)
    half = [
        bootstrap_ci(rng.gamma(2.0, 1.5, size=40), confidence=0.5, n_resamples=1000, seed=t)
        for t in range(150)
    ]
    assert 0.3 <= np.mean([c.low <= 3.0 <= c.high for c in half]) <= 0.7


def test_interval_narrows_like_one_over_root_n() -> None:
    rng = np.random.default_rng(0)
    small = bootstrap_ci(rng.normal(0.8, 0.1, size=25))
    large = bootstrap_ci(rng.normal(0.8, 0.1, size=400))
    ratio = (small.high - small.low) / (large.high - large.low)
    assert 2.5 < ratio < 6.0  # sqrt(400 / 25) = 4
    assert large.n == 400 and small.n == 25
    assert large.low < 0.8 < large.high


def test_deterministic_per_seed() -> None:
    x = np.random.default_rng(5).random(30)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    assert bootstrap_ci(x, seed=3).estimate == pytest.approx(float(np.mean(x)))


def test_nan_values_are_dropped_and_counted() -> None:
    ci = bootstrap_ci([1.0, 2.0, math.nan, 3.0])
    assert ci.n == 3 and ci.estimate == pytest.approx(2.0)
    assert 1.0 <= ci.low <= ci.high <= 3.0
    assert ci.to_dict()["n"] == 3 and isinstance(str(ci), str)


def test_statistic_without_axis_gives_the_same_interval() -> None:
    x = np.random.default_rng(2).normal(size=25)
    vectorised = bootstrap_ci(x, statistic=np.nanmedian, n_resamples=300)
    row_by_row = bootstrap_ci(x, statistic=lambda v: float(np.median(v)), n_resamples=300)
    assert vectorised == row_by_row


def test_chunking_keeps_a_valid_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(9).normal(1.0, 0.2, size=50)
    whole = bootstrap_ci(x)
    monkeypatch.setattr(bootstrap_module, "_CHUNK_VALUES", 500)  # 10 resamples per chunk
    chunked = bootstrap_ci(x)
    assert chunked.estimate == whole.estimate
    assert chunked.low == pytest.approx(whole.low, abs=0.02)
    assert chunked.high == pytest.approx(whole.high, abs=0.02)


def test_paired_difference_is_much_tighter_than_the_unpaired_gap() -> None:
    # Two models on the same 30 cases: large between-case spread, a small consistent improvement of 0.02.
    rng = np.random.default_rng(4)
    base = rng.uniform(0.5, 0.95, size=30)
    a = base + 0.02 + rng.normal(0, 0.005, size=30)
    paired = paired_difference_ci(a, base)
    unpaired = group_gap_ci(a, base)
    assert paired.estimate == pytest.approx(unpaired.estimate)
    assert paired.low > 0.0  # the improvement is detected
    assert unpaired.low < 0.0 < unpaired.high  # ... and would be missed by ignoring the pairing
    assert 0.015 < paired.estimate < 0.025
    assert (paired.high - paired.low) < 0.2 * (unpaired.high - unpaired.low)
    assert paired.n == 30 and unpaired.n == 60


def test_paired_drops_incomplete_pairs() -> None:
    a = [1.0, 2.0, math.nan, 4.0]
    b = [0.5, math.nan, 3.0, 3.5]
    ci = paired_difference_ci(a, b)
    assert ci.n == 2 and ci.estimate == pytest.approx(0.5)


def test_group_gap_contains_the_true_gap() -> None:
    rng = np.random.default_rng(8)
    ci = group_gap_ci(rng.normal(0.85, 0.05, 80), rng.normal(0.75, 0.05, 50))
    assert ci.low < 0.10 < ci.high
    assert isinstance(ci, CI) and ci.confidence == 0.95


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: bootstrap_ci([]), "no values"),
        (lambda: bootstrap_ci([math.nan, math.nan]), "no values"),
        (lambda: bootstrap_ci([1.0, 2.0], confidence=95), "between 0 and 1"),
        (lambda: bootstrap_ci([1.0, 2.0], n_resamples=0), "positive integer"),
        (lambda: bootstrap_ci([[1.0, 2.0]]), "1D"),
        (lambda: bootstrap_ci(["a", "b"]), "list of numbers"),
        (lambda: paired_difference_ci([1.0, 2.0], [1.0]), "group_gap_ci"),
        (lambda: paired_difference_ci([math.nan], [1.0]), "no case has both"),
        (lambda: group_gap_ci([1.0], []), "values_b"),
    ],
)
def test_bad_input_is_a_clear_error(call, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=match):
        call()
