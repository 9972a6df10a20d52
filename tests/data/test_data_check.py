"""check_dataset lists every problem, each with the file or case it concerns, and passes a clean dataset."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from medlens.data.check import check_dataset


def wheres(report) -> list[str]:
    return [p.where for p in report.problems]


def only_problem(report, where: str, *words: str) -> str:
    """Assert the report has problems only about ``where``, and one mentions every word; return it."""
    assert report.problems, report.to_text()
    assert set(wheres(report)) == {where}, report.to_text()
    text = " | ".join(p.message for p in report.problems)
    for w in words:
        assert w in text, text
    return text


def test_clean_dataset_is_ok(make_seg_dataset) -> None:
    root = make_seg_dataset(n=4)
    report = check_dataset(root)
    assert report.ok, report.to_text()
    assert report.num_cases == 4 and report.problems == [] and report.warnings == []
    assert "OK" in report.to_text()


def test_structure_errors_are_all_listed(make_seg_dataset, edit) -> None:
    root = make_seg_dataset(n=4)

    def break_it(raw):
        raw["training"][0]["split"] = "validation"
        raw["training"][1]["image"] = 5
        raw["training"][3]["id"] = "c2"

    edit(root, break_it)
    report = check_dataset(root)
    assert [p.message for p in report.problems] == [
        "training[0].split is 'validation'; use 'train', 'val' or 'test'",
        "training[1].image must be a path or a list of paths",
        "case id 'c2' of training[3] is also used by training[2]",
    ]
    assert set(wheres(report)) == {"dataset.json"}


def test_invalid_json_and_bad_task(make_seg_dataset, edit) -> None:
    root = make_seg_dataset(n=2)
    edit(root, lambda raw: raw.update(task="segmentaton"))
    report = check_dataset(root)
    assert "Did you mean 'segmentation'" in report.to_text()
    (root / "dataset.json").write_text("{not json")
    report = check_dataset(root)
    only_problem(report, "dataset.json", "not valid JSON")


def test_missing_file_is_named(make_seg_dataset) -> None:
    root = make_seg_dataset(n=3)
    (root / "labelsTr" / "c1.nii.gz").unlink()
    only_problem(check_dataset(root), "labelsTr/c1.nii.gz", "missing", "'c1'")


def test_unreadable_file_is_named(make_seg_dataset) -> None:
    root = make_seg_dataset(n=3)
    (root / "imagesTr" / "c2.nii.gz").write_bytes(b"\x1f\x8b garbage")
    report = check_dataset(root)
    only_problem(report, "imagesTr/c2.nii.gz", "unreadable", "'c2'")


def test_label_shape_mismatch(make_seg_dataset, volume) -> None:
    root = make_seg_dataset(n=3)
    volume(root / "labelsTr" / "c0.nii.gz", np.zeros((8, 8, 7), np.uint8))
    only_problem(check_dataset(root), "labelsTr/c0.nii.gz", "shape (8, 8, 7) vs (8, 8, 8)")


def test_label_world_geometry_mismatch_with_tolerance(make_seg_dataset, volume) -> None:
    root = make_seg_dataset(n=2)
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[1, 1, 1] = 1
    volume(root / "labelsTr" / "c1.nii.gz", lab, origin=(0.0, 0.0, 0.0004))  # within 1e-3 mm
    assert check_dataset(root).ok
    volume(root / "labelsTr" / "c1.nii.gz", lab, origin=(0.0, 2.0, 0.0))
    only_problem(check_dataset(root), "labelsTr/c1.nii.gz", "differ by up to 2 mm", "origin")
    volume(root / "labelsTr" / "c1.nii.gz", lab, spacing=(1.0, 1.0, 1.5))
    only_problem(check_dataset(root), "labelsTr/c1.nii.gz", "spacing (1, 1, 1.5) vs (1, 1, 1)")


def test_channels_with_different_geometry(make_seg_dataset, volume, edit) -> None:
    root = make_seg_dataset(n=2)
    rng = np.random.default_rng(1)
    volume(root / "imagesTr" / "c0_t2.nii.gz", rng.normal(size=(8, 8, 8)), spacing=(1.0, 1.0, 2.0))
    volume(root / "imagesTr" / "c1_t2.nii.gz", rng.normal(size=(8, 8, 8)))

    def two_channels(raw):
        raw["channel_names"] = {"0": "T1", "1": "T2"}
        raw["modality"] = {"0": "MR", "1": "MR"}
        for c in raw["training"]:
            c["image"] = [c["image"], c["image"].replace(".nii.gz", "_t2.nii.gz")]

    edit(root, two_channels)
    only_problem(
        check_dataset(root), "imagesTr/c0_t2.nii.gz", "channel geometry differs", "imagesTr/c0.nii.gz"
    )


def test_channel_count_against_declared(make_seg_dataset, edit) -> None:
    root = make_seg_dataset(n=2)
    edit(root, lambda raw: raw.update(channel_names={"0": "T1", "1": "T2"}, modality={"0": "MR", "1": "MR"}))
    report = check_dataset(root)
    assert set(wheres(report)) == {"imagesTr/c0.nii.gz", "imagesTr/c1.nii.gz"}
    assert "has 1 channel(s); dataset.json declares 2" in report.to_text()


def test_label_values_outside_declared_classes(make_seg_dataset, volume) -> None:
    root = make_seg_dataset(n=3)
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1], lab[2, 2, 2] = 1, 3, 7
    volume(root / "labelsTr" / "c2.nii.gz", lab)
    only_problem(check_dataset(root), "labelsTr/c2.nii.gz", "label values 3, 7 are not declared classes")


def test_non_integer_label_values(make_seg_dataset, volume) -> None:
    root = make_seg_dataset(n=2)
    volume(root / "labelsTr" / "c0.nii.gz", np.full((8, 8, 8), 0.5, np.float32))
    only_problem(check_dataset(root), "labelsTr/c0.nii.gz", "non-integer")


def test_nan_and_inf_voxels(make_seg_dataset, volume) -> None:
    root = make_seg_dataset(n=3)
    img = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    img[0, 0, :3] = np.nan
    img[1, 1, 1] = np.inf
    volume(root / "imagesTr" / "c1.nii.gz", img)
    only_problem(check_dataset(root), "imagesTr/c1.nii.gz", "4 of 512 voxels are NaN or Inf")


def test_constant_image(make_seg_dataset, volume) -> None:
    root = make_seg_dataset(n=3)
    volume(root / "imagesTr" / "c0.nii.gz", np.zeros((8, 8, 8), np.float32))
    only_problem(check_dataset(root), "imagesTr/c0.nii.gz", "empty (every voxel is 0)")


def test_patient_in_train_and_test(make_seg_dataset, edit) -> None:
    root = make_seg_dataset(n=4, patients=["p0", "p1", "p2", "p1"])
    edit(root, lambda raw: raw["training"][3].update(split="test"))
    only_problem(check_dataset(root), "patient p1", "'c1' in cross-validation pool", "'c3' in test")


def test_patient_in_fixed_train_and_val(make_seg_dataset, edit) -> None:
    root = make_seg_dataset(n=4, patients=["p0", "p1", "p2", "p1"])

    def splits(raw):
        raw["training"][1]["split"] = "train"
        raw["training"][3]["split"] = "val"

    edit(root, splits)
    only_problem(check_dataset(root), "patient p1", "'c1' in train", "'c3' in val")
    # in the cross-validation pool with a fixed split is fine: the folds keep the patient together
    edit(root, lambda raw: raw["training"][3].pop("split"))
    assert check_dataset(root).ok


def classification_dataset(root: Path, volume, labels: list, ctype: str, classes: dict) -> Path:
    rng = np.random.default_rng(0)
    training = []
    for i, lab in enumerate(labels):
        volume(
            root / "images" / f"x{i}.nii.gz", rng.normal(size=(8, 8)).astype(np.float32), spacing=(1.0, 1.0)
        )
        training.append({"id": f"x{i}", "image": f"images/x{i}.nii.gz", "label": lab})
    raw = {"name": "cls", "task": "classification", "classification_type": ctype, "labels": classes,
           "tensorImageSize": "2D", "training": training}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(raw))
    return root


def test_classification_labels_outside_classes_and_wrong_shape(tmp_path: Path, volume) -> None:
    classes = {"benign": 0, "malignant": 1, "unknown": 2}
    root = classification_dataset(tmp_path / "mc", volume, [0, 1, 2, 5, [0, 1]], "multiclass", classes)
    report = check_dataset(root)
    assert wheres(report) == ["case x3", "case x4"], report.to_text()
    assert "label 5 is not a declared class (declared: 0 benign, 1 malignant, 2 unknown)" in report.to_text()
    assert "must be a class index for multiclass" in report.to_text()
    root = classification_dataset(
        tmp_path / "ml", volume, [[0, 1, 1], [1, 0], [0, 0, 2], [1, 0, 0]], "multilabel", classes
    )
    report = check_dataset(root)
    assert wheres(report) == ["case x1", "case x2"], report.to_text()
    assert "must be a list of 3 values 0/1" in report.to_text()
    assert (
        classification_dataset(tmp_path / "ok", volume, [0, 1, 0], "binary", {"no": 0, "yes": 1})
        and check_dataset(tmp_path / "ok").ok
    )


def test_boxes_outside_the_image(make_seg_dataset, edit) -> None:
    root = make_seg_dataset(n=2)

    def detection(raw):
        raw["task"] = "detection"
        raw["labels"] = {"background": 0, "lesion": 1}
        for c in raw["training"]:
            c.pop("label")
        raw["training"][0]["boxes"] = [[1, 1, 1, 4, 4, 4], [6, 6, 6, 9, 8, 8]]
        raw["training"][1]["boxes"] = [[2, 2, 2, 1, 3, 3], [0, 0, 0, 1, 1]]

    edit(root, detection)
    report = check_dataset(root)
    text = report.to_text()
    assert (
        "imagesTr/c0.nii.gz: case 'c0': box 1 [6, 6, 6, 9, 8, 8] is outside the image (shape (8, 8, 8)"
        in text
    )
    assert "imagesTr/c1.nii.gz: case 'c1': box 0 [2, 2, 2, 1, 3, 3] has a min not below its max" in text
    assert "case c1: box 1 [0, 0, 0, 1, 1] must be 4 (2D) or 6 (3D) numbers" in text
    assert len(report.problems) == 3


def test_every_problem_is_reported_in_one_run(make_seg_dataset, volume) -> None:
    root = make_seg_dataset(n=5)
    (root / "imagesTr" / "c0.nii.gz").unlink()
    volume(root / "imagesTr" / "c1.nii.gz", np.ones((8, 8, 8), np.float32))
    volume(root / "labelsTr" / "c2.nii.gz", np.full((8, 8, 8), 9, np.uint8))
    volume(root / "labelsTr" / "c3.nii.gz", np.zeros((4, 4, 4), np.uint8))
    report = check_dataset(root)
    assert sorted(wheres(report)) == [
        "imagesTr/c0.nii.gz", "imagesTr/c1.nii.gz", "labelsTr/c2.nii.gz", "labelsTr/c3.nii.gz"
    ], report.to_text()  # fmt: skip
    assert not report.ok


def test_forty_small_volumes_check_quickly(make_seg_dataset) -> None:
    root = make_seg_dataset(n=40)
    t0 = time.perf_counter()
    report = check_dataset(root)
    elapsed = time.perf_counter() - t0
    assert report.ok and report.num_cases == 40
    assert elapsed < 5.0, f"check of 40 volumes took {elapsed:.1f} s"
