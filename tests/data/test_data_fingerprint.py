"""The fingerprint against numbers computed by hand on tiny volumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medlens.data.dataset import load_dataset
from medlens.data.fingerprint import compute_fingerprint, read_fingerprint, write_fingerprint
from medlens.errors import DatasetError


@pytest.fixture
def hand_dataset(tmp_path: Path, volume) -> Path:
    """Two training cases with known geometry, crop boxes, classes and foreground values, and a test case."""
    root = tmp_path / "hand"
    # case a: 8x8x8 at (1, 1, 2) mm; nonzero box 4x3x5; label 1 = 8 voxels of 10, label 2 = 2 voxels of 30
    img = np.zeros((8, 8, 8), np.float32)
    lab = np.zeros((8, 8, 8), np.uint8)
    img[2:6, 1:4, 3:8] = 5
    img[2:4, 1:3, 3:5], lab[2:4, 1:3, 3:5] = 10, 1
    img[4:6, 1:2, 3:4], lab[4:6, 1:2, 3:4] = 30, 2
    volume(root / "images" / "a.nii.gz", img, spacing=(1.0, 1.0, 2.0))
    volume(root / "labels" / "a.nii.gz", lab, spacing=(1.0, 1.0, 2.0))
    # case b: 8x8x6 at (1, 1, 3) mm, nonzero everywhere; label 1 = 4 voxels of 20
    img = np.ones((8, 8, 6), np.float32)
    lab = np.zeros((8, 8, 6), np.uint8)
    img[0:2, 0:2, 0:1], lab[0:2, 0:2, 0:1] = 20, 1
    volume(root / "images" / "b.nii.gz", img, spacing=(1.0, 1.0, 3.0))
    volume(root / "labels" / "b.nii.gz", lab, spacing=(1.0, 1.0, 3.0))
    # a test case with extreme values that must not count
    volume(root / "images" / "t.nii.gz", np.full((4, 4, 4), 1000.0, np.float32), spacing=(5.0, 5.0, 5.0))
    volume(root / "labels" / "t.nii.gz", np.ones((4, 4, 4), np.uint8), spacing=(5.0, 5.0, 5.0))
    raw = {
        "name": "hand", "task": "segmentation", "channel_names": {"0": "T2"}, "modality": {"0": "MR"},
        "labels": {"background": 0, "one": 1, "two": 2},
        "training": [
            {"id": "a", "image": "images/a.nii.gz", "label": "labels/a.nii.gz", "patient_id": "P", "site": "X"},
            {"id": "b", "image": "images/b.nii.gz", "label": "labels/b.nii.gz", "patient_id": "P", "site": "Y"},
            {"id": "t", "image": "images/t.nii.gz", "label": "labels/t.nii.gz", "split": "test"},
        ],
    }  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(raw))
    return root


def test_segmentation_fingerprint_matches_hand_computation(hand_dataset: Path) -> None:
    fp = compute_fingerprint(load_dataset(hand_dataset))
    assert fp["medlens_fingerprint"] == 1 and fp["dataset"] == "hand" and fp["task"] == "segmentation"
    assert (fp["ndim"], fp["num_cases"], fp["num_channels"]) == (3, 2, 1)
    assert fp["modalities"] == {"0": "MR"} and fp["channel_names"] == {"0": "T2"}
    assert fp["spacing"] == {
        "median": [1, 1, 2.5], "min": [1, 1, 2], "max": [1, 1, 3], "p10": [1, 1, 2.1], "p90": [1, 1, 2.9]
    }  # fmt: skip
    assert fp["shape"] == {"median": [8, 8, 7], "min": [8, 8, 6], "max": [8, 8, 8]}
    assert all(isinstance(v, int) for v in fp["shape"]["min"] + fp["shape_after_crop"]["max"])
    assert fp["shape_after_crop"] == {"median": [6, 5.5, 5.5], "min": [4, 3, 5], "max": [8, 8, 6]}
    assert fp["anisotropy"] == 2.5
    # foreground: 8 x 10, 4 x 20, 2 x 30
    ints = fp["intensity"]["0"]
    mean = (8 * 10 + 4 * 20 + 2 * 30) / 14
    std = math.sqrt((8 * 100 + 4 * 400 + 2 * 900) / 14 - mean**2)
    assert ints["mean"] == pytest.approx(mean) and ints["std"] == pytest.approx(std)
    assert (ints["median"], ints["p00_5"], ints["p99_5"], ints["min"], ints["max"]) == (10, 10, 30, 10, 30)
    total = 8 * 8 * 8 + 8 * 8 * 6
    assert fp["classes"]["names"] == {"0": "background", "1": "one", "2": "two"}
    assert fp["classes"]["voxel_fraction"] == pytest.approx({"1": 12 / total, "2": 2 / total})
    assert fp["classes"]["cases_with_class"] == {"1": 2, "2": 1}
    assert fp["sites"] == {"X": 1, "Y": 1} and fp["patients"] == 1
    assert [c["id"] for c in fp["cases"]] == ["a", "b"]
    assert fp["cases"][0]["classes"] == [1, 2] and fp["cases"][1]["classes"] == [1]
    assert fp["cases"][1]["shape"] == [8, 8, 6] and fp["cases"][1]["spacing"] == [1, 1, 3]


def test_write_and_read_fingerprint(hand_dataset: Path) -> None:
    path = write_fingerprint(hand_dataset)
    assert path == hand_dataset / "fingerprint.json"
    assert read_fingerprint(hand_dataset) == json.loads(path.read_text())
    path.write_text(json.dumps({"medlens_fingerprint": 99}))
    with pytest.raises(DatasetError, match=r"fingerprint\.json: not a version 1"):
        read_fingerprint(hand_dataset)


def test_sampling_is_capped_seeded_and_keeps_exact_extremes(tmp_path: Path, volume) -> None:
    root = tmp_path / "big"
    img = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10)
    volume(root / "a.nii.gz", img)
    (root / "dataset.json").write_text(json.dumps({"task": "classification", "labels": {"n": 0, "y": 1},
                                                   "training": [{"image": "a.nii.gz", "label": 1}]}))  # fmt: skip
    ds = load_dataset(root)
    fp1 = compute_fingerprint(ds, max_voxels_per_case=50, seed=3)
    fp2 = compute_fingerprint(ds, max_voxels_per_case=50, seed=3)
    fp3 = compute_fingerprint(ds, max_voxels_per_case=50, seed=4)
    full = compute_fingerprint(ds)
    assert fp1["intensity"] == fp2["intensity"] != fp3["intensity"]
    assert (fp1["intensity"]["0"]["min"], fp1["intensity"]["0"]["max"]) == (1, 1000)
    assert full["intensity"]["0"]["mean"] == pytest.approx(500.5)
    assert fp1["intensity"]["0"]["mean"] == pytest.approx(500.5, abs=120)  # a sample, not the whole
    assert full["classes"]["counts"] == {"0": 0, "1": 1}


def test_classification_counts_and_2d(tmp_path: Path, volume) -> None:
    root = tmp_path / "cls"
    rng = np.random.default_rng(0)
    entries = []
    for i, lab in enumerate([[1, 0, 1], [0, 0, 1], [0, 0, 0], [1, 1, 1]]):
        volume(root / f"i{i}.nii.gz", rng.normal(size=(3, 6, 5)).astype(np.float32), spacing=(0.5, 0.5))
        entries.append({"image": f"i{i}.nii.gz", "label": lab, "site": "S"})
    raw = {"task": "classification", "classification_type": "multilabel", "labels": {"a": 0, "b": 1, "c": 2},
           "channel_names": {"0": "R", "1": "G", "2": "B"}, "training": entries}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(raw))
    fp = compute_fingerprint(load_dataset(root))
    assert (fp["ndim"], fp["num_channels"]) == (2, 3)
    assert fp["shape"]["median"] == [6, 5] and fp["spacing"]["median"] == [0.5, 0.5] and fp["anisotropy"] == 1
    assert fp["classes"]["counts"] == {"0": 2, "1": 1, "2": 3}
    assert set(fp["intensity"]) == {"0", "1", "2"}
    assert fp["sites"] == {"S": 4} and fp["patients"] == 4


def test_mixed_dimensions_are_an_error(tmp_path: Path, volume) -> None:
    root = tmp_path / "mixed"
    volume(root / "a.nii.gz", np.ones((4, 4, 4)))
    volume(root / "b.nii.gz", np.ones((4, 4)), spacing=(1.0, 1.0))
    raw = {"task": "classification", "labels": {"n": 0, "y": 1},
           "training": [{"image": "a.nii.gz", "label": 0}, {"image": "b.nii.gz", "label": 1}]}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match=r"b\.nii\.gz: case 'b' is 2D"):
        compute_fingerprint(load_dataset(root))
