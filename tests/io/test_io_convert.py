"""``convert``: DICOM folders and files, npz images -> NIfTI/PNG with geometry kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medlens.errors import InputError
from medlens.io import read_image
from medlens.io.convert import convert


def test_dicom_series_to_nifti_keeps_geometry_and_values(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "dicom", angles=(10.0, 0.0, 30.0), slices=5)
    original = read_image(s.folder)
    out = convert(s.folder, tmp_path / "ct.nii.gz")
    assert out == tmp_path / "ct.nii.gz"
    back = read_image(out)
    np.testing.assert_array_equal(back.array, original.array)
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-4)
    assert back.modality == "CT"


def test_output_folder_names_the_file_after_the_series(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "dicom", series_number=4, description="AX T1 post")
    outdir = tmp_path / "out"  # does not exist yet; a name without extension is a folder
    out = convert(s.folder, outdir)
    assert out == outdir / "4_AX_T1_post.nii.gz" and out.exists()
    assert convert(s.folder, outdir) == out  # an existing folder works too


def test_single_dicom_slice_to_png_uses_the_stored_window(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "dicom", slices=1, intercept=-100.0)  # HU -100..26, window 40/400
    src = s.files[0]
    out = convert(src, tmp_path / "ct.png")
    png = read_image(out)
    hu = read_image(src).array[0, :, :, 0]
    assert read_image(src).meta["window"] == [40.0, 400.0]
    assert png.array.shape == (1, *hu.shape) and png.array.dtype == np.uint8
    expected = (hu - (40.0 - 200.0)) * 255.0 / 400.0  # not the min/max of the image
    assert np.abs(png.array[0] - expected).max() <= 0.5 + 1e-6


def test_single_dicom_file_to_nifti_keeps_hu(tmp_path: Path, pydicom_file) -> None:
    src = pydicom_file("CT_small.dcm")
    back = read_image(convert(src, tmp_path / "ct.nii"))
    np.testing.assert_array_equal(back.array, read_image(src).array)


def test_npz_image_to_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 256, size=(2, 28, 28, 3)).astype(np.uint8)
        for s in ("train", "val", "test")
    }
    arrays |= {f"{s}_labels": np.zeros((2, 1), dtype=np.uint8) for s in ("train", "val", "test")}
    np.savez(tmp_path / "derma.npz", **arrays)
    out = convert(tmp_path / "derma.npz", tmp_path / "one.png", index="val:1")
    np.testing.assert_array_equal(read_image(out).array, np.transpose(arrays["val_images"][1], (2, 1, 0)))


def test_3d_to_png_and_unknown_output_are_refused(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "dicom", slices=3)
    with pytest.raises(InputError, match="pick a 2D image, or write NIfTI"):
        convert(s.folder, tmp_path / "x.png")
    with pytest.raises(InputError, match=r"\.nii\.gz"):
        convert(s.folder, tmp_path / "x.bmp")
    assert not list(tmp_path.glob("x*"))
