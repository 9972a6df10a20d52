"""Report figures: the right slices and data are drawn, the history formats are understood."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.evaluate import case_record
from medlens.report import overlay_figure, per_case_bar_figure, training_curve_figure
from medlens.report.figures import class_colour, representative_slices

CLASSES = {"background": 0, "organ": 1, "lesion": 2}


def volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 24x20x30 volume with an organ in slices k=5..24 whose largest cross-sections are at k=8 and k=20."""
    shape = (24, 20, 30)
    truth = np.zeros(shape, dtype=np.int64)
    truth[6:14, 6:14, 5:25] = 1
    truth[2:22, 2:18, 8] = 1  # the fullest slice of the lower half
    truth[3:21, 3:17, 20] = 1  # the fullest slice of the upper half
    truth[9:12, 9:12, 12:15] = 2
    pred = np.roll(truth, 1, axis=0)
    image = truth * 100.0 + np.random.default_rng(0).normal(0, 5, shape)
    return image, truth, pred


def test_representative_slices_spread_over_the_foreground() -> None:
    counts = np.zeros(30)
    counts[5:25] = 10
    counts[8] = 50
    counts[20] = 40
    assert representative_slices(counts, 2) == [8, 20]
    assert len(representative_slices(counts, 3)) == 3
    assert representative_slices(np.zeros(9), 1) == [4]  # no foreground: the middle
    assert representative_slices(np.r_[0, 0, 3, 0], 5) == [2]  # never more picks than foreground slices


def test_overlay_figure_3d_draws_the_fullest_slices_side_by_side() -> None:
    image, truth, pred = volume()
    fig = overlay_figure(image, truth, pred, CLASSES, axis=2, slices=2, spacing=(1.0, 1.0, 3.0), title="case")
    axes = fig.axes
    assert len(axes) == 6  # 2 slices x (image, reference, prediction)
    assert [a.get_title() for a in axes[:3]] == ["image", "reference", "prediction"]
    assert [axes[0].get_ylabel(), axes[3].get_ylabel()] == ["k = 8", "k = 20"]
    # The reference panel of row 1 shows exactly the reference labels of slice k=20 (transposed for display).
    shown = axes[4].images[1].get_array()
    np.testing.assert_array_equal(np.ma.filled(shown, 0), truth[:, :, 20].T)
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), truth[:, :, 20].T == 0)
    np.testing.assert_array_equal(np.ma.filled(axes[5].images[1].get_array(), 0), pred[:, :, 20].T)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["organ", "lesion"]
    colours = [h.get_facecolor() for h in fig.legends[0].legend_handles]
    from matplotlib.colors import to_rgba

    assert colours[1] == pytest.approx(to_rgba(class_colour(2)))


def test_overlay_figure_2d_and_list_of_names() -> None:
    image, truth, _ = volume()
    fig = overlay_figure(image[:, :, 20], truth[:, :, 20], None, ["background", "organ", "lesion"])
    assert [a.get_title() for a in fig.axes] == ["image", "reference"]
    np.testing.assert_array_equal(np.ma.filled(fig.axes[1].images[1].get_array(), 0), truth[:, :, 20].T)


def test_overlay_figure_errors() -> None:
    image, truth, pred = volume()
    with pytest.raises(InputError, match="must match"):
        overlay_figure(image, truth[:-1], pred, CLASSES)
    with pytest.raises(InputError, match="needs a reference"):
        overlay_figure(image, None, None, CLASSES)
    with pytest.raises(InputError, match="axis=3"):
        overlay_figure(image, truth, pred, CLASSES, axis=3)
    with pytest.raises(InputError, match="2D or 3D"):
        overlay_figure(np.zeros((2, 4, 4, 4)), None, np.zeros((2, 4, 4, 4)), CLASSES)


@pytest.mark.parametrize(
    "history",
    [
        [{"iteration": i, "loss": 1.0 / (i + 1) ** 2} for i in range(20)]
        + [{"iteration": i, "dice": i / 20} for i in range(0, 20, 5)],
        {
            "train": [{"iteration": i, "loss": 1.0 / (i + 1) ** 2} for i in range(20)],
            "val": [{"iteration": i, "dice": i / 20} for i in range(0, 20, 5)],
        },
        {
            "iteration": list(range(20)),
            "loss": [1.0 / (i + 1) ** 2 for i in range(20)],
            "dice": [i / 20 for i in range(20)],
        },
    ],
)
def test_training_curve_understands_each_history_format(history) -> None:  # type: ignore[no-untyped-def]
    fig = training_curve_figure(history)
    loss_ax, val_ax = fig.axes
    x, y = loss_ax.lines[0].get_data()
    np.testing.assert_allclose(x, np.arange(20))
    np.testing.assert_allclose(y, 1.0 / (np.arange(20) + 1) ** 2)
    assert loss_ax.get_yscale() == "log"  # loss spans more than 20x
    assert [line.get_label() for line in val_ax.lines] == ["dice"]
    assert val_ax.lines[0].get_ydata()[-1] == pytest.approx(max(val_ax.lines[0].get_ydata()))


def test_training_curve_without_values_is_an_error() -> None:
    with pytest.raises(InputError, match="no 'loss'"):
        training_curve_figure([{"iteration": 1, "lr": 0.1}])
    with pytest.raises(InputError, match="list of records"):
        training_curve_figure("history.json")


def test_per_case_bar_figure_sorted_coloured_and_marks_missing() -> None:
    recs = [
        case_record("c1", {"a": {"hd95": 3.0}, "b": {"hd95": 5.0}}, site="X"),
        case_record("c2", {"a": {"hd95": 1.0}, "b": {"hd95": math.nan}}, site="Y"),
        case_record("c3", {"a": {"hd95": math.nan}, "b": {"hd95": math.nan}}, site="X"),
    ]
    fig = per_case_bar_figure(recs, metric="hd95")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == [0.0, 1.0, 4.0]  # c3 missing (drawn at 0), c2 = 1 (b missing), c1 = mean(3, 5)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c3", "c2", "c1"]
    assert ax.patches[0].get_facecolor() == ax.patches[2].get_facecolor() != ax.patches[1].get_facecolor()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["X", "Y"] and "missing" in labels
    one = per_case_bar_figure(recs, metric="hd95", class_name="a", color_by=None)
    assert [p.get_height() for p in one.axes[0].patches] == [0.0, 1.0, 3.0]
    with pytest.raises(InputError, match="no class 'c'"):
        per_case_bar_figure(recs, metric="hd95", class_name="c")
    with pytest.raises(InputError, match="no metric 'dice'"):
        per_case_bar_figure(recs, metric="dice")


def test_training_curve_reads_the_engine_history_json_layout() -> None:
    # medlens.engine writes {"train": [{iteration, loss, lr, s_per_it}], "val": [{iteration, **metrics}]}.
    history = {
        "train": [{"iteration": i, "loss": 2.0 - i / 10, "lr": 1e-3, "s_per_it": 0.2} for i in range(10)],
        "val": [{"iteration": i, "dice": 0.1 * i, "loss": 1.5 - i / 10} for i in (3, 6, 9)],
    }
    loss_ax, val_ax = training_curve_figure(history).axes
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), 2.0 - np.arange(10) / 10)
    assert sorted(line.get_label() for line in val_ax.lines) == ["dice", "loss"]  # no lr, no timing
    np.testing.assert_allclose(val_ax.lines[0].get_xdata(), [3, 6, 9])
