"""DICOM-SEG and TID 1500 SR of predictions: frames on the right source slices, volumes, codes, dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dicom_synth import oblique_affine, write_mr_series, write_single_frame
from medlens.errors import InputError
from medlens.io import Image, read_image
from medlens.io.dicom_codes import LOCAL_SCHEME, segment_codes
from medlens.io.dicom_seg import label_frames, read_segmentation
from medlens.serve.classify import ClassificationPrediction
from medlens.serve.dicom_out import dicom_sources, write_dicom_results

LABELS = {"background": 0, "CSF": 1, "grey_matter": 2, "White matter": 3, "blob": 4}
SHAPE = (16, 14, 12)  # columns x rows x slices: not square, so a rows/columns mix-up cannot pass


def run_info(labels: dict[str, int] = LABELS, **extra: object) -> dict[str, object]:
    return {
        "task": "segmentation",
        "medlens_version": "0.1.0",
        "run_name": "brain-run",
        "dataset": {"name": "brains", "labels": labels},
        **extra,
    }


def pattern(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Labels 0..3 in bands that move with the slice: a frame put on the wrong slice or flipped differs."""
    i, j, k = np.indices(shape)
    return ((i // 3 + j // 4 + k) % 4).astype(np.uint8)


@pytest.fixture
def oblique(tmp_path: Path) -> Image:
    """An oblique, anisotropic MR series on disk, read back by medlens (meta holds the files)."""
    affine = oblique_affine((1.5, 1.2, 2.0), (20.0, -35.0, 50.0), (-20.0, 15.0, 40.0))
    image = Image((100.0 + 10.0 * pattern())[None], affine, modality="MR")
    write_mr_series(image, tmp_path / "series")
    read = read_image(tmp_path / "series")
    np.testing.assert_allclose(read.affine, affine, atol=1e-4)
    return read


def dciodvfy_errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; cannot validate DICOM output")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_seg_frames_overlay_exactly_the_source_slice_they_reference(oblique: Image, tmp_path: Path) -> None:
    label = oblique.with_array(pattern()[None])
    seg_path, _ = write_dicom_results(label, dicom_sources(oblique), tmp_path / "out", run_info=run_info())
    seg = read_segmentation(seg_path)
    assert seg.segments == {1: "CSF", 2: "grey_matter", 3: "White matter", 4: "blob"}
    assert seg.source_series == [oblique.meta["SeriesInstanceUID"]]
    sops = oblique.meta["SOPInstanceUIDs"]  # slice order k = 0, 1, ...
    assert sorted(seg.frames) == sorted((sop, 1) for sop in sops)
    for k, sop in enumerate(sops):
        expected = pattern()[:, :, k].T  # (rows, columns) of DICOM slice k
        np.testing.assert_array_equal(seg.frame(sop), expected, err_msg=f"slice {k}")
    assert seg.dataset.Manufacturer == "medlens"
    assert "0.1.0" in seg.dataset.SoftwareVersions and "brain-run" in seg.dataset.SoftwareVersions


def test_enhanced_multiframe_source_frames_get_their_own_labels(oblique: Image, tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    legacy = [pydicom.dcmread(f) for f in oblique.meta["files"]]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(legacy, generate_uid(), 9, generate_uid(), 1)
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    image = read_image(tmp_path / "enhanced.dcm")
    np.testing.assert_allclose(image.affine, oblique.affine, atol=1e-4)
    seg_path, sr_path = write_dicom_results(
        image.with_array(pattern()[None]), dicom_sources(image), tmp_path / "out", run_info=run_info()
    )
    seg = read_segmentation(seg_path)
    for k, number in enumerate(image.meta["frame_order"]):  # stored frame number of slice k
        np.testing.assert_array_equal(seg.frame(enhanced.SOPInstanceUID, number), pattern()[:, :, k].T)
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []


def test_label_map_in_another_index_order_lands_on_the_same_pixels(oblique: Image) -> None:
    sources = dicom_sources(oblique)
    direct = label_frames(oblique.with_array(pattern()[None]), sources)
    # the same voxels indexed (k, i, j) with i reversed: a different array and affine, the same world grid
    arr = np.transpose(pattern()[::-1], (2, 0, 1))
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, SHAPE[0] - 1
    perm = np.eye(4)[[2, 0, 1, 3]].T  # new index (k, i', j) -> old (i', j, k)
    other = Image(arr[None], oblique.affine @ flip @ perm)
    np.testing.assert_array_equal(label_frames(other, sources), direct)


def test_label_map_off_the_source_grid_is_refused(oblique: Image) -> None:
    sources = dicom_sources(oblique)
    shifted = oblique.with_array(pattern()[None])
    shifted.affine = shifted.affine.copy()
    shifted.affine[:3, 3] += shifted.affine[:3, 0] * 0.5  # half a voxel along i
    with pytest.raises(InputError, match="off the grid"):
        label_frames(shifted, sources)
    cropped = Image(pattern()[None, :, :, :6], oblique.affine)
    with pytest.raises(InputError, match="outside the map"):
        label_frames(cropped, sources)
    with pytest.raises(InputError, match="one channel"):
        label_frames(Image(np.stack([pattern(), pattern()]), oblique.affine), sources)
    with pytest.raises(InputError, match="no source"):
        write_dicom_results(oblique.with_array(pattern()[None]), [], "unused", run_info=run_info())


def test_seg_and_sr_validate_with_zero_dciodvfy_errors(oblique: Image, tmp_path: Path) -> None:
    label = oblique.with_array(pattern()[None])
    prediction = SimpleNamespace(
        label=label,
        uncertainty=None,
        uncertainty_score=0.42,
        refer=True,
        uncertainty_info={"score_name": "mean voxel entropy", "threshold": 0.3},
    )
    paths = write_dicom_results(prediction, dicom_sources(oblique), tmp_path, run_info=run_info())
    assert [p.name for p in paths] == ["series5_seg.dcm", "series5_sr.dcm"]
    for p in paths:
        assert dciodvfy_errors(p) == [], p.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes left no temporaries


def test_sr_volumes_are_voxel_counts_times_voxel_volume(oblique: Image, tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    label = oblique.with_array(pattern()[None])
    seg_path, sr_path = write_dicom_results(label, dicom_sources(oblique), tmp_path, run_info=run_info())
    seg, sr = pydicom.dcmread(seg_path), hd.sr.srread(sr_path)
    source = pydicom.dcmread(oblique.meta["files"][0])
    # new series in the source's study, patient copied, nothing invented
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
    assert len({seg.SeriesInstanceUID, sr.SeriesInstanceUID, source.SeriesInstanceUID}) == 3
    assert (sr.PatientID, sr.PatientName, sr.PatientBirthDate) == ("SYNTH-7", "Synthetic^Seven", "19700101")
    voxel = 1.5 * 1.2 * 2.0
    expected = {n: float(np.sum(pattern() == v)) * voxel for n, v in LABELS.items() if v}
    number_to_label = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    found = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit.value == "mm3"
        found[number_to_label[ref.referenced_segment_numbers[0]]] = volume.value
    assert found == pytest.approx(expected)
    assert found["blob"] == 0.0  # an absent label: a segment with no frame and zero volume
    assert len(seg.SegmentSequence) == 4


def test_nothing_found_still_gives_a_valid_seg_and_zero_volumes(oblique: Image, tmp_path: Path) -> None:
    import highdicom as hd

    empty = oblique.with_array(np.zeros((1, *SHAPE), np.uint8))
    seg_path, sr_path = write_dicom_results(empty, dicom_sources(oblique), tmp_path, run_info=run_info())
    seg = read_segmentation(seg_path)
    assert len(seg.segments) == 4 and all(not f.any() for f in seg.frames.values())
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    assert [g.get_measurements()[0].value for g in groups] == [0.0] * 4
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []


def test_2d_label_on_a_film_without_patient_geometry(tmp_path: Path) -> None:
    film = write_single_frame(
        Image.from_spacing(np.arange(96, dtype=np.float32).reshape(1, 12, 8)), tmp_path / "f.dcm"
    )
    image = read_image(film)
    assert image.ndim == 2  # no ImagePositionPatient: a 2D image, matched to the frame by order
    label = (np.indices((12, 8)).sum(0) % 3).astype(np.uint8)
    seg_path, sr_path = write_dicom_results(
        image.with_array(label[None]),
        dicom_sources(image),
        tmp_path,
        run_info=run_info({"bg": 0, "a": 1, "b": 2}),
    )
    frame = read_segmentation(seg_path).frame(image.meta["SOPInstanceUIDs"][0])
    np.testing.assert_array_equal(frame, label.T)  # (rows, columns) = (8, 12)
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []


def test_segment_codes_known_names_fallback_and_run_overrides() -> None:
    wm = segment_codes("White matter")
    assert (wm.category.value, wm.type.value, wm.anatomy.value) == ("85756007", "389080008", "12738006")
    assert segment_codes("tumour").category.value == "49755003"  # morphologically abnormal structure
    assert segment_codes("Tumor").type.value == "108369006"  # neoplasm
    assert segment_codes("liver").category.value == "91723000"  # anatomical structure
    blob = segment_codes("blob")
    assert (blob.category.value, blob.type.scheme_designator, blob.type.meaning) == (
        "85756007",
        LOCAL_SCHEME,
        "blob",
    )
    over = {"blob": {"category": ["49755003", "SCT", "Morphologically Abnormal Structure"],
                     "type": ["52988006", "SCT", "Lesion"]}}  # fmt: skip
    assert segment_codes("blob", over).type.value == "52988006"
    with pytest.raises(InputError, match="not a code"):
        segment_codes("blob", {"blob": {"category": "Tissue", "type": ["52988006", "SCT", "Lesion"]}})


def test_run_json_codes_reach_the_seg(oblique: Image, tmp_path: Path) -> None:
    over = {"blob": {"category": ["49755003", "SCT", "Morphologically Abnormal Structure"],
                     "type": ["52988006", "SCT", "Lesion"], "anatomy": ["12738006", "SCT", "Brain"]}}  # fmt: skip
    labels = {"background": 0, "blob": 1}
    label = oblique.with_array((pattern() == 1).astype(np.uint8)[None])
    seg_path, _ = write_dicom_results(
        label, dicom_sources(oblique), tmp_path, run_info=run_info(labels, segment_codes=over)
    )
    seg = read_segmentation(seg_path)
    assert seg.types == {1: ("52988006", "SCT", "Lesion")}
    assert seg.dataset.SegmentSequence[0].AnatomicRegionSequence[0].CodeValue == "12738006"


def test_classification_sr_has_probabilities_decision_and_threshold(tmp_path: Path) -> None:
    import highdicom as hd

    path = write_single_frame(
        Image.from_spacing(np.arange(96, dtype=np.float32).reshape(1, 12, 8)), tmp_path / "x.dcm"
    )
    image = read_image(path)
    prediction = ClassificationPrediction(
        {"normal": 0.2, "pneumonia": 0.8},
        prediction="pneumonia",
        threshold=0.35,
        uncertainty=0.61,
        refer=False,
    )
    info = {"task": "classification", "run_name": "cxr", "dataset": {"name": "chest"},
            "classification": {"type": "binary", "class_names": ["normal", "pneumonia"]},
            "referral": {"threshold": 0.7, "score_name": "predictive entropy"}}  # fmt: skip
    (sr_path,) = write_dicom_results(prediction, dicom_sources(image), tmp_path / "out", run_info=info)
    assert dciodvfy_errors(sr_path) == []
    sr = hd.sr.srread(sr_path)
    (group,) = sr.content.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values["Probability of normal"] == pytest.approx(0.2)
    assert values["Probability of pneumonia"] == pytest.approx(0.8)
    assert values["Threshold Value"] == pytest.approx(0.35)
    assert values["Uncertainty (predictive entropy)"] == pytest.approx(0.61)
    assert values["Referral threshold on the uncertainty"] == pytest.approx(0.7)
    evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
    assert evaluations == {"Predicted class": "pneumonia", "Referral to a human reader recommended": "No"}
    source = image.meta["SOPInstanceUIDs"][0]
    assert [s.referenced_sop_instance_uid for s in group.source_images] == [source]


def test_multilabel_sr_states_each_label_and_its_threshold(tmp_path: Path) -> None:
    import highdicom as hd

    path = write_single_frame(Image.from_spacing(np.ones((1, 8, 8), np.float32)), tmp_path / "x.dcm")
    prediction = ClassificationPrediction({"a": 0.9, "b": 0.1}, labels=["a"], threshold={"a": 0.5, "b": 0.4})
    info = {"dataset": {"name": "ml"}, "classification": {"class_names": ["a", "b"]}}
    (sr_path,) = write_dicom_results(prediction, dicom_sources(read_image(path)), tmp_path, run_info=info)
    assert dciodvfy_errors(sr_path) == []
    (group,) = hd.sr.srread(sr_path).content.get_image_measurement_groups()
    evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
    assert evaluations == {"a present": "Yes", "b present": "No"}
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values["Decision threshold for b"] == pytest.approx(0.4)


def test_sources_from_two_series_or_the_wrong_kind_are_refused(oblique: Image, tmp_path: Path) -> None:
    sources = dicom_sources(oblique)
    other = write_single_frame(Image.from_spacing(np.ones((1, 8, 8), np.float32)), tmp_path / "o.dcm")
    mixed = [*sources, *dicom_sources(read_image(other))]
    label = oblique.with_array(pattern()[None])
    with pytest.raises(InputError, match="studies"):
        write_dicom_results(label, mixed, tmp_path, run_info=run_info())
    with pytest.raises(InputError, match="is a segmentation"):
        write_dicom_results(label, sources, tmp_path, run_info=run_info(), kind="classification")
    with pytest.raises(InputError, match="unknown DICOM result kind"):
        write_dicom_results(label, sources, tmp_path, run_info=run_info(), kind="seg")
    nifti = Image(pattern()[None], oblique.affine, meta={"source": "x.nii.gz", "format": "nifti"})
    with pytest.raises(InputError, match=r"x\.nii\.gz: is not DICOM"):
        dicom_sources(nifti)


def test_pydicom_one_frame_liver_seg_reads(pydicom_file) -> None:
    seg = read_segmentation(pydicom_file("liver_1frame.dcm"))
    assert seg.segments == {1: "Liver"}
    assert seg.types[1][2] == "Liver"
    painted = {ref: int(f.sum()) for ref, f in seg.frames.items()}
    assert len(painted) == 3  # the file references three CT slices but holds one frame
    assert sorted(painted.values()) == [0, 0, 36233]
    assert all(f.shape == (512, 512) for f in seg.frames.values())


def test_2d_label_sizes_are_areas_in_mm2_not_volumes(tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medlens.io.dicom_seg import segment_volumes

    film = write_single_frame(
        Image.from_spacing(np.arange(96, dtype=np.float32).reshape(1, 12, 8)), tmp_path / "f.dcm"
    )
    ds = pydicom.dcmread(film)
    ds.PixelSpacing = [0.5, 0.8]  # rows 0.5 mm apart, columns 0.8 mm: a pixel is 0.4 mm2
    ds.save_as(film)
    image = read_image(film)
    assert image.ndim == 2
    label = (np.indices((12, 8)).sum(0) % 3).astype(np.uint8)
    labels = {"bg": 0, "a": 1, "b": 2}
    expected = {n: float(np.sum(label == v)) * 0.4 for n, v in labels.items() if v}
    sizes = segment_volumes(image.with_array(label[None]), labels)
    assert {n: s["mm2"] for n, s in sizes.items()} == pytest.approx(expected)
    assert not any("mm3" in s for s in sizes.values())  # an area is not labelled as a volume
    seg_path, sr_path = write_dicom_results(
        image.with_array(label[None]), dicom_sources(image), tmp_path / "out", run_info=run_info(labels)
    )
    number_to_label = {
        int(s.SegmentNumber): str(s.SegmentLabel) for s in pydicom.dcmread(seg_path).SegmentSequence
    }
    found = {}
    for group in hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups():
        (area,) = group.get_measurements()
        assert area.name == codes.SCT.Area and area.unit.value == "mm2"
        found[number_to_label[group.referenced_segment.referenced_segment_numbers[0]]] = area.value
    assert found == pytest.approx(expected)
    assert dciodvfy_errors(sr_path) == []
