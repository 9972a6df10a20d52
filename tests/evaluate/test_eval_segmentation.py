"""Segmentation metrics against cases whose answers are known by hand."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
import torch

from medlens.errors import InputError
from medlens.evaluate import METRICS, segmentation_metrics

torch.set_num_threads(1)

ONE = {"background": 0, "fg": 1}


def cube(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...], value: int = 1) -> np.ndarray:
    a = np.zeros(shape, dtype=np.uint8)
    a[tuple(slice(s, e) for s, e in zip(lo, hi, strict=True))] = value
    return a


def test_two_cubes_known_overlap_give_exact_dice_and_jaccard() -> None:
    # 10^3 cubes overlapping in a 7x10x10 block, next to a second class that must not interfere.
    truth = cube((30, 20, 20), (2, 2, 2), (12, 12, 12))
    pred = cube((30, 20, 20), (5, 2, 2), (15, 12, 12))
    truth[20:25, 5:10, 5:10] = 2
    pred[20:25, 5:10, 5:10] = 2
    m = segmentation_metrics(pred, truth, (1.0, 1.0, 1.0), {"background": 0, "a": 1, "b": 2})
    inter, size = 7 * 10 * 10, 1000
    assert m["a"]["dice"] == pytest.approx(2 * inter / (2 * size), abs=1e-6)
    assert m["a"]["jaccard"] == pytest.approx(inter / (2 * size - inter), abs=1e-6)
    assert m["b"] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "nsd": 1.0}
    assert list(m) == ["a", "b"] and list(m["a"]) == list(METRICS)


def test_shifted_square_2d_anisotropic_distances_by_hand() -> None:
    # A 10x10 square shifted by d=2 pixels along i; spacing 0.5 mm along i and 2 mm along j (2 mm > d * 0.5,
    # so the nearest surface is always found along i). Surface (ring) pixels of each square: 36, of which
    # 18 lie 1.0 mm from the other ring (its leading column and the far column's inside), 2 lie 0.5 mm
    # (the row pixels one step in) and 16 lie on the other ring (0 mm). Both directions are symmetric.
    n, d, s_i, s_j = 10, 2, 0.5, 2.0
    truth = cube((20, 14), (3, 2), (3 + n, 2 + n))
    pred = cube((20, 14), (3 + d, 2), (3 + d + n, 2 + n))
    m = segmentation_metrics(pred, truth, (s_i, s_j), ONE, tolerance_mm=0.75)["fg"]
    ring = 4 * n - 4
    at_1mm, at_half, at_0 = 2 * n - 2, 2, 2 * n - 4
    assert at_1mm + at_half + at_0 == ring
    assert m["dice"] == pytest.approx((n - d) / n)
    assert m["jaccard"] == pytest.approx((n - d) / (n + d))
    assert m["hd95"] == pytest.approx(d * s_i)  # 95th percentile falls among the 1.0 mm distances
    assert m["asd"] == pytest.approx((at_1mm * 1.0 + at_half * 0.5) / ring, rel=1e-5)
    assert m["nsd"] == pytest.approx((at_0 + at_half) / ring, rel=1e-5)
    assert segmentation_metrics(pred, truth, (s_i, s_j), ONE, tolerance_mm=1.0)["fg"]["nsd"] == pytest.approx(
        1.0
    )
    assert segmentation_metrics(pred, truth, (s_i, s_j), ONE, tolerance_mm=0.4)["fg"]["nsd"] == pytest.approx(
        at_0 / ring, rel=1e-5
    )


def test_shifted_cube_3d_anisotropic_distances_by_hand() -> None:
    # An 8^3 cube shifted by d=2 voxels along k with spacing (2.0, 1.5, 0.5) mm: every distance is along k.
    # Surface voxels per cube: n^3 - (n-2)^3. At d*0.5 = 1 mm: the leading face (n^2) and the inside of the
    # trailing face ((n-2)^2); at 0.5 mm: the side ring one layer in (4n-4); the rest lie on the other surface.
    n, d, sp = 8, 2, (2.0, 1.5, 0.5)
    truth = cube((14, 14, 16), (3, 3, 3), (3 + n, 3 + n, 3 + n))
    pred = cube((14, 14, 16), (3, 3, 3 + d), (3 + n, 3 + n, 3 + n + d))
    surface = n**3 - (n - 2) ** 3
    far, half = n**2 + (n - 2) ** 2, 4 * n - 4
    on = surface - far - half
    m = segmentation_metrics(pred, truth, sp, ONE, tolerance_mm=0.75)["fg"]
    assert m["dice"] == pytest.approx((n - d) / n)
    assert m["jaccard"] == pytest.approx((n - d) / (n + d))
    assert m["hd95"] == pytest.approx(d * sp[2])
    assert m["asd"] == pytest.approx((far * d * sp[2] + half * sp[2]) / surface, rel=1e-5)
    assert m["nsd"] == pytest.approx((on + half) / surface, rel=1e-5)
    # Distances scale with the spacing along the shift and ignore the spacing across it.
    m2 = segmentation_metrics(pred, truth, (2.0, 1.5, 0.25), ONE)["fg"]
    assert m2["hd95"] == pytest.approx(d * 0.25)


def test_per_class_tolerance() -> None:
    # Class a: the shifted square of the 2D case (distances 0, 0.5 and 1.0 mm); class b: a perfect match.
    truth = cube((20, 14), (3, 2), (13, 12))
    pred = cube((20, 14), (5, 2), (15, 12))
    truth[16:19, 2:12] = 2
    pred[16:19, 2:12] = 2
    classes = {"a": 1, "b": 2}
    loose = segmentation_metrics(pred, truth, (0.5, 2.0), classes, tolerance_mm={"a": 1.0, "b": 0.1})
    strict = segmentation_metrics(pred, truth, (0.5, 2.0), classes, tolerance_mm={"a": 0.1, "b": 0.1})
    assert loose["a"]["nsd"] == pytest.approx(1.0)
    assert strict["a"]["nsd"] == pytest.approx(16 / 36, rel=1e-5)
    assert loose["b"]["nsd"] == strict["b"]["nsd"] == 1.0
    with pytest.raises(InputError, match="no value for class"):
        segmentation_metrics(pred, truth, (0.5, 2.0), classes, tolerance_mm={"a": 1.0})


def test_edge_cases_empty_masks() -> None:
    empty = np.zeros((12, 12, 12), dtype=np.int16)
    full = cube((12, 12, 12), (3, 3, 3), (8, 8, 8))
    both = segmentation_metrics(empty, empty, None, ONE)["fg"]
    assert both == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "nsd": 1.0}
    for pred, truth in ((empty, full), (full, empty)):  # missed and hallucinated structure
        m = segmentation_metrics(pred, truth, None, ONE)["fg"]
        assert m["dice"] == 0.0 and m["jaccard"] == 0.0 and m["nsd"] == 0.0
        assert math.isnan(m["hd95"]) and math.isnan(m["asd"])


def test_cropping_matches_monai_on_the_full_volume() -> None:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    g = np.indices((40, 36, 30))
    rng = np.random.default_rng(3)
    truth = np.zeros((40, 36, 30), dtype=np.int64)
    pred = np.zeros_like(truth)
    for value, (c, r) in enumerate((((12, 18, 15), 8), ((28, 18, 14), 6)), start=1):
        truth[((g - np.reshape(c, (3, 1, 1, 1))) ** 2).sum(0) < r * r] = value
        jitter = np.reshape(np.add(c, rng.integers(-2, 3, 3)), (3, 1, 1, 1))
        pred[((g - jitter) ** 2).sum(0) < (r + 1) ** 2] = value
    sp = (0.8, 1.0, 2.0)
    ours = segmentation_metrics(pred, truth, sp, {"background": 0, "x": 1, "y": 2})
    oh_p = torch.from_numpy(np.stack([pred == v for v in range(3)])[None]).float()
    oh_t = torch.from_numpy(np.stack([truth == v for v in range(3)])[None]).float()
    hd = compute_hausdorff_distance(oh_p, oh_t, percentile=95, spacing=sp)[0]
    asd = compute_average_surface_distance(oh_p, oh_t, symmetric=True, spacing=sp)[0]
    for i, name in enumerate(("x", "y")):
        assert ours[name]["hd95"] == pytest.approx(float(hd[i]), rel=1e-6)
        assert ours[name]["asd"] == pytest.approx(float(asd[i]), rel=1e-6)
        assert 0 < ours[name]["hd95"] < 10


def test_accepts_tensors_float_labels_and_bool() -> None:
    truth = cube((16, 16), (2, 2), (10, 10))
    pred = cube((16, 16), (4, 2), (12, 10))
    ref = segmentation_metrics(pred, truth, (1.0, 1.0), ONE)
    assert segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(truth), (1, 1), ONE) == ref
    assert segmentation_metrics(pred.astype(np.float32), truth.astype(bool), (1, 1), ONE) == ref


def test_unknown_label_values_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    truth = cube((10, 10), (2, 2), (6, 6))
    pred = truth.copy()
    pred[8, 8] = 7
    with caplog.at_level(logging.WARNING, logger="medlens.evaluate.segmentation"):
        segmentation_metrics(pred, truth, None, ONE)
    assert "[7]" in caplog.text


@pytest.mark.parametrize(
    ("pred", "truth", "spacing", "classes", "match"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), None, ONE, "resample the prediction"),
        (np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 4)), None, ONE, "drop the channel axis"),
        (np.full((4, 4), 0.3), np.zeros((4, 4)), None, ONE, "non-integer"),
        (np.zeros((4, 4)), np.zeros((4, 4)), (1.0, 0.0), ONE, "positive finite"),
        (np.zeros((4, 4)), np.zeros((4, 4)), (1.0,), ONE, "one per spatial axis"),
        (np.zeros((4, 4)), np.zeros((4, 4)), None, {"background": 0}, "no foreground class"),
        (np.zeros((4, 4)), np.zeros((4, 4)), None, {"a": 1.5}, "integer label value"),
    ],
)
def test_bad_input_names_the_problem(pred, truth, spacing, classes, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=match):
        segmentation_metrics(pred, truth, spacing, classes)


def test_a_realistic_volume_is_fast() -> None:
    sh = (100, 120, 100)
    g = np.indices(sh)
    truth = np.zeros(sh, np.int16)
    pred = np.zeros(sh, np.int16)
    for c, (cx, r) in enumerate([(30, 15), (50, 20), (70, 12)], 1):
        truth[((g[0] - cx) ** 2 + (g[1] - 60) ** 2 + (g[2] - 50) ** 2) < r * r] = c
        pred[((g[0] - cx - 2) ** 2 + (g[1] - 61) ** 2 + (g[2] - 50) ** 2) < r * r] = c
    classes = {"background": 0, "a": 1, "b": 2, "c": 3}
    segmentation_metrics(pred[:20], truth[:20], (1.0, 0.8, 2.5), classes)  # warm-up (imports)
    t0 = time.perf_counter()
    m = segmentation_metrics(pred, truth, (1.0, 0.8, 2.5), classes)
    elapsed = time.perf_counter() - t0
    assert all(0.7 < m[c]["dice"] < 1.0 for c in ("a", "b", "c"))
    assert elapsed < 3.0, f"took {elapsed:.2f} s (about 0.25 s expected on one core)"
