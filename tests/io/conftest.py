"""Fixtures of the io tests: pydicom's bundled files and a writer of synthetic DICOM series.

``write_ct_series`` writes a small CT series the way a scanner would (Part 10 files with preamble, correct
UIDs, ImagePositionPatient/ImageOrientationPatient, RescaleSlope/Intercept), with knobs for everything the
reader must handle: shuffled file names, reversed InstanceNumber, oblique orientation, anisotropic spacing,
missing or duplicated slices, odd image sizes. Stored values encode the voxel index, so a test can tell any
mix-up of axes or slices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def bundled_file(name: str) -> Path:
    """A file bundled with pydicom (never downloaded); the test is skipped when it is not installed."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed locally (it would need a download)")
    return Path(str(path))


@dataclass
class SeriesOnDisk:
    """What ``write_ct_series`` wrote, in true slice order (k = 0 first along the normal)."""

    folder: Path
    stored: np.ndarray  # (slices, rows, cols) stored int16 values
    files: list[Path]
    sop_uids: list[str]
    series_uid: str
    study_uid: str
    positions: np.ndarray  # (slices, 3) ImagePositionPatient, LPS
    row: np.ndarray  # unit LPS direction of a row (column index grows)
    col: np.ndarray  # unit LPS direction of a column (row index grows)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as in DICOM
    slope: float
    intercept: float

    def world_lps(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """LPS world position of voxels (i=column, j=row, k=slice) from the DICOM definition."""
        return (
            self.positions[k]
            + i[..., None] * self.pixel_spacing[1] * self.row
            + j[..., None] * self.pixel_spacing[0] * self.col
        )


def rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """A rotation matrix from x, y, z Euler angles in degrees."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def write_ct_series(
    folder: Path,
    *,
    cols: int = 7,
    rows: int = 5,
    slices: int = 4,
    pixel_spacing: tuple[float, float] = (0.7, 0.9),
    step: float = 2.5,
    angles: Sequence[float] = (0.0, 0.0, 0.0),
    origin: Sequence[float] = (-20.0, 15.0, 40.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    names: str = "shuffled",
    instance_numbers: str = "reversed",
    drop: Sequence[int] = (),
    duplicate: int | None = None,
    odd_size: int | None = None,
    odd_orientation: int | None = None,
    extra_offsets: dict[int, float] | None = None,
    series_number: int = 3,
    description: str = "AX SYNTH",
    study_uid: str | None = None,
    geometry: bool = True,
    seed: int = 0,
) -> SeriesOnDisk:
    """Write a synthetic CT series into ``folder`` and describe it (see module docstring).

    ``drop`` removes slices (a gap), ``duplicate`` writes slice n twice, ``odd_size`` gives slice n another
    size, ``odd_orientation`` tilts slice n, ``extra_offsets`` shifts slices along the normal (uneven steps),
    ``geometry=False`` leaves out ImagePositionPatient/ImageOrientationPatient (like a secondary capture).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rot = rotation(angles)
    row, col = rot[:, 0], rot[:, 1]
    normal = np.cross(row, col)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    kept = [k for k in range(slices) if k not in set(drop)]
    offsets = {k: k * step + (extra_offsets or {}).get(k, 0.0) for k in kept}
    entries = [(k, k) for k in kept] + ([(duplicate, slices)] if duplicate is not None else [])
    stored_all, files, sops, positions = [], [], [], []
    order = rng.permutation(len(entries)) if names == "shuffled" else np.arange(len(entries))
    for n, (k, tag) in enumerate(entries):
        r, c = (rows + 1, cols + 2) if odd_size == k else (rows, cols)
        jj, ii = np.mgrid[0:r, 0:c]
        stored = (k * 1000 + jj * 30 + ii).astype(np.int16)
        ipp = np.asarray(origin, dtype=np.float64) + offsets[k] * normal
        cosines = np.concatenate([row, col])
        if odd_orientation == k:
            tilt = rotation((0.0, 0.0, 20.0)) @ rot
            cosines = np.concatenate([tilt[:, 0], tilt[:, 1]])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName, ds.Modality = "SYNTH-001", "Synthetic^Patient", "CT"
        ds.SeriesNumber, ds.SeriesDescription = series_number, description
        ds.InstanceNumber = (len(entries) - k) if instance_numbers == "reversed" else k + 1
        if geometry:
            ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in cosines]
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
        ds.SliceThickness = "9.0"  # deliberately not the spacing: the reader must use the positions
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.Rows, ds.Columns = r, c
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = stored.tobytes()
        path = folder / (f"img_{order[n]:03d}.dcm" if names == "shuffled" else f"img_{n:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        if tag == k:
            stored_all.append(stored)
            files.append(path)
            sops.append(sop)
            positions.append(ipp)
    return SeriesOnDisk(
        folder=folder,
        stored=np.stack(stored_all) if len({s.shape for s in stored_all}) == 1 else np.empty(0),
        files=files,
        sop_uids=sops,
        series_uid=series_uid,
        study_uid=study_uid,
        positions=np.asarray(positions),
        row=row,
        col=col,
        pixel_spacing=pixel_spacing,
        slope=slope,
        intercept=intercept,
    )


@pytest.fixture
def pydicom_file() -> Callable[[str], Path]:
    """The :func:`bundled_file` function: ``pydicom_file("CT_small.dcm")`` (skips when not installed)."""
    return bundled_file


@pytest.fixture
def ct_series() -> Callable[..., SeriesOnDisk]:
    """The :func:`write_ct_series` function (a fixture, so tests need not import this conftest)."""
    return write_ct_series
