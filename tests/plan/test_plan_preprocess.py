"""Preprocessing and its inversion: oblique, anisotropic, cropped, relabelled inputs come back exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.io.image import Image
from medlens.plan import PreprocessInfo, invert, invert_to_image, preprocess_case


def oblique_case(shape: tuple[int, int, int] = (40, 36, 12)) -> tuple[Image, Image]:
    """0.8 x 0.8 x 3.1 mm voxels, axes swapped and flipped against RAS and rotated 25 degrees; the image is
    zero near its border (so cropping matters) and the label has two classes, values 0, 1 and 4."""
    rng = np.random.default_rng(0)
    th = np.radians(25)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    swap = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # i along -y, j along +x
    affine = np.eye(4)
    affine[:3, :3] = rot @ swap @ np.diag([0.8, 0.8, 3.1])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    img = np.zeros(shape, np.float32)
    img[5:35, 4:30, 2:11] = rng.normal(100, 20, (30, 26, 9))
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lab = np.zeros(shape, np.uint8)
    lab[((ii - 20) ** 2 + (jj - 15) ** 2) * 0.64 + ((kk - 6) * 3.1) ** 2 < 81] = 1
    lab[((ii - 25) ** 2 + (jj - 20) ** 2) * 0.64 + ((kk - 6) * 3.1) ** 2 < 16] = 4
    return Image(img[None], affine, modality="MR"), Image(lab[None], affine)


PRE = {"normalization": {"0": {"scheme": "zscore", "use_nonzero_mask": True}}, "label_values": [0, 1, 4]}


def dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    return 2 * float(((a == c) & (b == c)).sum()) / float((a == c).sum() + (b == c).sum())


def centroid_world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def test_identity_spacing_inverts_exactly() -> None:
    image, label = oblique_case()
    data, seg, info = preprocess_case(
        image, label, {"preprocessing": {**PRE, "target_spacing": None}}, case_id="c1"
    )
    assert seg is not None and data.dtype == np.float32 and seg.dtype == np.uint8
    assert info.spacing == pytest.approx([0.8, 0.8, 3.1])  # canonical order: the swap was undone
    assert info.orientation != [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]  # a real reorientation happened
    assert info.cropped_shape == [26, 30, 9] and data.shape == (1, 26, 30, 9)  # cropped to the nonzero box
    assert set(np.unique(seg).tolist()) == {0, 1, 2}  # values 0, 1, 4 -> contiguous indices
    back = invert(seg[0], info, is_label=True)
    assert back.shape == label.spatial_shape
    np.testing.assert_array_equal(back, label.array[0])
    wrapped = invert_to_image(seg, info, is_label=True)
    assert wrapped.same_geometry(label)
    np.testing.assert_array_equal(wrapped.array, label.array)
    # the preprocessed grid's affine puts the lesion where it was in the world
    pre_aff = np.asarray(info.affine)
    np.testing.assert_allclose(
        centroid_world(seg[0] == 2, pre_aff), centroid_world(label.array[0] == 4, label.affine), atol=1e-6
    )


def test_resampled_anisotropic_inverts_with_dice_close_to_one() -> None:
    image, label = oblique_case()
    cfg = {"preprocessing": {**PRE, "target_spacing": [1.0, 1.0, 2.0]}}
    _, seg, info = preprocess_case(image, label, cfg)
    assert seg is not None
    assert info.separate_axis == 2 and info.spacing == pytest.approx([1.0, 1.0, 2.0], rel=0.05)
    back = invert_to_image(seg, info, is_label=True)
    assert back.same_geometry(label)
    assert dice(back.array[0], label.array[0], 1) > 0.95
    assert dice(back.array[0], label.array[0], 4) > 0.85
    world_pre = centroid_world(seg[0] == 1, np.asarray(info.affine))
    world_in = centroid_world(label.array[0] == 1, label.affine)
    assert np.linalg.norm(world_pre - world_in) < 0.5  # mm
    # continuous maps (e.g. probabilities) invert too, with background padding outside the crop
    probs = invert(np.stack([seg[0] == 0, seg[0] == 1]).astype(np.float32), info, is_label=False)
    assert probs.shape == (2, *label.spatial_shape)
    assert dice((probs[1] > 0.5).astype(np.uint8), (label.array[0] == 1).astype(np.uint8), 1) > 0.95


def test_normalisation_schemes() -> None:
    image, _ = oblique_case()
    data, _, info = preprocess_case(image, None, {"preprocessing": {**PRE, "target_spacing": None}})
    inside = data[0] != 0
    assert abs(data[0][inside].mean()) < 1e-3 and abs(data[0][inside].std() - 1) < 1e-3
    assert info.normalization[0]["use_nonzero_mask"] is True
    ct = {"normalization": {"0": {"scheme": "ct", "clip": [60.0, 140.0], "mean": 100.0, "std": 20.0}}}
    data, _, _ = preprocess_case(image, None, ct)
    assert data.min() == pytest.approx(-2.0) and data.max() == pytest.approx(2.0)
    data, _, _ = preprocess_case(image, None, {"normalization": {"0": {"scheme": "zscore"}}})
    assert abs(data.mean()) < 1e-3 and abs(data.std() - 1) < 1e-3


def test_info_round_trips_through_json() -> None:
    image, label = oblique_case()
    _, seg, info = preprocess_case(image, label, {**PRE, "target_spacing": [1.0, 1.0, 2.0]})
    again = PreprocessInfo.from_json(json.loads(json.dumps(info.to_json())))
    assert again == info
    assert seg is not None
    np.testing.assert_array_equal(invert(seg, again, True), invert(seg, info, True))


def test_2d_image_with_flipped_axis() -> None:
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(1, 30, 20)).astype(np.float32)
    lab = (arr > 1).astype(np.uint8)
    affine = np.array([[0.5, 0, 0], [0, -0.5, 10.0], [0, 0, 1]])  # rows run towards -y
    img, seg_img = Image(arr, affine), Image(lab, affine)
    data, seg, info = preprocess_case(img, seg_img, {"target_spacing": [0.5, 0.5], "label_values": [0, 1]})
    assert seg is not None and data.shape == (1, 30, 20)
    np.testing.assert_array_equal(seg[0], lab[0][:, ::-1])  # reoriented to RA
    np.testing.assert_array_equal(invert(seg, info, True), lab)


def test_bad_inputs_name_the_case() -> None:
    image, label = oblique_case()
    with pytest.raises(InputError, match=r"c7: label values \[4\] are not classes of the plan"):
        preprocess_case(image, label, {"label_values": [0, 1]}, case_id="c7")
    other = Image(image.array[:, :-1], image.affine)
    with pytest.raises(InputError, match=r"c7: channel 1 .* is not on the grid of channel 0"):
        preprocess_case([image, other], None, {}, case_id="c7")
    with pytest.raises(InputError, match=r"c7: label .* has shape"):
        preprocess_case(image, Image(label.array[:, :-1], label.affine), {}, case_id="c7")
