"""Trust report figures draw exactly the numbers of their statistics, and stay small as PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.evaluate.calibration import calibration_report
from medlens.evaluate.deferral import deferral_curve
from medlens.evaluate.subgroups import subgroup_analysis
from medlens.report.trust_figures import (
    deferral_figure,
    pr_figure,
    reliability_figure,
    robustness_figure,
    subgroup_figure,
)


def _png_size(fig) -> int:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")  # as Report.figure
    return len(buf.getvalue())


def _calibration() -> dict:  # type: ignore[type-arg]
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, size=(600, 3))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (rng.uniform(size=(600, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    sharp = p**2.5 / (p**2.5).sum(1, keepdims=True)
    return calibration_report(sharp[:300], y[:300], sharp[300:], y[300:], "multiclass", n_bins=10)


def test_reliability_figure_draws_the_bins_before_and_after() -> None:
    rep = _calibration()
    fig = reliability_figure(rep["before"], rep["after"])
    top, bottom = fig.axes
    diagonal, before, after = top.lines
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata()) == [0, 1]
    full = [b for b in rep["before"]["bins"] if b["count"]]
    np.testing.assert_allclose(before.get_xdata(), [b["confidence"] for b in full])
    np.testing.assert_allclose(before.get_ydata(), [b["accuracy"] for b in full])
    assert len(after.get_xdata()) == sum(1 for b in rep["after"]["bins"] if b["count"])
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert f"before: ECE {rep['before']['ece']:.3f}" in legend
    assert f"after temperature scaling: ECE {rep['after']['ece']:.3f}" in legend
    heights = [p.get_height() for p in bottom.patches]
    assert heights[:10] == [b["count"] for b in rep["before"]["bins"]]
    assert "equal-width" in bottom.get_xlabel() and "top-label" in bottom.get_xlabel()
    single = reliability_figure(rep["before"])
    assert len(single.axes[0].lines) == 2
    assert _png_size(fig) < 120_000
    with pytest.raises(InputError, match="ECE dict"):
        reliability_figure({"ece": 0.1})


def test_subgroup_figure_is_a_forest_plot_with_the_gap() -> None:
    rng = np.random.default_rng(1)
    correct = np.r_[rng.uniform(size=60) < 0.9, rng.uniform(size=60) < 0.6, [1, 1]].astype(float)
    site = subgroup_analysis(correct, 122, ["A"] * 60 + ["B"] * 60 + ["C"] * 2, "site", n_resamples=300)
    sex = subgroup_analysis(correct, 122, ["F"] * 122, "sex", n_resamples=300)
    fig = subgroup_figure([site, sex])
    ax_site, ax_sex = fig.axes
    assert "gap A − B" in ax_site.get_title(loc="left") and "single group" in ax_sex.get_title(loc="left")
    labels = [t.get_text() for t in ax_site.get_yticklabels()]
    assert labels == ["A (n=60)", "B (n=60)", "C (n=2, too small)"]
    # Each CI is drawn as its whisker: the error bar's segment spans exactly [low, high] of the group.
    segments = [c for c in ax_site.collections if c.__class__.__name__ == "LineCollection"]
    spans = sorted(tuple(np.round(seg[:, 0], 9)) for lc in segments for seg in lc.get_segments())
    expected = sorted(tuple(np.round(g["ci"], 9)) for g in site["groups"] if g["ci"])
    assert spans == expected
    assert ax_site.lines[-1].get_xdata()[0] == pytest.approx(site["overall"]["estimate"])  # overall line
    with pytest.raises(InputError, match="subgroup_analysis"):
        subgroup_figure({"column": "site"})


def test_deferral_figure_draws_the_three_curves() -> None:
    rng = np.random.default_rng(2)
    correct = (rng.uniform(size=100) < 0.8).astype(float)
    curve = deferral_curve(correct, 1 - correct + rng.uniform(0, 0.8, 100), metric_name="accuracy")
    fig = deferral_figure(curve)
    oracle, kept, random = fig.axes[0].lines
    np.testing.assert_allclose(kept.get_xdata(), curve["fractions"])
    np.testing.assert_allclose(kept.get_ydata(), curve["kept_metric"])
    np.testing.assert_allclose(oracle.get_ydata(), curve["oracle_metric"])
    np.testing.assert_allclose(random.get_ydata(), curve["random_metric"])
    assert f"area {curve['auc']:.3f}" in kept.get_label()
    assert fig.axes[0].get_ylabel() == "accuracy on the kept cases"
    with pytest.raises(InputError, match="deferral_curve"):
        deferral_figure({"fractions": [0, 0.1]})


def test_robustness_figure_one_panel_per_perturbation() -> None:
    kinds = ["gaussian_noise", "blur", "contrast", "bias_field", "fgsm", "pgd"]
    curves = {
        k: {
            "strengths": [0.0, 0.1, 0.2],
            "unit": f"{k} unit",
            "metric_name": "dice",
            "metric": [0.9, 0.8 - i / 100, 0.6],
            "ci": [[0.85, 0.95], None, [0.5, 0.7]],
        }
        for i, k in enumerate(kinds)
    }
    fig = robustness_figure(curves)
    visible = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in visible] == kinds
    np.testing.assert_allclose(
        visible[1].lines[-1].get_ydata(), [0.9, 0.79, 0.6]
    )  # the curve, after the caps
    assert visible[0].get_xlabel() == "gaussian_noise unit" and visible[0].get_ylabel() == "dice"
    # Whiskers for the two points with an interval, none for the point without one.
    whiskers = [c for c in visible[0].collections if c.__class__.__name__ == "LineCollection"]
    spans = sorted(tuple(np.round(seg[:, 1], 9)) for lc in whiskers for seg in lc.get_segments())
    assert spans == [(0.5, 0.7), (0.85, 0.95)]
    assert len(robustness_figure({"blur": curves["blur"]}).axes) == 1
    assert _png_size(fig) < 150_000
    with pytest.raises(InputError, match="same non-zero length"):
        robustness_figure({"blur": {"strengths": [0, 1], "metric": [0.5]}})


def test_pr_figure_binary_and_per_class() -> None:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=80)
    s = np.clip(0.3 * y + rng.uniform(0, 0.7, size=80), 0, 1)
    ax = pr_figure(y, s, ["benign", "malignant"]).axes[0]
    curve = ax.lines[0]
    precision, recall, _ = precision_recall_curve(y, s)
    np.testing.assert_allclose(curve.get_xdata(), recall)
    np.testing.assert_allclose(curve.get_ydata(), precision)
    assert curve.get_label() == f"malignant: AP {average_precision_score(y, s):.3f}"
    assert ax.lines[1].get_ydata()[0] == pytest.approx(y.mean())  # prevalence line
    # Multiclass: one curve per class; a class without positives says so.
    y3 = rng.integers(0, 2, size=60)  # class 2 never occurs
    p3 = rng.dirichlet([1, 1, 1], size=60)
    labels = [t.get_text() for t in pr_figure(y3, p3, ["a", "b", "c"]).axes[0].get_legend().get_texts()]
    assert (
        labels[0].startswith("a: AP") and labels[1].startswith("b: AP") and labels[2] == "c: no positive case"
    )
    with pytest.raises(InputError, match="class names"):
        pr_figure(y3, p3, ["a", "b"])
