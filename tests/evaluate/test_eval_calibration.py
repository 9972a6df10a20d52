"""Calibration: ECE against hand-worked examples and an independent computation, temperature scaling, voxels."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.evaluate.calibration import (
    apply_temperature,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    voxel_calibration,
)


def test_binary_ece_by_hand() -> None:
    # 5 equal-width bins [0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]; positive-class probability binned.
    #   bin 0: {0.10}       confidence 0.100, fraction positive 0/1 -> |0 - 0.100| = 0.100, weight 1/6
    #   bin 1: {0.30, 0.35} confidence 0.325, fraction positive 1/2 -> |0.5 - 0.325| = 0.175, weight 2/6
    #   bin 2: empty
    #   bin 3: {0.70}       confidence 0.700, fraction positive 0/1 -> 0.700, weight 1/6
    #   bin 4: {0.90, 0.95} confidence 0.925, fraction positive 2/2 -> 0.075, weight 2/6
    #   ECE = (0.100 + 2 * 0.175 + 0.700 + 2 * 0.075) / 6 = 1.3 / 6 = 0.21667; MCE = 0.7
    p = np.array([0.1, 0.3, 0.35, 0.7, 0.9, 0.95])
    y = np.array([0, 1, 0, 0, 1, 1])
    r = expected_calibration_error(p, y, "binary", n_bins=5)
    assert r["ece"] == pytest.approx(1.3 / 6)
    assert r["mce"] == pytest.approx(0.7)
    assert r["strategy"] == "uniform" and r["n_bins"] == 5 and r["n"] == 6
    assert "positive-class" in r["what"] and "equal-width" in r["binning"]
    assert [b["count"] for b in r["bins"]] == [1, 2, 0, 1, 2]
    assert r["bins"][1]["confidence"] == pytest.approx(0.325) and r["bins"][1]["accuracy"] == 0.5
    assert r["bins"][2]["confidence"] is None and r["bins"][2]["accuracy"] is None
    assert [(b["lo"], b["hi"]) for b in r["bins"]][3] == pytest.approx((0.6, 0.8))
    # (N, 2) softmax outputs give the same result: the positive column is binned.
    assert expected_calibration_error(np.stack([1 - p, p], 1), y, "binary", n_bins=5)["ece"] == r["ece"]


def test_multiclass_and_multilabel_ece_by_hand() -> None:
    # Top-label confidence, 2 bins [0, .5], (.5, 1]:
    #   case 0: max 0.7 -> class 0, true 0: right;   case 1: max 0.4 -> class 0, true 1: wrong
    #   case 2: max 0.8 -> class 1, true 1: right;   case 3: max 0.4 -> class 2, true 2: right
    #   bin 0: {0.4 wrong, 0.4 right} conf 0.40, acc 0.5 -> 0.10 x 2/4;  bin 1: {0.7, 0.8} conf 0.75, acc 1
    #   -> 0.25 x 2/4.  ECE = 0.05 + 0.125 = 0.175
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    y = np.array([0, 1, 1, 2])
    r = expected_calibration_error(p, y, "multiclass", n_bins=2)
    assert r["ece"] == pytest.approx(0.175)
    assert "top-label" in r["what"]
    assert expected_calibration_error(p, y, "ordinal", n_bins=2)["ece"] == pytest.approx(0.175)
    # Multilabel, all (case, label) probabilities pooled, 2 bins:
    #   bin 0: {0.2 (label 0), 0.1 (label 0)} conf 0.15, frequency 0 -> 0.15 x 2/4
    #   bin 1: {0.9 (label 1), 0.6 (label 0)} conf 0.75, frequency 0.5 -> 0.25 x 2/4;  ECE = 0.075 + 0.125 = 0.2
    pm = np.array([[0.9, 0.2], [0.6, 0.1]])
    ym = np.array([[1, 0], [0, 0]])
    rm = expected_calibration_error(pm, ym, "multilabel", n_bins=2)
    assert rm["ece"] == pytest.approx(0.2) and rm["n"] == 4 and "pooled" in rm["what"]


def _loop_ece(conf: np.ndarray, hit: np.ndarray, edges: np.ndarray) -> float:
    """Independent ECE: a plain loop over bins with the (lo, hi] rule, first bin closed."""
    total = 0.0
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        inside = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c <= hi)]
        inside = [i for i in inside if b == 0 or conf[i] > lo]
        if inside:
            total += len(inside) / len(conf) * abs(np.mean(hit[inside]) - np.mean(conf[inside]))
    return total


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_ece_matches_an_independent_computation_and_sklearn(strategy: str) -> None:
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    p = rng.beta(2, 2, size=500)
    y = (rng.uniform(size=500) < p**1.5).astype(int)  # a miscalibrated model
    r = expected_calibration_error(p, y, "binary", n_bins=10, strategy=strategy)
    edges = np.array([r["bins"][0]["lo"]] + [b["hi"] for b in r["bins"]])
    if strategy == "quantile":
        np.testing.assert_allclose(edges[1:-1], np.percentile(p, np.linspace(0, 100, 11))[1:-1])
        counts = [b["count"] for b in r["bins"]]
        assert max(counts) - min(counts) <= 1  # equal mass
    assert r["ece"] == pytest.approx(_loop_ece(p, y.astype(float), edges), abs=1e-12)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy=strategy)
    full = [b for b in r["bins"] if b["count"]]
    np.testing.assert_allclose([b["accuracy"] for b in full], prob_true)
    np.testing.assert_allclose([b["confidence"] for b in full], prob_pred)


def _calibrated_multiclass(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from random logits, and labels drawn from them: calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, k))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (rng.uniform(size=(n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return p, y


def _sharpen(p: np.ndarray, t: float) -> np.ndarray:
    q = p ** (1 / t)
    return q / q.sum(axis=1, keepdims=True)


def test_temperature_scaling_undoes_over_confidence() -> None:
    p, y = _calibrated_multiclass(4000, 4, seed=0)
    over = _sharpen(p, 0.4)  # softmax(z / 0.4): over-confident; T = 2.5 undoes it
    t = fit_temperature(over[:2000], y[:2000], "multiclass")
    assert t == pytest.approx(2.5, abs=0.3)
    rep = calibration_report(over[:2000], y[:2000], over[2000:], y[2000:], "multiclass")
    assert rep["temperature"] == t
    assert rep["before"]["ece"] > 0.1 and rep["after"]["ece"] < 0.04
    assert rep["nll_after"] < rep["nll_before"] and rep["brier_after"] < rep["brier_before"]
    assert rep["after"]["nll"] == rep["nll_after"] and rep["n_val"] == 2000 == rep["n_test"]
    assert "note" not in rep
    # Scaling keeps the decision and matches the sharpening it undoes.
    scaled = apply_temperature(over[2000:], t, "multiclass")
    np.testing.assert_array_equal(scaled.argmax(1), over[2000:].argmax(1))
    np.testing.assert_allclose(apply_temperature(over, 2.5, "multiclass"), p, atol=1e-9)
    # An under-confident model gets T < 1.
    assert fit_temperature(_sharpen(p, 2.0), y, "multiclass") == pytest.approx(0.5, abs=0.08)


def test_temperature_scaling_binary_multilabel_ordinal() -> None:
    rng = np.random.default_rng(1)
    q = rng.uniform(0.02, 0.98, size=(3000, 3))
    y = (rng.uniform(size=q.shape) < q).astype(int)
    sharp = 1 / (1 + np.exp(-np.log(q / (1 - q)) / 0.4))
    assert fit_temperature(sharp[:, 0], y[:, 0], "binary") == pytest.approx(2.5, abs=0.35)
    assert fit_temperature(sharp, y, "multilabel") == pytest.approx(2.5, abs=0.25)
    out = apply_temperature(sharp[:, 0], 2.5, "binary")
    assert out.shape == (3000,)
    np.testing.assert_allclose(out, q[:, 0], atol=1e-9)
    # Ordinal: the cumulative probabilities are scaled, so the median grade never changes.
    p, _ = _calibrated_multiclass(200, 5, seed=2)
    scaled = apply_temperature(p, 3.0, "ordinal")
    np.testing.assert_allclose(scaled.sum(1), 1.0)
    median = (np.cumsum(p, 1) >= 0.5).argmax(1)
    np.testing.assert_array_equal((np.cumsum(scaled, 1) >= 0.5 - 1e-9).argmax(1), median)
    np.testing.assert_allclose(apply_temperature(p, 1.0, "ordinal"), p, atol=1e-9)


def test_separable_validation_is_flagged() -> None:
    # Every validation case right: the NLL keeps falling as T -> 0, so T is not determined by the data.
    p = np.array([[0.7, 0.3], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7]])
    rep = calibration_report(p, [0, 1, 0, 1], p, [0, 0, 1, 1], "binary", n_bins=5)
    assert rep["temperature"] == pytest.approx(0.05, rel=0.01)
    assert "edge of its search range" in rep["note"]


def test_nll_and_brier_match_sklearn() -> None:
    from sklearn.metrics import brier_score_loss, log_loss

    p, y = _calibrated_multiclass(300, 3, seed=4)
    rep = calibration_report(p, y, p, y, "multiclass")
    assert rep["nll_before"] == pytest.approx(log_loss(y, p, labels=[0, 1, 2]))
    assert rep["brier_before"] == pytest.approx(np.mean(np.sum((p - np.eye(3)[y]) ** 2, axis=1)))
    assert rep["temperature"] == pytest.approx(1.0, abs=0.2)  # calibrated: little to fix
    pb = p[:, :2] / p[:, :2].sum(1, keepdims=True)
    yb = (y == 1).astype(int)
    rb = calibration_report(pb, yb, pb, yb, "binary")
    assert rb["brier_before"] == pytest.approx(brier_score_loss(yb, pb[:, 1]))
    assert rb["nll_before"] == pytest.approx(log_loss(yb, pb[:, 1]))


def test_voxel_calibration_samples_deterministically() -> None:
    rng = np.random.default_rng(0)
    probs, labels = [], []
    for shape in [(10, 12, 8), (6, 6, 6)]:
        fg = rng.uniform(0.05, 0.95, size=shape)
        probs.append(np.stack([1 - fg, fg]))
        labels.append((rng.uniform(size=shape) < fg).astype(np.int64))  # calibrated voxels
    full = voxel_calibration(probs, labels, n_bins=10)
    assert full["n"] == full["n_voxels_total"] == 960 + 216
    flat_p = np.concatenate([p.reshape(2, -1).T for p in probs])
    flat_y = np.concatenate([lab.reshape(-1) for lab in labels])
    assert full["ece"] == pytest.approx(expected_calibration_error(flat_p, flat_y, "multiclass", 10)["ece"])
    assert full["ece"] < 0.06 and "voxel" in full["what"]
    a = voxel_calibration(probs, labels, max_voxels=300, seed=1)
    assert a == voxel_calibration(probs, labels, max_voxels=300, seed=1)
    assert a["n"] == 300 and a["ece"] != voxel_calibration(probs, labels, max_voxels=300, seed=2)["ece"]
    assert a["foreground"] is not None and a["foreground"]["n"] < 300
    # A single foreground-probability channel and a (1, *S) label map are understood.
    one = voxel_calibration([probs[0][1:]], [labels[0][None]], n_bins=10)
    assert one["n"] == 960
    with pytest.raises(InputError, match="label map"):
        voxel_calibration([probs[0]], [labels[1]])
    with pytest.raises(InputError, match="one label map per"):
        voxel_calibration(probs, labels[:1])


def test_bad_inputs_say_what_to_do() -> None:
    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    with pytest.raises(InputError, match="not logits"):
        expected_calibration_error(p * 5, [0, 1], "binary")
    with pytest.raises(InputError, match="equal-mass"):
        expected_calibration_error(p, [0, 1], "binary", strategy="width")
    with pytest.raises(InputError, match="n_bins"):
        expected_calibration_error(p, [0, 1], "binary", n_bins=0)
    with pytest.raises(InputError, match="classification type"):
        expected_calibration_error(p, [0, 1], "regression")
    with pytest.raises(InputError, match="one row per case"):
        expected_calibration_error(p, [0, 1, 1], "binary")
    with pytest.raises(InputError, match="temperature"):
        apply_temperature(p, 0.0, "binary")
    with pytest.raises(InputError, match="validation cases"):
        calibration_report(p, [0, 1, 0], p, [0, 1], "binary")
