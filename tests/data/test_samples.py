"""The embedded sample datasets: built small (few subjects, 4 mm voxels) so the whole file stays fast."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from medlens.data.dataset import Dataset, load_dataset
from medlens.data.samples import SAMPLES, build_sample
from medlens.errors import InputError
from medlens.io import read_image

RES = 4.0  # mm: coarse, so a subject takes a few tens of milliseconds


def _arrays(ds: Dataset, key: str = "image") -> dict[str, np.ndarray]:
    out = {}
    for case in ds.cases:
        rel = case.image[0] if key == "image" else case.label
        assert isinstance(rel, str)
        out[case.id] = read_image(ds.path(rel)).array[0]
    return out


def _mask(ds: Dataset, case_id: str) -> np.ndarray:
    pattern = ds.extra["lesion_masks"]
    return read_image(ds.path(pattern.format(id=case_id))).array[0]


@pytest.fixture(scope="module")
def tissue(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return build_sample("brain-tissue", tmp_path_factory.mktemp("s") / "tissue", subjects=4, resolution=RES)


@pytest.fixture(scope="module")
def lesion_seg(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    out = tmp_path_factory.mktemp("s") / "lesion-seg"
    return build_sample("brain-lesion", out, subjects=6, task="segmentation", resolution=RES)


@pytest.fixture(scope="module")
def lesion_det(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    out = tmp_path_factory.mktemp("s") / "lesion-det"
    return build_sample("brain-lesion", out, subjects=6, task="detection", resolution=RES)


@pytest.fixture(scope="module")
def lesion_cls(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return build_sample(
        "brain-lesion", tmp_path_factory.mktemp("s") / "lesion-cls", subjects=8, resolution=RES
    )


def test_registry_describes_both_samples() -> None:
    assert set(SAMPLES) == {"brain-tissue", "brain-lesion"}
    assert SAMPLES["brain-lesion"].default_task == "classification"
    assert SAMPLES["brain-lesion"].default_dim == {"classification": 2, "segmentation": 3, "detection": 3}


def test_same_seed_gives_identical_data_and_another_seed_other_data(tissue: Dataset, tmp_path: Path) -> None:
    again = build_sample("brain-tissue", tmp_path / "again", subjects=4, resolution=RES)
    other = build_sample("brain-tissue", tmp_path / "other", subjects=4, resolution=RES, seed=1)
    a, b, c = _arrays(tissue), _arrays(again), _arrays(other)
    assert a.keys() == b.keys() == c.keys()
    for cid in a:
        assert a[cid].dtype == np.int16
        np.testing.assert_array_equal(a[cid], b[cid])
        assert not np.array_equal(a[cid], c[cid])
    assert (tissue.root / "dataset.json").read_text() == (again.root / "dataset.json").read_text()
    # Subject k does not depend on how many subjects are built.
    fewer = build_sample("brain-tissue", tmp_path / "fewer", subjects=2, resolution=RES)
    for cid, arr in _arrays(fewer).items():
        np.testing.assert_array_equal(arr, a[cid])


def test_tissue_dataset_structure_and_metadata(tissue: Dataset) -> None:
    ds = load_dataset(tissue.root)
    assert ds.task == "segmentation" and ds.ndim == 3
    assert ds.labels == {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
    assert ds.channels == {0: "T1"} and ds.modalities == {0: "MR"}
    assert "simulated" in ds.description.lower() and "MNI ICBM152" in ds.description
    assert [c.id for c in ds.training] == ["sub-001", "sub-002", "sub-003"]
    assert [c.id for c in ds.test] == ["sub-004"]
    assert [c.site for c in ds.cases] == ["site-A", "site-B", "site-C", "site-A"]
    for case in ds.cases:
        assert case.patient_id == case.id
        assert case.meta["sex"] in ("F", "M") and 20 <= case.meta["age"] <= 85
        assert case.meta["simulated"] is True
        image, label = read_image(ds.path(case.image[0])), read_image(ds.path(str(case.label)))
        assert image.same_geometry(label) and image.spacing == (RES, RES, RES)
        assert image.modality == "MR"
        # Skull-stripped: the image is zero exactly where the label is background.
        np.testing.assert_array_equal(image.array[0] > 0, label.array[0] > 0)
        # The head fits in the grid with background all around.
        lab = label.array[0]
        assert not lab[[0, -1]].any() and not lab[:, [0, -1]].any() and not lab[:, :, [0, -1]].any()


def test_tissue_labels_are_the_four_classes_with_t1_intensity_order(tissue: Dataset) -> None:
    images, labels = _arrays(tissue), _arrays(tissue, "label")
    for cid, lab in labels.items():
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3}
        fractions = np.bincount(lab[lab > 0].ravel(), minlength=4)[1:] / (lab > 0).sum()
        assert np.all(fractions > 0.01), fractions  # CSF is the smallest: ventricles, ~3% at 4 mm
        means = [images[cid][lab == c].mean() for c in (1, 2, 3)]
        assert means[2] > means[1] > means[0], (cid, means)  # T1: WM > GM > CSF


def _noise_and_contrast(image: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """Relative noise (neighbour differences deep in WM) and relative GM/WM contrast of one volume."""
    wm = ndi.binary_erosion(label == 3)
    pair = wm[1:] & wm[:-1]
    diff = (image[1:].astype(float) - image[:-1])[pair]
    wm_level = float(np.median(image[label == 3]))
    noise = float(np.median(np.abs(diff - np.median(diff)))) * 1.4826 / np.sqrt(2) / wm_level
    contrast = (wm_level - float(np.median(image[label == 2]))) / wm_level
    return noise, contrast


def test_sites_differ_measurably_in_noise_and_contrast(tissue: Dataset) -> None:
    images, labels = _arrays(tissue), _arrays(tissue, "label")
    stats = {
        tissue.case(cid).site: _noise_and_contrast(images[cid], labels[cid])
        for cid in ("sub-001", "sub-002", "sub-003")
    }
    noise = {site: s[0] for site, s in stats.items()}
    contrast = {site: s[1] for site, s in stats.items()}
    assert noise["site-C"] > 1.5 * noise["site-A"], noise
    assert noise["site-B"] > 1.2 * noise["site-A"], noise
    assert contrast["site-C"] > contrast["site-B"] + 0.05, contrast
    levels = {tissue.case(cid).site: np.median(images[cid][labels[cid] == 3]) for cid in images}
    assert levels["site-C"] > 1.5 * levels["site-B"]  # scanner intensity scales differ too


def test_tissue_2d_slices_share_one_size_and_the_patient(tmp_path: Path) -> None:
    ds = build_sample("brain-tissue", tmp_path / "t2d", subjects=2, dim=2, resolution=RES)
    assert ds.ndim == 2 and len(ds.training) == 12 and ds.test == []
    shapes = set()
    for case in ds.cases:
        img, lab = read_image(ds.path(case.image[0])), read_image(ds.path(str(case.label)))
        assert img.ndim == 2 and img.same_geometry(lab)
        shapes.add(img.spatial_shape)
        assert case.id.startswith(case.patient_id + "_z")
        assert len(np.unique(lab.array)) == 4  # slices go through the brain, not its tips
    assert len(shapes) == 1
    assert {c.patient_id for c in ds.cases} == {"sub-001", "sub-002"}


def test_lesion_segmentation_masks_are_binary_hypointense_and_in_the_brain(lesion_seg: Dataset) -> None:
    ds = load_dataset(lesion_seg.root)
    assert ds.labels == {"background": 0, "lesion": 1} and ds.ndim == 3
    images, masks = _arrays(ds), _arrays(ds, "label")
    darker = []
    for cid, mask in masks.items():
        assert set(np.unique(mask).tolist()) <= {0, 1}
        lesion = mask > 0
        assert np.all(images[cid][lesion] > 0)  # inside the skull-stripped brain
        if lesion.any():
            ring = ndi.binary_dilation(lesion, iterations=2) & ~lesion & (images[cid] > 0)
            darker.append(images[cid][lesion].mean() < images[cid][ring].mean())
    assert len(darker) >= 3 and all(darker)  # T1 lesions are hypointense


def test_detection_boxes_are_the_tight_boxes_of_the_connected_lesions(lesion_det: Dataset) -> None:
    ds = load_dataset(lesion_det.root)
    assert ds.task == "detection"
    n_boxes = 0
    for case in ds.cases:
        mask = _mask(ds, case.id) > 0
        boxes = case.boxes or []
        assert case.box_labels == [1] * len(boxes)
        assert (len(boxes) > 0) == bool(mask.any())
        covered = np.zeros_like(mask)
        for box in boxes:
            assert all(isinstance(v, int) for v in box)
            sl = tuple(slice(box[a], box[a + 3]) for a in range(3))
            inside = mask[sl]
            # Tight: every face of the box touches the lesion.
            for axis in range(3):
                assert np.moveaxis(inside, axis, 0)[0].any() and np.moveaxis(inside, axis, 0)[-1].any()
            covered[sl] = True
        assert not (mask & ~covered).any()  # every lesion voxel is in a box
        n_boxes += len(boxes)
    assert n_boxes >= 3


def test_lesion_classification_slices_are_balanced_and_labels_match_masks(lesion_cls: Dataset) -> None:
    ds = load_dataset(lesion_cls.root)
    assert ds.task == "classification" and ds.classification_type == "binary" and ds.ndim == 2
    assert ds.labels == {"no lesion": 0, "lesion": 1}
    shapes = set()
    for case in ds.cases:
        img = read_image(ds.path(case.image[0]))
        shapes.add(img.spatial_shape)
        assert case.label == int(_mask(ds, case.id).any())  # positive iff the slice holds lesion voxels
        assert case.id.startswith(case.patient_id + "_z")
    assert len(shapes) == 1
    for section in (ds.training, ds.test):
        for site in ("site-A", "site-B", "site-C"):
            labels = [c.label for c in section if c.site == site]
            assert labels.count(0) == labels.count(1), (site, labels)
    assert sum(c.label == 1 for c in ds.cases) >= 10


def test_lesion_3d_classification_labels_subjects(tmp_path: Path) -> None:
    ds = build_sample(
        "brain-lesion", tmp_path / "c3", subjects=4, task="classification", dim=3, resolution=RES
    )
    assert ds.ndim == 3 and len(ds.cases) == 4
    for case in ds.cases:
        assert case.label == int(_mask(ds, case.id).any())


def test_interrupted_build_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medlens.data.samples import build

    real = build.write_image
    calls = []

    def failing(image, path):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(image, path)

    monkeypatch.setattr(build, "write_image", failing)
    with pytest.raises(KeyboardInterrupt):
        build_sample("brain-tissue", tmp_path / "broken", subjects=3, resolution=RES)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "brain-tisue"}, "Did you mean 'brain-tissue'"),
        ({"task": "detection"}, "unknown brain-tissue task 'detection'"),
        ({"dim": 4}, "dim=4"),
        ({"subjects": 0}, "subjects=0"),
        ({"resolution": 0.2}, "resolution=0.2"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_arguments_raise_input_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"name": "brain-tissue", "out": tmp_path / "x", **kwargs}
    with pytest.raises(InputError, match=message):
        build_sample(**args)
    assert not (tmp_path / "x").exists()


def test_existing_folder_needs_overwrite(tissue: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="overwrite"):
        build_sample("brain-tissue", out, subjects=1, resolution=RES)
    assert (out / "keep.txt").read_text() == "mine"
    ds = build_sample("brain-tissue", out, subjects=1, resolution=RES, overwrite=True)
    assert not (out / "keep.txt").exists() and json.loads(ds.json_path.read_text())["numTraining"] == 1


@pytest.mark.skipif(
    importlib.util.find_spec("medlens.data.check") is None, reason="medlens.data.check not written yet"
)
@pytest.mark.parametrize("which", ["tissue", "lesion_seg", "lesion_det", "lesion_cls"])
def test_samples_pass_the_dataset_check(which: str, request: pytest.FixtureRequest) -> None:
    from medlens.data.check import check_dataset

    ds = request.getfixturevalue(which)
    report = check_dataset(ds.root)
    assert report.ok, report.to_text()
