"""Saliency overlays: one panel per method, the right slice, the map where it belongs, small PNGs."""

from __future__ import annotations

import io

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.report.explain_figures import explanation_figure


def maps_2d() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (20, 16))
    image[5:9, 3:7] += 4
    hot = np.zeros((20, 16))
    hot[5:9, 3:7] = 1.0
    return image, {"gradcam": hot, "occlusion": hot * 0.5, "integrated_gradients": np.zeros((20, 16))}


def png_size(fig: object) -> int:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    return len(buf.getvalue())


def test_2d_figure_has_the_image_and_one_overlay_per_method() -> None:
    image, maps = maps_2d()
    fig = explanation_figure(image[None], maps, title="case 7")  # a leading channel axis is dropped
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["image", "Grad-CAM", "Occlusion", "Integrated gradients"]
    assert fig.get_suptitle() == "case 7"
    # The Grad-CAM overlay is opaque exactly where the map is (display: transposed, row 0 on top).
    rgba = panels[1].images[1].get_array()
    np.testing.assert_allclose(rgba[..., 3], 0.7 * maps["gradcam"].T)
    assert panels[1].images[0].origin == "upper"
    assert not panels[3].images[1].get_array()[..., 3].any()  # a zero map hides nothing
    assert png_size(fig) < 150_000


def test_3d_figure_shows_the_slice_with_most_saliency_or_the_chosen_one() -> None:
    shape = (12, 10, 8)
    image = np.random.default_rng(1).normal(0, 1, shape)
    sal = np.zeros(shape)
    sal[4:7, 3:6, 5] = 1.0
    sal[4:7, 3:6, 2] = 0.3
    fig = explanation_figure(image, {"gradcam": sal}, spacing=(1.0, 1.0, 2.5))
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert titles == ["image (k = 5)", "Grad-CAM"]
    np.testing.assert_allclose(fig.axes[1].images[1].get_array()[..., 3], 0.7 * sal[:, :, 5].T)
    assert fig.axes[1].images[0].origin == "lower"

    fig = explanation_figure(image, {"gradcam": sal}, axis=0, slice_index=4)
    assert fig.axes[0].get_title() == "image (i = 4)"
    np.testing.assert_allclose(fig.axes[1].images[1].get_array()[..., 3], 0.7 * sal[4].T)


def test_sanity_results_are_written_under_the_panels() -> None:
    image, maps = maps_2d()
    checks = {
        "gradcam": {"spearman": 0.12, "passed": True},
        "occlusion": {"spearman": 0.97, "passed": False},
        "integrated_gradients": {"spearman": None, "passed": False},
    }
    fig = explanation_figure(image, maps, checks=checks)
    labels = [a.get_xlabel() for a in fig.axes[1:4]]
    assert labels == [
        "randomisation: rho +0.12, passed",
        "randomisation: rho +0.97, FAILED",
        "randomisation: n/a, FAILED",
    ]
    assert fig.axes[2].xaxis.label.get_color() == "#C00000"


def test_bad_inputs_are_named() -> None:
    image, _ = maps_2d()
    with pytest.raises(InputError, match="at least one"):
        explanation_figure(image, {})
    with pytest.raises(InputError, match=r"'gradcam' map has shape \(4, 4\)"):
        explanation_figure(image, {"gradcam": np.zeros((4, 4))})
    with pytest.raises(InputError, match="slice_index=9"):
        explanation_figure(np.zeros((4, 4, 3)), {"gradcam": np.zeros((4, 4, 3))}, slice_index=9)
