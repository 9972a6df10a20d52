"""A small synthetic MR series as DICOM files (16x16x12 at 1.5x1.5x2 mm, a bright blob), for the PACS tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_mr_series(
    folder: Path,
    *,
    shape: tuple[int, int, int] = (16, 16, 12),
    seed: int = 0,
    patient: str = "PACS-TEST",
    study_uid: str | None = None,
) -> dict[str, object]:
    """Write one MR series (one file per slice, a bright ellipsoid in noise) like the seg_run fixture's data.

    ``study_uid`` puts the series in an existing study (a new one by default).

    Returns:
        ``{"study": StudyInstanceUID, "series": SeriesInstanceUID, "sops": [...], "files": [...]}``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    ni, nj, nk = shape
    grid = np.indices(shape).astype(np.float32)
    centre = [0.5 * s for s in shape]
    d = sum(((g - c) / (0.25 * s)) ** 2 for g, c, s in zip(grid, centre, shape, strict=True))
    volume = rng.normal(0.0, 0.3, shape) + 100.0 + 2.0 * (d <= 1.0)  # (i, j, k) as in the seg_run data
    study, series, frame = study_uid or generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    sops, files = [], []
    for k in range(nk):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "Test^Pacs",
            patient,
            "19700101",
            "O",
        )
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC1", "1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.SeriesDescription = "blob T1"
        ds.Manufacturer = "medlens-test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 10, 500, 1, 1.5
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.5, 1.5]
        ds.SliceThickness = 2.0
        ds.PositionReferenceIndicator = ""
        ds.Rows, ds.Columns = nj, ni
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 0.01, 0, "US"
        pixels = np.round(volume[:, :, k].T * 100).astype(np.uint16)  # rows = j, columns = i
        ds.PixelData = pixels.tobytes()
        path = folder / f"slice{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sops.append(sop)
        files.append(path)
    return {"study": study, "series": series, "sops": sops, "files": files}
