"""Classification metrics: MedMNIST's ACC/AUC definitions and medlens's metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from medlens.errors import InputError
from medlens.evaluate.classification import (
    classification_metrics,
    medmnist_acc,
    medmnist_auc,
    point_metrics,
    predict,
    weighted_auc,
)


def two_columns(pos: list[float]) -> np.ndarray:
    p = np.asarray(pos)
    return np.stack([1 - p, p], axis=1)


# ---- MedMNIST's definitions, by hand ---------------------------------------------------------------------------
def test_medmnist_binary_uses_a_strict_threshold_and_the_last_column() -> None:
    y = np.array([[0], [0], [1], [1]])  # MedMNIST keeps labels as N x 1
    s = two_columns([0.2, 0.5, 0.5, 0.9])
    # score > 0.5: predictions 0, 0, 0, 1 -> 3 of 4 right (with >= 0.5 it would be 3 of 4 the other way round)
    assert medmnist_acc(y, s, "binary-class") == pytest.approx(0.75)
    assert medmnist_acc(np.array([0, 1]), two_columns([0.2, 0.5]), "binary-class") == pytest.approx(0.5)
    # pairs (neg, pos): (.2,.5) 1, (.2,.9) 1, (.5,.5) 1/2, (.5,.9) 1 -> 3.5 / 4
    assert medmnist_auc(y, s, "binary-class") == pytest.approx(0.875)


def test_medmnist_multiclass_and_ordinal_argmax_and_mean_one_vs_rest_auc() -> None:
    y = np.array([[0], [1], [2], [1]])
    s = np.array([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.1, 0.3, 0.6], [0.2, 0.25, 0.55]])
    # argmax (first on ties): 0, 0, 2, 2 -> right, wrong, right, wrong
    for task in ("multi-class", "ordinal-regression"):
        assert medmnist_acc(y, s, task) == pytest.approx(0.5)
        # class 0: 0.6 above 0.4, 0.1, 0.2 -> 1; class 1: (0.4, 0.25) vs (0.3, 0.3) -> 2/4; class 2: 1
        assert medmnist_auc(y, s, task) == pytest.approx((1 + 0.5 + 1) / 3)


def test_medmnist_multilabel_per_label_accuracy_and_auc_averaged() -> None:
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[0.9, 0.5], [0.4, 0.6], [0.5, 0.2], [0.1, 0.3]])
    # score > 0.5: label 0 predicted 1,0,0,0 (3/4 right); label 1 predicted 0,1,0,0 (3/4 right)
    assert medmnist_acc(y, s, "multi-label, binary-class") == pytest.approx(0.75)
    # label 0: positives .9 .5 above negatives .4 .1 -> 1; label 1: (.6, .2) vs (.5, .3) -> 2/4
    assert medmnist_auc(y, s, "multi-label, binary-class") == pytest.approx(0.75)


def test_medmnist_auc_refuses_an_undefined_class() -> None:
    with pytest.raises(InputError, match="class 2"):
        medmnist_auc(np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3), "multi-class")
    with pytest.raises(InputError, match="unknown MedMNIST task"):
        medmnist_acc(np.array([0, 1]), two_columns([0.1, 0.9]), "binary")


# ---- medlens metrics, by hand ---------------------------------------------------------------------------------------
def test_binary_confusion_metrics_at_a_threshold() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.6, 0.7, 0.3, 0.8, 0.9, 0.2])
    m = classification_metrics(y, s, classification_type="binary", n_resamples=200)
    o = {k: v["estimate"] for k, v in m["overall"].items()}
    # >= 0.5: TP 3 (.7 .8 .9), FN 1 (.3), FP 1 (.6), TN 3
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "npv", "f1"):
        assert o[key] == pytest.approx(0.75), key
    assert o["auc"] == pytest.approx(14 / 16)  # .3 beats only .1 and .2
    assert m["confusion_matrix"]["counts"] == [[3, 1], [1, 3]]
    low = point_metrics(y, s, classification_type="binary", threshold=0.35)
    # >= 0.35 adds .4 as a false positive: TP 3, FN 1, FP 2, TN 2
    assert low["recall"] == pytest.approx(0.75) and low["specificity"] == pytest.approx(0.5)
    assert low["precision"] == pytest.approx(0.6) and low["f1"] == pytest.approx(6 / 9)
    assert m["per_class"]["class_1"]["support"] == 4


def test_multiclass_macro_metrics_leave_undefined_classes_out() -> None:
    y = np.array([0, 1, 2, 1])
    s = np.array([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.1, 0.3, 0.6], [0.2, 0.25, 0.55]])
    m = classification_metrics(
        y, s, classification_type="multiclass", class_names=["a", "b", "c"], n_resamples=100
    )
    assert m["confusion_matrix"]["counts"] == [[1, 0, 0], [1, 0, 1], [0, 0, 1]]
    o = m["overall"]
    assert o["accuracy"]["estimate"] == pytest.approx(0.5)
    assert o["balanced_accuracy"]["estimate"] == pytest.approx(2 / 3)  # recall 1, 0, 1
    assert o["precision"]["estimate"] == pytest.approx(0.5)  # 1/2, undefined (never predicted), 1/2
    assert m["per_class"]["b"]["precision"]["estimate"] is None
    assert o["auc"]["estimate"] == pytest.approx(2.5 / 3)
    assert m["medmnist"]["acc"]["estimate"] == pytest.approx(medmnist_acc(y, s, "multi-class"))
    assert m["confusion_matrix"]["row_fraction"][1] == [0.5, 0.0, 0.5]


def test_multilabel_metrics_per_label_and_subset_accuracy() -> None:
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[0.9, 0.5], [0.4, 0.6], [0.5, 0.2], [0.1, 0.3]])
    m = point_metrics(y, s, classification_type="multilabel", threshold=[0.5, 0.25])
    # label 0 >= .5: predicted 1,0,1,0, all right; label 1 >= .25: predicted 1,1,0,1 against 0,1,1,0, 1 of 4 right
    assert m["accuracy"] == pytest.approx((1.0 + 0.25) / 2)
    assert m["subset_accuracy"] == pytest.approx(0.25)  # only case 1 has both labels right
    assert m["auc"] == pytest.approx(0.75)
    assert m["medmnist_acc"] == pytest.approx(0.75)  # MedMNIST ignores the chosen thresholds


def test_ordinal_median_grade_mae_and_quadratic_kappa() -> None:
    probs = np.array([[0.3, 0.1, 0.5, 0.1], [0.45, 0.05, 0.05, 0.45]])
    # cumulative .3 .4 .9 -> median grade 2; .45 .5 -> grade 1 (argmax would say 0)
    assert predict(probs, "ordinal").tolist() == [2, 1]
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 300)
    s = rng.dirichlet(np.ones(5), 300)
    s[np.arange(300), y] += 1.0
    s /= s.sum(1, keepdims=True)
    m = point_metrics(y, s, classification_type="ordinal")
    pred = predict(s, "ordinal")
    assert m["mae"] == pytest.approx(np.abs(pred - y).mean())
    assert m["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))


def test_weighted_auc_matches_scikit_learn_with_ties_and_weights() -> None:
    rng = np.random.default_rng(0)
    score = np.round(rng.random(200), 1)  # many ties
    pos = rng.random(200) < 0.3
    unit = weighted_auc(score, pos)(np.ones((1, 200)))[0]
    assert unit == pytest.approx(roc_auc_score(pos, score))
    counts = rng.integers(0, 3, 200).astype(float)  # a resample as case counts
    expected = roc_auc_score(np.repeat(pos, counts.astype(int)), np.repeat(score, counts.astype(int)))
    assert weighted_auc(score, pos)(counts[None])[0] == pytest.approx(expected)


def test_bootstrap_intervals_are_deterministic_and_cover_the_estimate() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    s = np.clip(0.3 * y + rng.random(150) * 0.7, 0, 1)
    a = classification_metrics(y, s, classification_type="binary", n_resamples=300, seed=4)
    b = classification_metrics(y, s, classification_type="binary", n_resamples=300, seed=4)
    c = classification_metrics(y, s, classification_type="binary", n_resamples=300, seed=5)
    assert a == b
    assert a["overall"]["auc"] != c["overall"]["auc"]
    for stat in a["overall"].values():
        assert stat["low"] <= stat["estimate"] <= stat["high"]
        assert stat["n"] == 150 and stat["confidence"] == 0.95
    auc = a["overall"]["auc"]
    assert 0.0 < auc["high"] - auc["low"] < 0.3


@pytest.mark.parametrize(
    ("y", "s", "ctype", "match"),
    [
        ([0, 3], [[0.5, 0.5], [0.5, 0.5]], "multiclass", "not one of the 2 classes"),
        ([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]], "binary", "one row per case"),
        ([[0, 1]], [[0.2, np.nan]], "multilabel", "NaN"),
        ([[0, 2]], [[0.2, 0.3]], "multilabel", "0/1"),
        ([0, 1], [0.1, 0.9], "regression", "classification_type"),
    ],
)
def test_bad_inputs_are_named(y: list, s: list, ctype: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        classification_metrics(y, s, classification_type=ctype, n_resamples=10)
