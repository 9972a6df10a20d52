"""Write a medlens :class:`Image` as a small, valid DICOM series or single-frame image (for the DICOM results tests).

``write_mr_series`` writes one MR Image Storage file per slice the way a scanner would (Part 10 with preamble,
shuffled file names, patient/study/series modules with the type 2 attributes, per-slice
ImagePositionPatient/ImageOrientationPatient/PixelSpacing derived from the image's RAS+ affine), so that
``read_image(folder)`` gives back the same voxels and the same affine, oblique and anisotropic included.
``write_single_frame`` writes a 2D image as one secondary-capture-like MR/OT file without patient geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlens.io.image import LPS_RAS_FLIP, Image

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def oblique_affine(
    spacing: tuple[float, float, float], angles_deg: tuple[float, float, float], origin
) -> np.ndarray:
    """A RAS+ affine with the given voxel size, rotated by x, y, z Euler angles."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = (rz @ ry @ rx) @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _base(sop_class: str, modality: str, study_uid: str, series_uid: str, number: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = (
        "SYNTH-7",
        "Synthetic^Seven",
        "19700101",
        "O",
    )
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "S1", "A1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, number, 1
    ds.SeriesDescription = "AX SYNTH"
    ds.Manufacturer = "medlens-tests"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def write_mr_series(image: Image, folder: Path, *, series_number: int = 5, seed: int = 0) -> list[Path]:
    """Write a 3D one-channel image as an MR series in ``folder``; return the files in slice order (k = 0 first)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_RAS_FLIP @ image.affine
    sp = image.spacing
    row, col = lps[:3, 0] / sp[0], lps[:3, 1] / sp[1]
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    arr = np.clip(np.rint(np.asarray(image.array[0], dtype=np.float64)), 0, 65535).astype(np.uint16)
    names = np.random.default_rng(seed).permutation(arr.shape[2])
    files = []
    for k in range(arr.shape[2]):
        ds = _base(MR_IMAGE_STORAGE, "MR", study, series, series_number)
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "10", "500", "1"
        ds.SliceThickness = f"{sp[2]:.6f}"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{sp[1]:.6f}", f"{sp[0]:.6f}"]
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[0]
        ds.PixelData = np.ascontiguousarray(arr[:, :, k].T).tobytes()
        path = folder / f"im{names[k]:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def write_single_frame(image: Image, path: Path) -> Path:
    """Write a 2D one-channel image (values 0..65535) as one secondary-capture file without patient geometry."""
    from pydicom.uid import generate_uid

    arr = np.clip(np.rint(np.asarray(image.array[0], dtype=np.float64)), 0, 65535).astype(np.uint16)
    ds = _base(SECONDARY_CAPTURE, "OT", generate_uid(), generate_uid(), 7)
    ds.ConversionType = "WSD"
    ds.Rows, ds.Columns = arr.shape[1], arr.shape[0]
    ds.PixelData = np.ascontiguousarray(arr.T).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
