"""import_dataset: MSD and nnU-Net folders, the dispatcher's errors, and interrupted imports."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medlens.data.check import check_dataset
from medlens.data.dataset import read_case_image
from medlens.data.importers import import_dataset
from medlens.errors import DatasetError, InputError
from medlens.io import read_image


def make_msd(root: Path) -> Path:
    """An MSD task: 4D two-channel images stored x, y, z, c (as MSD does), labels, a test image, junk."""
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True)
    training = []
    for i in (1, 2, 3):
        img = rng.normal(size=(8, 8, 6, 2)).astype(np.float32)
        img[..., 1] += 10 * i
        lab = np.zeros((8, 8, 6), np.uint8)
        lab[2:4, 2:5, 1:3] = 1
        nib.save(nib.Nifti1Image(img, aff), root / "imagesTr" / f"BRATS_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), root / "labelsTr" / f"BRATS_{i:03d}.nii.gz")
        training.append(
            {"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"}
        )
    nib.save(
        nib.Nifti1Image(rng.normal(size=(8, 8, 6, 2)).astype(np.float32), aff),
        root / "imagesTs" / "BRATS_100.nii.gz",
    )
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    raw = {
        "name": "BRATS", "description": "toy", "reference": "none", "licence": "CC-BY-SA 4.0",
        "tensorImageSize": "4D", "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema"}, "numTraining": 3, "numTest": 1,
        "training": training, "test": ["./imagesTs/BRATS_100.nii.gz"],
    }  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(raw))
    return root


def test_msd_import_keeps_4d_multichannel(tmp_path: Path) -> None:
    src = make_msd(tmp_path / "Task01_BrainTumour")
    ds = import_dataset("msd", src, tmp_path / "out")
    assert ds.root == tmp_path / "out" and ds.task == "segmentation" and ds.ndim == 3
    assert ds.channels == {0: "FLAIR", 1: "T1w"} and ds.modalities == {0: "MR", 1: "MR"}
    assert ds.labels == {"background": 0, "edema": 1} and ds.extra["licence"] == "CC-BY-SA 4.0"
    assert [c.id for c in ds.training] == ["BRATS_001", "BRATS_002", "BRATS_003"] and len(ds.test) == 1
    assert ds.training[1].image == ["imagesTr/BRATS_002.nii.gz"]
    img = read_case_image(ds, ds.training[1])
    src_img = nib.load(src / "imagesTr" / "BRATS_002.nii.gz")
    assert img.array.shape == (2, 8, 8, 6)
    np.testing.assert_array_equal(img.array[1], np.asarray(src_img.dataobj)[..., 1])
    np.testing.assert_allclose(img.affine, src_img.affine)
    assert not (tmp_path / "out" / "imagesTr" / "._BRATS_001.nii.gz").exists()
    assert check_dataset(ds.root).ok


def test_msd_missing_file_is_named(tmp_path: Path) -> None:
    src = make_msd(tmp_path / "Task01")
    (src / "labelsTr" / "BRATS_002.nii.gz").unlink()
    with pytest.raises(
        DatasetError, match=r"labelsTr/BRATS_002\.nii\.gz: listed in .*dataset\.json but missing"
    ):
        import_dataset("msd", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def make_nnunet(root: Path, cases: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for i in range(cases):
        for ch in range(2):
            img = rng.normal(size=(7, 8, 9)).astype(np.float32) + 100 * ch
            nib.save(
                nib.Nifti1Image(img, np.diag([0.8, 0.8, 3.0, 1])),
                _mk(root / "imagesTr" / f"prost_{i:03d}_{ch:04d}.nii.gz"),
            )
        lab = np.zeros((7, 8, 9), np.uint8)
        lab[1:3, 1:3, 1:3], lab[4:6, 4:6, 4:6] = 1, 2
        nib.save(
            nib.Nifti1Image(lab, np.diag([0.8, 0.8, 3.0, 1])),
            _mk(root / "labelsTr" / f"prost_{i:03d}.nii.gz"),
        )
    for ch in range(2):
        nib.save(
            nib.Nifti1Image(rng.normal(size=(7, 8, 9)).astype(np.float32), np.diag([0.8, 0.8, 3.0, 1])),
            _mk(root / "imagesTs" / f"prost_900_{ch:04d}.nii.gz"),
        )
    raw = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
           "numTraining": cases, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(raw))
    return root


def _mk(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def test_nnunet_import_groups_channels_and_stays_nnunet_compatible(tmp_path: Path) -> None:
    src = make_nnunet(tmp_path / "Dataset005_Prostate")
    ds = import_dataset("nnunet", src, tmp_path / "out")
    assert (
        ds.name == "Dataset005_Prostate"
        and ds.channels == {0: "T2", 1: "ADC"}
        and ds.modalities == {0: "MR", 1: "MR"}
    )
    c = ds.case("prost_001")
    assert c.image == ["imagesTr/prost_001_0000.nii.gz", "imagesTr/prost_001_0001.nii.gz"]
    assert c.label == "labelsTr/prost_001.nii.gz" and [t.id for t in ds.test] == ["prost_900"]
    img = read_case_image(ds, c)
    assert img.array.shape == (2, 7, 8, 9) and img.array[1].mean() > 50 > img.array[0].mean()
    raw = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert raw["file_ending"] == ".nii.gz" and raw["numTraining"] == 3
    assert raw["labels"] == {"background": 0, "PZ": 1, "TZ": 2} and raw["channel_names"] == {
        "0": "T2",
        "1": "ADC",
    }
    assert raw["overwrite_image_reader_writer"] == "SimpleITKIO"
    assert check_dataset(ds.root).ok


def test_nnunet_missing_channel_label_and_bad_names(tmp_path: Path) -> None:
    src = make_nnunet(tmp_path / "a")
    (src / "imagesTr" / "prost_002_0001.nii.gz").unlink()
    with pytest.raises(
        DatasetError, match=r"prost_002_0001\.nii\.gz: missing \(channel 1 of case 'prost_002'\)"
    ):
        import_dataset("nnunet", src, tmp_path / "out")
    src = make_nnunet(tmp_path / "b")
    (src / "labelsTr" / "prost_000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/prost_000\.nii\.gz: missing \(label of training case"):
        import_dataset("nnunet", src, tmp_path / "out")
    src = make_nnunet(tmp_path / "c")
    (src / "imagesTr" / "prost_000_0000.nii.gz").rename(src / "imagesTr" / "prost_000.nii.gz")
    with pytest.raises(DatasetError, match=r"prost_000\.nii\.gz: not named CASE_XXXX\.nii\.gz"):
        import_dataset("nnunet", src, tmp_path / "out")
    src = make_nnunet(tmp_path / "d")
    raw = json.loads((src / "dataset.json").read_text())
    raw["labels"]["whole"] = [1, 2]
    (src / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="label 'whole' is a region"):
        import_dataset("nnunet", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dispatcher_errors(tmp_path: Path) -> None:
    src = make_nnunet(tmp_path / "src", cases=1)
    with pytest.raises(InputError, match=r"unknown dataset kind 'nnunet2'\. Did you mean 'nnunet'\?"):
        import_dataset("nnunet2", src, tmp_path / "out")
    with pytest.raises(
        InputError, match=r"nnunet import has no option 'overwite'\. Did you mean 'overwrite'\?"
    ):
        import_dataset("nnunet", src, tmp_path / "out", overwite=True)
    with pytest.raises(InputError, match="no such file or folder"):
        import_dataset("nnunet", tmp_path / "nope", tmp_path / "out")
    with pytest.raises(InputError, match="must not be \\(or contain\\) the source"):
        import_dataset("nnunet", src, src, overwrite=True)
    import_dataset("nnunet", src, tmp_path / "out")
    with pytest.raises(InputError, match="already exists and is not empty"):
        import_dataset("nnunet", src, tmp_path / "out")
    ds = import_dataset("nnunet", src, tmp_path / "out", overwrite=True, name="again")
    assert ds.name == "again"


def test_interrupted_import_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medlens.data.importers._common as common

    src = make_nnunet(tmp_path / "src", cases=4)
    calls = {"n": 0}
    real = common.shutil.copyfile

    def copy_then_fail(a, b, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C midway
        return real(a, b, *args, **kw)

    monkeypatch.setattr(common.shutil, "copyfile", copy_then_fail)
    with pytest.raises(KeyboardInterrupt):
        import_dataset("nnunet", src, tmp_path / "out")
    assert calls["n"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no .out.*.partial


def test_imported_read_back_geometry(tmp_path: Path) -> None:
    src = make_nnunet(tmp_path / "src", cases=1)
    ds = import_dataset("nnunet", src, tmp_path / "out")
    img = read_image(ds.path(ds.training[0].image[0]))
    assert img.spacing == pytest.approx((0.8, 0.8, 3.0))
