"""Deferral curve: perfect and random uncertainty, ties, the oracle ceiling, the referral threshold."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.evaluate.deferral import deferral_curve, refer_threshold


def test_uncertainty_that_ranks_every_error_first() -> None:
    # 200 cases, 30 wrong (15%); the wrong cases are exactly the most uncertain ones.
    rng = np.random.default_rng(0)
    correct = rng.permutation(np.r_[np.ones(170), np.zeros(30)])
    uncertainty = (1 - correct) + rng.uniform(0, 0.5, size=200)
    c = deferral_curve(correct, uncertainty, metric_name="accuracy")
    f = np.asarray(c["fractions"])
    assert f[0] == 0.0 and f[-1] == pytest.approx(0.5)
    # Independent computation: referring r <= 30 cases removes r errors, so 170 / (200 - r) are right.
    expected = 170 / (200 - np.minimum(np.rint(f * 200), 30))
    np.testing.assert_allclose(c["kept_metric"], expected)
    assert c["kept_metric"][0] == pytest.approx(0.85)
    assert c["kept_metric"][f.tolist().index(0.15)] == 1.0  # all errors referred at the error rate
    np.testing.assert_allclose(c["kept_metric"], c["oracle_metric"])  # as good as it gets
    np.testing.assert_allclose(c["random_metric"], 0.85)
    assert c["auc"] > c["auc_random"] + 0.1 and c["auc"] == pytest.approx(c["auc_oracle"])
    assert c["auc_random"] == pytest.approx(0.85) and c["n_referred"][2] == 10


def test_random_uncertainty_is_close_to_random_referral() -> None:
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(20):
        correct = (rng.uniform(size=500) < 0.8).astype(float)
        c = deferral_curve(correct, rng.uniform(size=500))
        diffs.append(c["auc"] - c["auc_random"])
        assert c["auc_oracle"] > c["auc"]
    assert abs(np.mean(diffs)) < 0.005 and np.max(np.abs(diffs)) < 0.03
    # A constant score carries no information: exactly the random curve (ties are averaged, not ordered).
    correct = np.r_[np.zeros(50), np.ones(50)]  # the errors come first in case order
    flat = deferral_curve(correct, np.zeros(100))
    np.testing.assert_allclose(flat["kept_metric"], 0.5)
    assert flat["auc"] == pytest.approx(flat["auc_random"])


def test_ties_count_with_their_mean_by_hand() -> None:
    # perf [1, 0, 1, 1], uncertainty [0.1, 0.5, 0.5, 0.9]; fractions 0, 1/4, 1/2 of 4 cases:
    #   refer 0: mean(1, 0, 1, 1) = 0.75
    #   refer 1: the 0.9 case goes -> mean(1, 0, 1) = 2/3
    #   refer 2: the 0.9 case and one of the two tied at 0.5 (each with chance 1/2): the kept pair is the
    #            0.1 case (1) and a tied one (expected 0.5) -> (1 + 0.5) / 2 = 0.75
    #   areas (trapezoid / 0.5): ((0.75 + 2/3) / 2 * 0.25 + (2/3 + 0.75) / 2 * 0.25) / 0.5 = 0.70833
    c = deferral_curve([1, 0, 1, 1], [0.1, 0.5, 0.5, 0.9], fractions=[0, 0.25, 0.5])
    np.testing.assert_allclose(c["kept_metric"], [0.75, 2 / 3, 0.75])
    np.testing.assert_allclose(c["oracle_metric"], [0.75, 1.0, 1.0])
    assert c["auc"] == pytest.approx((0.75 + 2 / 3) / 2)


def test_dice_performance_and_nan_cases() -> None:
    rng = np.random.default_rng(2)
    dice = np.clip(rng.normal(0.8, 0.1, size=60), 0, 1)
    unc = 1 - dice + rng.normal(0, 0.05, size=60)  # informative but noisy
    dice[[3, 7]] = np.nan  # undefined cases are dropped
    c = deferral_curve(dice, unc)
    assert c["n_cases"] == 58
    assert np.all(np.asarray(c["oracle_metric"]) >= np.asarray(c["kept_metric"]) - 1e-12)
    assert c["auc_random"] < c["auc"] < c["auc_oracle"]
    assert c["kept_metric"][0] == pytest.approx(np.nanmean(dice))


def test_refer_threshold_refers_the_requested_fraction() -> None:
    rng = np.random.default_rng(3)
    val, test = rng.gamma(2.0, size=2000), rng.gamma(2.0, size=2000)
    t = refer_threshold(val, 0.1)
    assert np.mean(val > t) == pytest.approx(0.1, abs=0.002)
    assert np.mean(test > t) == pytest.approx(0.1, abs=0.03)
    assert np.mean(val > refer_threshold(val, 0.0)) == 0.0
    with pytest.raises(InputError, match="fraction"):
        refer_threshold(val, 1.0)
    with pytest.raises(InputError, match="finite"):
        refer_threshold([np.nan], 0.1)


def test_bad_inputs() -> None:
    with pytest.raises(InputError, match="3 performance values for 2"):
        deferral_curve([1, 0, 1], [0.1, 0.2])
    with pytest.raises(InputError, match="NaN or infinite"):
        deferral_curve([1, 0], [0.1, np.nan])
    with pytest.raises(InputError, match="increasing"):
        deferral_curve([1, 0], [0.1, 0.2], fractions=[0.3, 0.1])
    with pytest.raises(InputError, match="no case"):
        deferral_curve([np.nan], [0.1])
