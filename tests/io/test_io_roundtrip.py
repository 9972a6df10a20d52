"""Write then read: NIfTI, NRRD and MHA keep array and affine; PNG keeps label maps; bad writes are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medlens.errors import ImageReadError, InputError
from medlens.io import Image, image_format, read_image, write_image


def _oblique_affine(seed: int = 0, nd: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(nd, nd)))
    affine = np.eye(nd + 1)
    affine[:nd, :nd] = q * rng.uniform(0.4, 3.0, size=nd)
    affine[:nd, nd] = rng.uniform(-100, 100, size=nd)
    return affine


def _images() -> dict[str, Image]:
    rng = np.random.default_rng(1)
    return {
        "3d-oblique": Image(
            rng.normal(size=(1, 6, 5, 4)).astype(np.float32), _oblique_affine(0), modality="MR"
        ),
        "2d": Image(rng.integers(0, 200, size=(1, 7, 3)).astype(np.uint8), np.diag([0.3, 0.5, 1.0])),
        "4d-multichannel": Image(
            rng.integers(-500, 500, size=(3, 4, 5, 6)).astype(np.int16), _oblique_affine(2)
        ),
    }


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["3d-oblique", "2d", "4d-multichannel"])
def test_roundtrip_preserves_array_and_affine(tmp_path: Path, suffix: str, kind: str) -> None:
    img = _images()[kind]
    path = write_image(img, tmp_path / f"img{suffix}")
    back = read_image(path)
    assert back.ndim == img.ndim and back.array.dtype == img.array.dtype
    np.testing.assert_array_equal(back.array, img.array)
    # NIfTI stores the sform in float32; NRRD and MetaImage keep full precision
    atol = 1e-4 if "nii" in suffix else 1e-9
    np.testing.assert_allclose(back.affine, img.affine, atol=atol, rtol=0)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_nifti_keeps_modality_and_index_order(tmp_path: Path) -> None:
    import nibabel as nib

    arr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(1, 2, 3, 4)
    img = Image.from_spacing(arr, spacing=(1.0, 2.0, 3.0), modality="CT")
    path = write_image(img, tmp_path / "ct.nii.gz")
    raw = nib.load(path)
    assert raw.shape == (2, 3, 4)  # nibabel sees (i, j, k) unchanged
    np.testing.assert_array_equal(np.asarray(raw.dataobj), arr[0])
    assert read_image(path).modality == "CT"


def test_nrrd_reads_lps_geometry_as_ras(tmp_path: Path) -> None:
    import SimpleITK as sitk

    itk = sitk.GetImageFromArray(np.zeros((4, 3, 2), dtype=np.float32))  # (z, y, x)
    itk.SetOrigin((10.0, 20.0, 30.0))
    itk.SetSpacing((0.5, 0.6, 2.0))
    sitk.WriteImage(itk, str(tmp_path / "x.nrrd"))
    img = read_image(tmp_path / "x.nrrd")
    assert img.spatial_shape == (2, 3, 4)
    np.testing.assert_allclose(img.origin, (-10.0, -20.0, 30.0))
    np.testing.assert_allclose(img.affine[:3, :3], np.diag([-0.5, -0.6, 2.0]))


def test_png_label_map_and_16bit_roundtrip(tmp_path: Path) -> None:
    labels = Image.from_spacing(np.random.default_rng(0).integers(0, 5, size=(1, 9, 4)).astype(np.int64))
    back = read_image(write_image(labels, tmp_path / "labels.png"))
    np.testing.assert_array_equal(back.array, labels.array)
    wide = Image.from_spacing(np.array([[[0, 1000], [40000, 65535]]], dtype=np.int32))
    back16 = read_image(write_image(wide, tmp_path / "wide.png"))
    assert back16.array.dtype == np.uint16
    np.testing.assert_array_equal(back16.array, wide.array)


def test_png_float_is_windowed(tmp_path: Path) -> None:
    arr = np.array([[[-1000.0, 20.0, 1000.0]]], dtype=np.float32)  # (1, 1, 3): one column, three rows
    back = read_image(write_image(Image.from_spacing(arr), tmp_path / "f.png"))
    np.testing.assert_array_equal(back.array, [[[0, 130, 255]]])  # min/max: 1020 / 2000 * 255 = 130.05
    windowed = read_image(write_image(Image.from_spacing(arr), tmp_path / "w.png", window=(-100.0, 100.0)))
    np.testing.assert_array_equal(windowed.array, [[[0, 153, 255]]])  # 120 / 200 * 255 = 153, ends clipped
    ramp = Image.from_spacing(np.linspace(-50, 50, 5, dtype=np.float32)[None, None])
    np.testing.assert_array_equal(
        read_image(write_image(ramp, tmp_path / "r.png", window=(-100, 100))).array,
        [[[64, 96, 128, 159, 191]]],
    )


def test_png_rgb_roundtrip_and_single_slice_3d(tmp_path: Path) -> None:
    rgb = Image.from_spacing(np.random.default_rng(3).integers(0, 256, size=(3, 5, 4)).astype(np.uint8))
    np.testing.assert_array_equal(read_image(write_image(rgb, tmp_path / "rgb.png")).array, rgb.array)
    one_slice = Image.from_spacing(np.arange(6, dtype=np.uint8).reshape(1, 3, 2, 1))
    np.testing.assert_array_equal(
        read_image(write_image(one_slice, tmp_path / "s.png")).array, one_slice.array[..., 0]
    )


def test_refused_writes(tmp_path: Path) -> None:
    vol = Image.from_spacing(np.zeros((1, 4, 4, 3), dtype=np.float32))
    with pytest.raises(InputError, match=r"3D.*NIfTI"):
        write_image(vol, tmp_path / "v.png")
    with pytest.raises(InputError, match=r"1 \(gray\) or 3"):
        write_image(Image.from_spacing(np.zeros((2, 4, 4), dtype=np.uint8)), tmp_path / "two.png")
    with pytest.raises(InputError, match=r"\.xyz"):
        write_image(vol, tmp_path / "v.xyz")
    with pytest.raises(InputError, match="PNG output only"):
        write_image(vol, tmp_path / "v.nii.gz", window=(0, 1))
    assert not any(tmp_path.iterdir())


def test_formats_and_unknown_files(tmp_path: Path) -> None:
    for name, fmt in [("a.nii.gz", "nifti"), ("b.nhdr", "nrrd"), ("c.mhd", "metaimage"), ("d.JPG", "jpeg")]:
        (tmp_path / name).write_bytes(b"x")
        assert image_format(tmp_path / name) == fmt
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match=r"notes.txt.*not an image format"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match="index= chooses an image in a MedMNIST"):
        read_image(tmp_path / "a.nii.gz", index="train:0")
    with pytest.raises(InputError, match="unknown modality"):
        read_image(tmp_path / "a.nii.gz", modality="CAT")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".png"])
def test_truncated_files_are_image_read_errors(tmp_path: Path, suffix: str) -> None:
    img = Image.from_spacing(np.random.default_rng(0).integers(0, 255, size=(1, 16, 16)).astype(np.uint8))
    path = write_image(img, tmp_path / f"t{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageReadError, match=f"t{suffix}"):
        read_image(path)
