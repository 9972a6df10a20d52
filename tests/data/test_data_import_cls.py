"""import_dataset: MedMNIST npz (2D, RGB, 3D, multilabel), class-per-folder images, DICOM tree + CSV."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest

from medlens.data.check import check_dataset
from medlens.data.dataset import read_case_image
from medlens.data.importers import import_dataset
from medlens.data.splits import make_folds
from medlens.errors import DatasetError, InputError


def make_npz(
    path: Path,
    shape: tuple[int, ...],
    labels: np.ndarray | None = None,
    k: int = 1,
    n=(6, 3, 4),
    classes: int = 3,
) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 255, (count, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes if k == 1 else 2, (count, k), dtype=np.uint8)
    if labels is not None:
        arrays["train_labels"] = labels
    np.savez(path, **arrays)
    return arrays


def test_medmnist_2d_splits_labels_and_pixels(tmp_path: Path) -> None:
    arrays = make_npz(tmp_path / "pathmnist.npz", (28, 28), classes=9)
    arrays["train_labels"][0, 0] = 8  # the class count comes from the largest label
    np.savez(tmp_path / "pathmnist.npz", **arrays)
    names = {str(i): f"tissue {i}" for i in range(9)}
    ds = import_dataset("medmnist", tmp_path / "pathmnist.npz", tmp_path / "out", class_names=names)
    assert ds.task == "classification" and ds.classification_type == "multiclass" and ds.ndim == 2
    assert ds.class_names == [f"tissue {i}" for i in range(9)] and ds.modalities == {0: "SM"}
    assert [c.split for c in ds.training] == ["train"] * 6 + ["val"] * 3
    assert [c.split for c in ds.test] == ["test"] * 4
    c = ds.case("val_1")
    assert c.label == int(arrays["val_labels"][1, 0])
    img = read_case_image(ds, c)
    assert img.array.shape == (1, 28, 28)
    np.testing.assert_array_equal(img.array[0], arrays["val_images"][1].T)  # (H, W) -> (i = column, j = row)
    assert check_dataset(ds.root).ok
    (fold,) = make_folds(ds)  # MedMNIST's own validation set
    assert len(fold.train) == 6 and len(fold.val) == 3 and len(fold.test) == 4


def test_medmnist_rgb_3d_binary_and_ordinal(tmp_path: Path) -> None:
    arrays = make_npz(tmp_path / "dermamnist.npz", (28, 28, 3), classes=2)
    ds = import_dataset("medmnist", tmp_path / "dermamnist.npz", tmp_path / "rgb")
    assert ds.classification_type == "binary" and ds.channels == {0: "R", 1: "G", 2: "B"}
    img = read_case_image(ds, ds.training[2])
    np.testing.assert_array_equal(img.array, np.transpose(arrays["train_images"][2], (2, 1, 0)))
    arrays = make_npz(tmp_path / "organmnist3d.npz", (8, 8, 8), classes=5)
    ds = import_dataset("medmnist", tmp_path / "organmnist3d.npz", tmp_path / "vol", ordinal=True)
    assert ds.ndim == 3 and ds.classification_type == "ordinal" and ds.modalities == {0: "CT"}
    img = read_case_image(ds, ds.test[0])
    np.testing.assert_array_equal(img.array[0], np.transpose(arrays["test_images"][0], (2, 1, 0)))
    assert check_dataset(ds.root).ok


def test_medmnist_multilabel(tmp_path: Path) -> None:
    arrays = make_npz(tmp_path / "chestmnist.npz", (28, 28), k=3)
    ds = import_dataset(
        "medmnist", tmp_path / "chestmnist.npz", tmp_path / "out", class_names=["a", "b", "c"]
    )
    assert ds.classification_type == "multilabel" and ds.labels == {"a": 0, "b": 1, "c": 2}
    assert ds.training[4].label == arrays["train_labels"][4].tolist()
    assert check_dataset(ds.root).ok
    with pytest.raises(
        DatasetError,
        match=r"chestmnist\.npz: labels are N x 3 .*multi-label.*classification_type='multiclass'",
    ):
        import_dataset(
            "medmnist", tmp_path / "chestmnist.npz", tmp_path / "bad", classification_type="multiclass"
        )
    assert not (tmp_path / "bad").exists()


def test_medmnist_labels_outside_declared_classes(tmp_path: Path) -> None:
    labels = np.array([[0], [1], [1], [4], [0], [1]], np.uint8)
    make_npz(tmp_path / "breastmnist.npz", (28, 28), labels=labels, classes=2)
    with pytest.raises(
        DatasetError, match=r"breastmnist\.npz: train_labels\[3\] = 4 is outside the 2 declared classes"
    ):
        import_dataset(
            "medmnist", tmp_path / "breastmnist.npz", tmp_path / "out", class_names=["benign", "malignant"]
        )
    with pytest.raises(DatasetError, match="classification_type='binary' but the labels hold 5 classes"):
        import_dataset(
            "medmnist", tmp_path / "breastmnist.npz", tmp_path / "out", classification_type="binary"
        )


@pytest.mark.slow
def test_medmnist_ten_thousand_images_well_under_a_minute(tmp_path: Path) -> None:
    make_npz(tmp_path / "pathmnist.npz", (28, 28), n=(7000, 1000, 2000), classes=9)
    t0 = time.perf_counter()
    ds = import_dataset("medmnist", tmp_path / "pathmnist.npz", tmp_path / "out")
    assert len(ds.cases) == 10_000
    assert time.perf_counter() - t0 < 60  # about 22 s on a quiet 2-core machine


# ---- class-per-folder --------------------------------------------------------------------------------------------
def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image as PILImage

    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(array).save(path)


def make_folder(root: Path, size: tuple[int, int] = (10, 12), split: bool = False) -> dict[str, np.ndarray]:
    """Classes 'benign' and 'malignant'; patients P1..P3 in the file names; a stray text file."""
    rng = np.random.default_rng(0)
    pixels = {}
    for n in range(6):
        cls = "benign" if n % 2 else "malignant"
        sub = (("train" if n < 4 else "test") + "/") if split else ""
        arr = rng.integers(0, 255, size, dtype=np.uint8)  # rows x columns
        name = f"P{n // 2 + 1}_img{n}.png"
        write_png(root / f"{sub}{cls}" / name, arr)
        pixels[name] = arr
    (root / ("train/" if split else "") / "benign" / "notes.txt").write_text("not an image")
    return pixels


def test_folder_import_classes_pixels_and_patients(tmp_path: Path) -> None:
    pixels = make_folder(tmp_path / "src")
    ds = import_dataset("folder", tmp_path / "src", tmp_path / "out", patient_pattern=r"^(P\d+)_")
    assert ds.labels == {"benign": 0, "malignant": 1} and ds.classification_type == "binary" and ds.ndim == 2
    assert len(ds.training) == 6 and ds.test == []
    case = ds.case("benign_P1_img1")
    assert case.label == 0 and case.patient_id == "P1" and case.meta["source"] == "benign/P1_img1.png"
    img = read_case_image(ds, case)
    assert img.array.shape == (1, 12, 10)  # PNG 10 rows x 12 columns -> (1, columns, rows)
    np.testing.assert_array_equal(img.array[0], pixels["P1_img1.png"].T)
    assert check_dataset(ds.root).ok
    folds = make_folds(ds, n_folds=3)
    assert all(len({ds.case(c).patient_id for c in f.val}) == 1 for f in folds)  # one patient per fold


def test_folder_import_with_split_folders(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", split=True)
    ds = import_dataset("folder", tmp_path / "src", tmp_path / "out")
    assert {c.split for c in ds.training} == {"train"} and len(ds.training) == 4
    assert [c.split for c in ds.test] == ["test", "test"] and all(isinstance(c.label, int) for c in ds.test)


def test_folder_mixed_sizes_channels_and_layout_errors(tmp_path: Path) -> None:
    make_folder(tmp_path / "src")
    write_png(tmp_path / "src" / "malignant" / "odd.png", np.zeros((9, 12), np.uint8))
    with pytest.raises(
        DatasetError, match=r"odd\.png: is 12x9 pixels but .*P1_img1\.png is 12x10.*allow_mixed_sizes"
    ):
        import_dataset("folder", tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    ds = import_dataset("folder", tmp_path / "src", tmp_path / "out", allow_mixed_sizes=True)
    assert len(ds.training) == 7
    write_png(tmp_path / "src" / "malignant" / "odd.png", np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"odd\.png: has 3 channel\(s\) but .* has 1; pass channels=1"):
        import_dataset("folder", tmp_path / "src", tmp_path / "out2")
    ds = import_dataset("folder", tmp_path / "src", tmp_path / "out2", channels=3)
    assert ds.channels == {0: "R", 1: "G", 2: "B"} and read_case_image(ds, ds.training[0]).num_channels == 3
    (tmp_path / "src" / "loose.png").write_bytes((tmp_path / "src" / "malignant" / "odd.png").read_bytes())
    with pytest.raises(DatasetError, match=r"loose\.png: images must sit in class sub-folders"):
        import_dataset("folder", tmp_path / "src", tmp_path / "out3")
    (tmp_path / "src" / "loose.png").unlink()
    (tmp_path / "src" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: class folder holds no images"):
        import_dataset("folder", tmp_path / "src", tmp_path / "out3")


# ---- DICOM tree + CSV ----------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def dicom_tree(tmp_path: Path, dicom_series) -> dict:
    """Patients A (two series in one study), B and C (one series each), in a nested tree."""
    root = tmp_path / "dicom"
    s = {
        "A1": dicom_series(
            root / "A" / "study" / "s1", patient_id="A", study_uid="1.2.3.1", description="AX T1", value=100
        ),
        "A2": dicom_series(
            root / "A" / "study" / "s2", patient_id="A", study_uid="1.2.3.1", description="COR", value=200
        ),
        "B": dicom_series(root / "B", patient_id="B", study_uid="1.2.3.2", value=300, slices=4),
        "C": dicom_series(
            root / "C", patient_id="C", study_uid="1.2.3.3", value=400, pixel_spacing=(0.5, 0.7)
        ),
        # two series of patient D in one flat folder
        "D1": dicom_series(root / "D", patient_id="D", study_uid="1.2.3.4", value=500, prefix="a"),
        "D2": dicom_series(root / "D", patient_id="D", study_uid="1.2.3.4", value=600, prefix="b", slices=2),
    }
    (root / "README.txt").write_text("not DICOM")
    return {"root": root, "series": s}


def test_dicom_import_by_series_uid_with_metadata(tmp_path: Path, dicom_tree: dict) -> None:
    s = dicom_tree["series"]
    rows = [
        {"PatientID": "A", "SeriesInstanceUID": s["A1"]["uid"], "label": "normal", "PatientAge": "045Y", "site": "north", "scanner": "X"},
        {"PatientID": "B", "SeriesInstanceUID": s["B"]["uid"], "label": "tumour", "PatientAge": "61", "site": "south", "scanner": "Y"},
        {"PatientID": "C", "SeriesInstanceUID": s["C"]["uid"], "label": "normal", "PatientAge": "", "site": "south", "scanner": "X"},
        {"PatientID": "D", "SeriesInstanceUID": s["D2"]["uid"], "label": "tumour", "PatientAge": "", "site": "south", "scanner": "X"},
    ]  # fmt: skip
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    ds = import_dataset("dicom", dicom_tree["root"], tmp_path / "out", labels_csv=csv_path)
    assert ds.labels == {"normal": 0, "tumour": 1} and ds.classification_type == "binary" and ds.ndim == 3
    assert [c.id for c in ds.training] == ["A_1", "B_1", "C_1", "D_1"] and [c.label for c in ds.training] == [
        0,
        1,
        0,
        1,
    ]
    a = ds.case("A_1")
    assert a.meta["age"] == 45 and a.site == "north" and a.meta["scanner"] == "X" and a.patient_id == "A"
    assert a.meta["SeriesInstanceUID"] == s["A1"]["uid"] and "age" not in ds.case("C_1").meta
    img = read_case_image(ds, ds.case("B_1"))
    assert img.spatial_shape == (5, 6, 4) and img.spacing == pytest.approx((0.6, 0.8, 2.0))
    assert img.array[0, 3, 0, 2] == 300 + 10 * 2 + 3  # value + 10 * slice + column
    assert read_case_image(ds, ds.case("C_1")).spacing == pytest.approx((0.7, 0.5, 2.0))
    d = read_case_image(ds, ds.case("D_1"))  # read from a folder it shares with another series
    assert d.spatial_shape == (5, 6, 2) and d.array.min() == 600
    assert not (tmp_path / "out" / ".staging").exists()
    assert ds.modalities == {0: "CT"} and check_dataset(ds.root).ok


def test_dicom_import_by_patient_study_and_path(tmp_path: Path, dicom_tree: dict) -> None:
    rows = [{"PatientID": "A", "label": 1}, {"PatientID": "B", "label": 0}]
    csv_path = write_csv(tmp_path / "by_patient.csv", rows)
    with pytest.raises(
        DatasetError, match=r"by_patient\.csv: row 2: patient 'A' has 2 series .*series_description"
    ):
        import_dataset("dicom", dicom_tree["root"], tmp_path / "out", labels_csv=csv_path)
    ds = import_dataset(
        "dicom", dicom_tree["root"], tmp_path / "out", labels_csv=csv_path, series_description="ax"
    )
    assert ds.case("A_1").meta["SeriesInstanceUID"] == dicom_tree["series"]["A1"]["uid"]
    assert ds.class_names == ["class_0", "class_1"] and ds.case("B_1").label == 0
    rows = [
        {"StudyInstanceUID": "1.2.3.2", "id": "b-study", "label": "x"},
        {"StudyInstanceUID": "1.2.3.3", "id": "c", "label": "y"},
    ]
    ds = import_dataset(
        "dicom", dicom_tree["root"], tmp_path / "s", labels_csv=write_csv(tmp_path / "s.csv", rows)
    )
    assert [c.id for c in ds.training] == ["b-study", "c"] and ds.case("b-study").patient_id == "B"
    rows = [{"path": "A/study/s2", "label": "x"}, {"path": "C", "label": "y"}]
    ds = import_dataset(
        "dicom", dicom_tree["root"], tmp_path / "p", labels_csv=write_csv(tmp_path / "p.csv", rows)
    )
    assert ds.case("A_1").meta["SeriesInstanceUID"] == dicom_tree["series"]["A2"]["uid"]
    assert read_case_image(ds, ds.case("A_1")).array.min() == 200


def test_dicom_import_errors_name_the_row(tmp_path: Path, dicom_tree: dict) -> None:
    s = dicom_tree["series"]
    rows = [{"SeriesInstanceUID": s["B"]["uid"], "label": "a"}, {"SeriesInstanceUID": "9.9.9", "label": "b"}]
    with pytest.raises(DatasetError, match=r"missing\.csv: row 3: series 9\.9\.9 is not in"):
        import_dataset(
            "dicom",
            dicom_tree["root"],
            tmp_path / "out",
            labels_csv=write_csv(tmp_path / "missing.csv", rows),
        )
    rows = [
        {"SeriesInstanceUID": s["B"]["uid"], "grade": "low"},
        {"SeriesInstanceUID": s["C"]["uid"], "grade": "extreme"},
    ]
    path = write_csv(tmp_path / "grades.csv", rows)
    with pytest.raises(
        DatasetError,
        match=r"grades\.csv: row 3: label 'extreme' is not one of the declared classes \(low, high\)",
    ):
        import_dataset(
            "dicom",
            dicom_tree["root"],
            tmp_path / "out",
            labels_csv=path,
            label_column="grade",
            classes=["low", "high"],
        )
    with pytest.raises(InputError, match="has no column 'label' \\(label_column\\)"):
        import_dataset("dicom", dicom_tree["root"], tmp_path / "out", labels_csv=path)
    rows = [
        {"SeriesInstanceUID": s["B"]["uid"], "PatientID": "B", "label": "a"},
        {"SeriesInstanceUID": "", "PatientID": "B", "label": "b"},
    ]
    with pytest.raises(DatasetError, match=r"dup\.csv: row 3: names the same image as row 2"):
        import_dataset(
            "dicom", dicom_tree["root"], tmp_path / "out", labels_csv=write_csv(tmp_path / "dup.csv", rows)
        )
    with pytest.raises(InputError, match="needs labels_csv"):
        import_dataset("dicom", dicom_tree["root"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_medmnist_import_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medlens.data.importers.medmnist as mm

    make_npz(tmp_path / "x.npz", (28, 28))
    real, calls = mm.write_image, {"n": 0}

    def write_then_fail(image, path, **kw):
        calls["n"] += 1
        if calls["n"] > 7:
            raise RuntimeError("disk full")
        return real(image, path, **kw)

    monkeypatch.setattr(mm, "write_image", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        import_dataset("medmnist", tmp_path / "x.npz", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]
