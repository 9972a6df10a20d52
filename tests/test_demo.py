"""The main job: the classification section of the report (fast, on synthetic scores) and the whole demo (slow).

The fast tests build scores whose ROC, threshold operating point and confusion matrix can be worked out by hand,
and check that the report shows exactly those numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from medlens.errors import InputError, RunError
from medlens.evaluate.classification import classification_metrics
from medlens.report import Report
from medlens.report.classification import (
    add_classification_section,
    ci_text,
    confusion_figure,
    metric_rows,
    roc_figure,
)

#: 4 negatives and 4 positives; at threshold 0.5: TN 3, FP 1, FN 1, TP 3 (sensitivity = specificity = 0.75).
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
POS = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
SCORES = np.stack([1 - POS, POS], axis=1)


def _summary(threshold: float = 0.5, n_resamples: int = 200) -> dict:
    return classification_metrics(
        Y, SCORES, classification_type="binary", class_names=["no lesion", "lesion"],
        threshold=threshold, n_resamples=n_resamples,
    )  # fmt: skip


def test_metric_rows_show_the_estimates_and_intervals_of_the_summary() -> None:
    summary = _summary()
    rows = {r["metric"]: r["value [95% CI]"] for r in metric_rows(summary)}
    # AUC by hand: 15 of the 16 positive/negative pairs are ordered correctly (0.6 > 0.4 is the one miss).
    assert rows["AUC (ROC)"].startswith(f"{15 / 16:.3f} [")
    assert rows["Sensitivity (recall)"].startswith("0.750 [")
    assert rows["Specificity"].startswith("0.750 [")
    assert rows["Accuracy"].startswith("0.750 [")
    low, high = summary["overall"]["auc"]["low"], summary["overall"]["auc"]["high"]
    assert rows["AUC (ROC)"] == f"{15 / 16:.3f} [{low:.3f}, {high:.3f}]"
    assert "MedMNIST AUC" in rows and "MedMNIST ACC" in rows
    assert "Mean absolute grade error" not in rows  # ordinal-only metrics are not listed for a binary task


def test_ci_text_marks_undefined_values() -> None:
    assert ci_text(None) == "–"
    assert ci_text({"estimate": None, "low": None, "high": None}) == "–"
    assert ci_text({"estimate": 0.5, "low": None, "high": 0.75}) == "0.500 [–, 0.750]"


def test_metric_rows_refuse_a_segmentation_summary() -> None:
    with pytest.raises(InputError, match="classification_metrics"):
        metric_rows({"per_class": {}, "foreground_mean": {}})


def test_roc_figure_draws_the_curve_and_the_threshold_operating_point() -> None:
    from sklearn.metrics import roc_curve

    fig = roc_figure(Y, POS, threshold=0.65)
    ax = fig.axes[0]
    fpr, tpr, _ = roc_curve(Y, POS)
    curve = ax.lines[0]
    np.testing.assert_allclose(curve.get_xdata(), fpr)
    np.testing.assert_allclose(curve.get_ydata(), tpr)
    # At 0.65: positives 0.7, 0.8, 0.9 -> sensitivity 3/4; no negative reaches 0.65 -> specificity 1.
    point = ax.collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(point), [[0.0, 0.75]])


def test_roc_figure_refuses_a_single_class_and_mismatched_lengths() -> None:
    with pytest.raises(InputError, match="single class"):
        roc_figure(np.zeros(4), np.linspace(0, 1, 4))
    with pytest.raises(InputError, match="one score per case"):
        roc_figure(Y, POS[:-1])


def test_confusion_figure_writes_counts_and_row_fractions() -> None:
    fig = confusion_figure([[3, 1], [1, 3]], ["no lesion", "lesion"])
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == sorted(["3\n75%", "1\n25%", "1\n25%", "3\n75%"])
    with pytest.raises(InputError, match="2x2"):
        confusion_figure([[1, 2, 3]], ["a", "b"])


def test_classification_section_reports_the_threshold_metrics_and_figures(tmp_path: Path) -> None:
    summary = _summary(threshold=0.65)
    rep = Report("demo")
    add_classification_section(
        rep, summary, Y, SCORES, description="lesion or not",
        plan_reasons=["network: resnet18"], decision_reasons=["Youden's J"],
    )  # fmt: skip
    html = rep.write(tmp_path / "report.html").read_text()
    assert "Lesion classification" in html
    assert "threshold 0.65" in html
    assert html.count("data:image/png;base64,") == 2  # ROC curve and confusion matrix
    # At 0.65 the confusion matrix is TN 4, FP 0, FN 1, TP 3: specificity 1, sensitivity 0.75 in the table.
    assert summary["confusion_matrix"]["counts"] == [[4, 0], [1, 3]]
    assert re.search(r"Specificity</td><td[^>]*>1\.000 \[", html)
    assert re.search(r"Sensitivity \(recall\)</td><td[^>]*>0\.750 \[", html)
    assert "network: resnet18" in html and "Youden" in html


def test_classification_section_of_a_multiclass_task_has_no_roc_curve() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    s = rng.dirichlet(np.ones(3), size=30) + np.eye(3)[y]
    s /= s.sum(1, keepdims=True)
    summary = classification_metrics(y, s, classification_type="multiclass", n_resamples=100)
    html = add_classification_section(Report("x"), summary, y, s).to_html()
    assert "ROC curve" not in html
    assert "Confusion matrix" in html and html.count("data:image/png;base64,") == 1


def test_fresh_run_dir_refuses_to_delete_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    from medlens.demo import _fresh_run_dir

    foreign = tmp_path / "run"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(RunError, match="not a medlens run"):
        _fresh_run_dir(foreign)
    assert (foreign / "thesis.tex").is_file()
    old = tmp_path / "old"
    (old / "fold_0").mkdir(parents=True)
    (old / "run.json").write_text("{}")
    assert not _fresh_run_dir(old).exists()


@pytest.mark.slow
def test_run_demo_end_to_end_with_a_tiny_budget(tmp_path: Path) -> None:
    from medlens.demo import run_demo

    result = run_demo(
        tmp_path / "demo", budget="30s", subjects=7, lesion_budget="30s", lesion_subjects=16, seed=0
    )
    assert result.report.is_file() and result.num_test >= 1
    assert 0.0 <= result.mean_dice <= 1.0
    # A 30 s classifier on 16 subjects is not expected to be good (brain-lesion's subtle lesions need minutes);
    # what must hold: the reported AUC is the AUC of the evaluated test scores, under the stored threshold.
    from sklearn.metrics import roc_auc_score

    saved = json.loads(result.lesion_metrics.read_text())  # type: ignore[union-attr]
    assert saved["n_cases"] == result.lesion_num_test == len(saved["cases"])
    positive = [s[1] for s in saved["scores"]]
    assert result.lesion_auc == pytest.approx(roc_auc_score(saved["targets"], positive), abs=1e-4)
    run_info = json.loads((result.lesion_run / "run.json").read_text())  # type: ignore[operator]
    assert saved["threshold"] == run_info["decision"]["threshold"]
    html = result.report.read_text()
    for prefix in ("Segmentation: ", "Lesion classifier: "):
        for title in ("At a glance", "Calibration", "Subgroups (fairness)", "Robustness", "Explanations"):
            assert f">{prefix}{title}<" in html
    assert "ROC curve" in html and "Confusion matrix" in html
    assert result.report.stat().st_size < 10 * 2**20
    assert (result.run / "model_card.md").is_file() and (result.lesion_run / "model_card.md").is_file()
