"""Single DICOM files (pydicom's bundled test files and generated enhanced multi-frame)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medlens.errors import ImageReadError
from medlens.io import image_format, read_image


def test_ct_small_is_in_hounsfield_units_with_dicom_geometry(pydicom_file) -> None:
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    img = read_image(path)
    assert img.modality == "CT" and img.array.dtype == np.float32
    assert img.spatial_shape == (ds.Columns, ds.Rows, 1)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(img.array[0, :, :, 0], hu.T)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(img.origin, ipp * [-1, -1, 1])
    # i runs along a row: its direction is the first ImageOrientationPatient triplet (LPS -> RAS)
    row = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
    np.testing.assert_allclose(img.direction[:, 0], row * [-1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(img.spacing[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    assert img.meta["SOPInstanceUIDs"] == [ds.SOPInstanceUID]
    assert img.meta["StudyInstanceUID"] == ds.StudyInstanceUID
    assert img.meta["files"] == [str(path)]


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_compressed_and_other_syntaxes_decode_to_the_same_pixels(name: str, pydicom_file) -> None:
    reference = read_image(pydicom_file("MR_small.dcm"))
    img = read_image(pydicom_file(name))
    assert img.array.dtype.isnative
    np.testing.assert_array_equal(img.array, reference.array)
    np.testing.assert_allclose(img.affine, reference.affine)


def test_jpeg_baseline_colour_is_converted_to_rgb(pydicom_file) -> None:
    jpeg = read_image(pydicom_file("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG baseline, YBR_FULL
    raw = read_image(pydicom_file("SC_rgb_dcmtk_+eb+cr.dcm"))  # the same picture, uncompressed RGB
    assert jpeg.num_channels == 3 and jpeg.ndim == 2 and jpeg.spatial_shape == (100, 100)
    assert jpeg.meta["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.50"
    diff = np.abs(jpeg.array.astype(np.int16) - raw.array.astype(np.int16))
    assert diff.mean() < 3.0  # lossy, but RGB in the same channel order
    # channels are different colours, so a channel mix-up would not pass
    assert np.abs(raw.array[0].astype(int) - raw.array[2].astype(int)).mean() > 20


def test_multiframe_ultrasound_ybr_becomes_rgb_frames(pydicom_file) -> None:
    path = pydicom_file("examples_ybr_color.dcm")
    ds = pydicom.dcmread(path)
    img = read_image(path)
    frames = ds.pixel_array  # (30, rows, cols, 3), converted to RGB by pydicom
    assert img.num_channels == 3 and img.spatial_shape == (ds.Columns, ds.Rows, 30)
    np.testing.assert_array_equal(img.array, np.transpose(frames, (3, 2, 1, 0)))
    assert img.spacing[2] == 1.0  # frames are time, not distance


def test_palette_colour_becomes_three_channels(pydicom_file) -> None:
    from pydicom.pixels import apply_color_lut

    path = pydicom_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    img = read_image(path)
    assert img.ndim == 2 and img.num_channels == 3
    np.testing.assert_array_equal(img.array, np.transpose(apply_color_lut(ds.pixel_array, ds), (2, 1, 0)))


def test_rt_dose_frames_are_positioned_and_scaled(pydicom_file) -> None:
    path = pydicom_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    img = read_image(path)
    offsets = np.array([float(v) for v in ds.GridFrameOffsetVector])
    assert img.spatial_shape == (ds.Columns, ds.Rows, len(offsets))
    np.testing.assert_allclose(img.spacing[2], abs(offsets[1] - offsets[0]))
    dose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    order = np.argsort(offsets * np.sign(normal[2]))  # frames sorted along the slice normal
    np.testing.assert_allclose(img.array[0], np.transpose(dose[order], (2, 1, 0)), rtol=1e-6)


def test_truncated_file_is_an_image_read_error(pydicom_file) -> None:
    path = pydicom_file("MR_truncated.dcm")
    with pytest.raises(ImageReadError, match=r"MR_truncated.dcm"):
        read_image(path)


def test_undecodable_syntax_names_the_syntax_and_package(pydicom_file) -> None:
    # This JPEG Extended file has a broken scan header that pylibjpeg rejects.
    with pytest.raises(ImageReadError, match=r"JPEG Extended.*1\.2\.840\.10008\.1\.2\.4\.51") as err:
        read_image(pydicom_file("JPEG-lossy.dcm"))
    assert "pylibjpeg-libjpeg" in str(err.value)


def test_missing_decoder_plugin_says_what_to_install(monkeypatch: pytest.MonkeyPatch, pydicom_file) -> None:
    from pydicom.dataset import Dataset

    def no_plugin(self: Dataset) -> np.ndarray:
        raise RuntimeError(
            "Unable to decompress 'JPEG-LS Lossless Image Compression' pixel data because all plugins are "
            "missing dependencies:\n    pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
        )

    monkeypatch.setattr(Dataset, "pixel_array", property(no_plugin))
    with pytest.raises(ImageReadError, match="JPEG-LS Lossless") as err:
        read_image(pydicom_file("MR_small_jpeg_ls_lossless.dcm"))
    assert "install pylibjpeg-libjpeg" in str(err.value)


def test_file_without_extension_is_found_by_its_preamble(tmp_path: Path, pydicom_file) -> None:
    copy = tmp_path / "IM000001"
    copy.write_bytes(pydicom_file("MR_small.dcm").read_bytes())
    assert image_format(copy) == "dicom"
    assert read_image(copy).spatial_shape == (64, 64, 1)


def test_non_image_dicom_is_an_error(pydicom_file) -> None:
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(pydicom_file("rtplan.dcm"))


def _enhanced_mr(path: Path, order: list[int], step: float = 1.5) -> np.ndarray:
    """Write an enhanced MR file whose frame f holds slice order[f]; return the rescaled slices in k order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rows, cols = 4, 6
    slices = np.stack([np.full((rows, cols), 10 * (k + 1), dtype=np.uint16) for k in range(max(order) + 1)])
    slices[:, 0, 1] = 7  # asymmetric in-plane marker
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "MR", "SYNTH-002"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, len(order)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.25]
    measures.SliceThickness = 1.0
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for k in order:
        item, pos, vt = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [10.0 - k * step, -5.0, 30.0]  # normal = row x col = -x (LPS)
        vt.RescaleSlope, vt.RescaleIntercept = 1 + 0.5 * k, -k  # per-frame rescale
        item.PlanePositionSequence = Sequence([pos])
        item.PixelValueTransformationSequence = Sequence([vt])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = slices[order].tobytes()
    ds.save_as(path, enforce_file_format=True)
    return np.stack([sl * (1 + 0.5 * k) - k for k, sl in enumerate(slices)])  # physical values


