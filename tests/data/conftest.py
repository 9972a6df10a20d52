"""Tiny datasets for the data-room tests: a few 8^3 NIfTI volumes written with medlens.io."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medlens.io import Image, write_image


def write_volume(
    path: Path, array: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0), origin: Any = None
) -> str:
    """Write a channel-first (or single-channel spatial) array as NIfTI; return the path's name parts."""
    arr = array if array.ndim == len(spacing) + 1 else array[None]
    write_image(Image.from_spacing(arr, spacing=spacing, origin=origin), path)
    return str(path)


def seg_case(rng: np.random.Generator, shape: tuple[int, ...] = (8, 8, 8)) -> tuple[np.ndarray, np.ndarray]:
    """A volume with a bright cube (label 1) and a darker blob (label 2) on a noisy background."""
    img = rng.normal(100.0, 5.0, size=shape).astype(np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    lab[5:7, 5:7, 5:7] = 2
    img[lab == 1] += 50
    img[lab == 2] -= 40
    return img, lab


@pytest.fixture
def make_seg_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a clean segmentation dataset of ``n`` cases (8^3, two classes) with patients and sites."""

    def make(n: int = 4, name: str = "seg", patients: list[str] | None = None, **top: Any) -> Path:
        root = tmp_path / name
        rng = np.random.default_rng(0)
        training = []
        for i in range(n):
            img, lab = seg_case(rng)
            write_volume(root / "imagesTr" / f"c{i}.nii.gz", img)
            write_volume(root / "labelsTr" / f"c{i}.nii.gz", lab)
            entry = {
                "id": f"c{i}",
                "image": f"imagesTr/c{i}.nii.gz",
                "label": f"labelsTr/c{i}.nii.gz",
                "patient_id": patients[i] if patients else f"p{i}",
                "site": "A" if i % 2 == 0 else "B",
            }
            training.append(entry)
        raw = {
            "name": name,
            "task": "segmentation",
            "channel_names": {"0": "T1"},
            "modality": {"0": "MR"},
            "labels": {"background": 0, "cube": 1, "blob": 2},
            "numTraining": n,
            "training": training,
            "test": [],
            **top,
        }
        (root / "dataset.json").write_text(json.dumps(raw, indent=1))
        return root

    return make


def edit_json(root: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    """Load ``root/dataset.json``, let ``fn`` change it in place, write it back."""
    raw = json.loads((root / "dataset.json").read_text())
    fn(raw)
    (root / "dataset.json").write_text(json.dumps(raw, indent=1))


@pytest.fixture
def edit() -> Callable[[Path, Callable[[dict[str, Any]], None]], None]:
    return edit_json


@pytest.fixture
def volume() -> Callable[..., str]:
    return write_volume


def write_dicom_series(
    folder: Path,
    *,
    patient_id: str,
    study_uid: str,
    description: str = "AX",
    slices: int = 3,
    rows: int = 6,
    cols: int = 5,
    pixel_spacing: tuple[float, float] = (0.8, 0.6),
    step: float = 2.0,
    value: int = 100,
    prefix: str = "",
) -> dict[str, Any]:
    """A minimal axial CT series (Part 10 files); stored value = value + 10 * slice + column."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid,
            series_uid,
            study_uid + ".1",
        )
        ds.PatientID, ds.Modality, ds.SeriesDescription, ds.SeriesNumber = patient_id, "CT", description, 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, k * step]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = list(pixel_spacing)
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        stored = (value + 10 * k + np.arange(cols)[None, :] + np.zeros((rows, 1))).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"{prefix}{k:03d}.dcm", enforce_file_format=True)
    return {"uid": series_uid, "study": study_uid, "folder": folder}


@pytest.fixture
def dicom_series() -> Callable[..., dict[str, Any]]:
    return write_dicom_series
