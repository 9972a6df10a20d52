"""Decision thresholds on constructed validation scores: Youden's J and a target sensitivity."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.tasks.threshold import choose_threshold, choose_thresholds

# negatives .1 .2 .3 .6, positives .35 .7 .8 .9
Y = [0, 0, 0, 1, 0, 1, 1, 1]
S = [0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.8, 0.9]


def test_youden_takes_the_best_split_and_breaks_ties_towards_one_half() -> None:
    c = choose_threshold(Y, S)
    # J = 0.75 both above .6 (sens 3/4, spec 1) and between .3 and .35 (sens 1, spec 3/4): .65 is nearer 0.5
    assert c.rule == "youden"
    assert c.threshold == pytest.approx(0.65)
    assert (c.sensitivity, c.specificity) == (0.75, 1.0)
    assert (c.n_positive, c.n_negative) == (4, 4)
    assert "Youden" in c.reason


def test_target_sensitivity_takes_the_highest_threshold_that_reaches_it() -> None:
    c = choose_threshold(Y, S, rule="sensitivity", target_sensitivity=1.0)
    assert c.threshold == pytest.approx((0.3 + 0.35) / 2)  # every positive kept, .6 still a false positive
    assert (c.sensitivity, c.specificity) == (1.0, 0.75)
    c = choose_threshold(Y, S, rule="sensitivity", target_sensitivity=0.7)
    assert c.threshold == pytest.approx(0.65) and c.sensitivity == 0.75
    # a positive scoring exactly the threshold counts as positive (score >= threshold)
    y, s = np.asarray(Y).astype(bool), np.asarray(S)
    assert ((s >= c.threshold)[y]).mean() == c.sensitivity


def test_threshold_without_both_outcomes_keeps_one_half() -> None:
    c = choose_threshold([1, 1, 1], [0.2, 0.4, 0.9])
    assert c.threshold == 0.5 and c.rule == "default" and c.sensitivity is None
    assert "no negative case" in c.reason


def test_multilabel_thresholds_are_chosen_per_label() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 2)) < 0.3).astype(int)
    s = np.where(y == 1, 0.6, 0.2) + rng.normal(0, 0.05, (200, 2))
    s[:, 1] -= 0.3  # label 1 is calibrated lower: its threshold must follow
    t0, t1 = choose_thresholds(y, s, names=["a", "b"])
    assert 0.3 < t0.threshold < 0.5 and 0.0 <= t1.threshold < 0.2
    assert t0.sensitivity == 1.0 and t1.specificity == 1.0
    assert "b" in t1.reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "sensitivity"}, "needs a target sensitivity"),
        ({"rule": "sensitivity", "target_sensitivity": 1.5}, "--sensitivity 1.5"),
        ({"rule": "f1"}, "threshold rule 'f1'"),
    ],
)
def test_bad_threshold_requests_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        choose_threshold(Y, S, **kwargs)