def test_enhanced_multiframe_frames_sorted_by_plane_position(tmp_path: Path) -> None:
    order = [2, 0, 3, 1]
    values = _enhanced_mr(tmp_path / "enhanced.dcm", order)
    img = read_image(tmp_path / "enhanced.dcm")
    assert img.spatial_shape == (6, 4, 4)
    assert img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array[0], np.transpose(values, (2, 1, 0)))
    assert img.meta["frame_order"] == [2, 4, 1, 3]  # 1-based stored frame of each slice
    np.testing.assert_allclose(img.spacing, (0.25, 0.5, 1.5))
    # k follows the normal -x LPS = +x RAS; i follows the row direction +y LPS = -y RAS
    np.testing.assert_allclose(img.direction[:, 2], [1, 0, 0], atol=1e-9)
    np.testing.assert_allclose(img.direction[:, 0], [0, -1, 0], atol=1e-9)
    np.testing.assert_allclose(img.origin, [-10.0, 5.0, 30.0])


def test_enhanced_multiframe_with_a_missing_frame_is_an_error(tmp_path: Path) -> None:
    _enhanced_mr(tmp_path / "gap.dcm", [0, 1, 3, 4])
    with pytest.raises(ImageReadError, match="missing slice"):
        read_image(tmp_path / "gap.dcm")
