"""DICOM series from folders: ordering, geometry, rescale, series choice and the errors a bad series gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medlens.errors import ImageReadError
from medlens.io import read_image
from medlens.io.dicom import list_series
from medlens.io.image import LPS_RAS_FLIP


def _all_indices(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i, j, k = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return i.ravel(), j.ravel(), k.ravel()


def test_shuffled_names_and_reversed_instance_numbers_sort_by_position(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "ct", names="shuffled", instance_numbers="reversed", slope=2.0, intercept=-1024)
    img = read_image(s.folder)
    assert img.modality == "CT"
    assert img.spatial_shape == (7, 5, 4)  # (columns, rows, slices)
    assert img.array.dtype == np.float32
    expected_hu = s.stored.astype(np.float32) * 2.0 - 1024.0  # (k, rows, cols)
    np.testing.assert_array_equal(img.array[0], np.transpose(expected_hu, (2, 1, 0)))
    # slice spacing from positions (2.5), not SliceThickness (9.0); in-plane (columns, rows) = (0.9, 0.7)
    np.testing.assert_allclose(img.spacing, (0.9, 0.7, 2.5), atol=1e-5)
    assert img.meta["SOPInstanceUIDs"] == s.sop_uids
    assert img.meta["files"] == [str(f) for f in s.files]
    assert img.meta["SeriesInstanceUID"] == s.series_uid
    assert img.meta["StudyInstanceUID"] == s.study_uid
    assert img.meta["PatientID"] == "SYNTH-001"
    assert img.meta["Modality"] == "CT"


def test_oblique_anisotropic_series_world_coordinates_match_dicom(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "obl", angles=(20.0, -35.0, 50.0), pixel_spacing=(0.6, 1.4), step=3.2, slices=5)
    img = read_image(s.folder)
    i, j, k = _all_indices(img.spatial_shape)
    ras = img.index_to_world(np.stack([i, j, k], axis=-1))
    lps = s.world_lps(i, j, k)
    np.testing.assert_allclose(ras * [-1, -1, 1], lps, atol=1e-4)
    np.testing.assert_allclose(img.spacing, (1.4, 0.6, 3.2), atol=1e-5)
    # a voxel's value is the one DICOM stores at that (row, column) of that slice
    np.testing.assert_array_equal(img.array[0][i, j, k], s.stored[k, j, i] - 1024.0)


def test_world_coordinates_and_values_agree_with_simpleitk(tmp_path: Path, ct_series) -> None:
    import SimpleITK as sitk

    s = ct_series(tmp_path / "obl", angles=(15.0, 25.0, -40.0), pixel_spacing=(0.8, 1.1), step=2.0, slices=4)
    img = read_image(s.folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(s.folder)))
    ref = reader.Execute()
    assert ref.GetSize() == img.spatial_shape  # SimpleITK index (x, y, z) = medlens (i, j, k)
    i, j, k = _all_indices(img.spatial_shape)
    ours = img.index_to_world(np.stack([i, j, k], axis=-1))
    theirs_lps = np.array(
        [ref.TransformIndexToPhysicalPoint((int(a), int(b), int(c))) for a, b, c in zip(i, j, k, strict=True)]
    )
    theirs_ras = (np.c_[theirs_lps, np.ones(len(theirs_lps))] @ LPS_RAS_FLIP.T)[:, :3]
    np.testing.assert_allclose(ours, theirs_ras, atol=1e-4)
    ref_values = sitk.GetArrayFromImage(ref)  # (z, y, x)
    np.testing.assert_allclose(img.array[0][i, j, k], ref_values[k, j, i], atol=1e-3)


def test_missing_slice_is_an_error_naming_the_series(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "gap", slices=6, drop=[3], description="AX GAP")
    with pytest.raises(ImageReadError, match="missing slice") as err:
        read_image(s.folder)
    assert "AX GAP" in str(err.value) and s.series_uid in str(err.value)


@pytest.mark.parametrize(
    ("knob", "message"),
    [
        ({"duplicate": 1}, "share a position"),
        ({"extra_offsets": {2: 0.6}, "slices": 5}, "uneven slice spacing"),
        ({"odd_size": 1}, "mixes image sizes"),
        ({"odd_orientation": 2}, "mixes 2 slice orientations"),
    ],
)
def test_irregular_series_is_an_error(tmp_path: Path, ct_series, knob: dict, message: str) -> None:
    s = ct_series(tmp_path / "bad", description="BAD ONE", **knob)
    with pytest.raises(ImageReadError, match=message) as err:
        read_image(s.folder)
    assert "BAD ONE" in str(err.value)


def test_two_series_listed_default_largest_and_chosen(tmp_path: Path, ct_series) -> None:
    folder = tmp_path / "study"
    small = ct_series(folder / "a", slices=3, series_number=2, description="SMALL", seed=1)
    big = ct_series(folder / "b", slices=5, series_number=7, description="BIG", study_uid=small.study_uid)
    (folder / "README").write_text("not dicom")
    (folder / "DICOMDIR").write_bytes(b"\0" * 200)
    infos = list_series(folder)
    assert [(s.number, s.description, s.num_files, s.shape) for s in infos] == [
        (2, "SMALL", 3, (7, 5, 3)),
        (7, "BIG", 5, (7, 5, 5)),
    ]
    assert "BIG" in str(infos[1]) and big.series_uid in str(infos[1])
    assert read_image(folder).meta["SeriesInstanceUID"] == big.series_uid  # most slices by default
    assert read_image(folder, series=small.series_uid).spatial_shape == (7, 5, 3)
    assert read_image(folder, series=2).meta["SeriesDescription"] == "SMALL"  # SeriesNumber
    assert read_image(folder, series="7").meta["SeriesDescription"] == "BIG"
    assert read_image(folder, series=0).meta["SeriesDescription"] == "SMALL"  # position in the list
    with pytest.raises(ImageReadError, match=r"no series '42'.*SMALL.*BIG"):
        read_image(folder, series=42)


def test_single_slice_series_is_3d_with_one_slice(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "one", slices=1)
    img = read_image(s.folder)
    assert img.spatial_shape == (7, 5, 1) and img.ndim == 3
    np.testing.assert_allclose(img.origin, s.positions[0] * [-1, -1, 1], atol=1e-5)


def test_empty_folder_and_folder_without_images(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="empty"):
        read_image(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    (junk / "scan.dcm").write_bytes(b"\0" * 64)
    with pytest.raises(ImageReadError, match="no readable DICOM image") as err:
        read_image(junk)
    assert str(junk) in str(err.value)
    with pytest.raises(ImageReadError, match="empty"):
        list_series(empty)


def test_truncated_slice_in_a_series_names_the_file(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "trunc", slices=3)
    data = s.files[1].read_bytes()
    s.files[1].write_bytes(data[:-20])
    with pytest.raises(ImageReadError) as err:
        read_image(s.folder)
    assert s.files[1].name in str(err.value)


def test_series_without_geometry_is_stacked_by_instance_number(tmp_path: Path, ct_series) -> None:
    s = ct_series(tmp_path / "sc", slices=3, geometry=False, instance_numbers="reversed")
    img = read_image(s.folder)
    # InstanceNumber runs opposite to the written order, and it is all there is to go by
    np.testing.assert_array_equal(img.array[0], np.transpose(s.stored[::-1] - 1024.0, (2, 1, 0)))
    np.testing.assert_allclose(img.spacing, (0.9, 0.7, 1.0))
