"""``medlens predict ... --dicom-out``: DICOM-SEG + SR next to the label map, an SR per classified image."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dicom_synth import oblique_affine, write_mr_series, write_single_frame
from medlens.errors import InputError
from medlens.io import Image, read_image


def invoke(*args: str):
    from typer.testing import CliRunner

    from medlens.cli import app

    return CliRunner().invoke(app, ["predict", *args, "--device", "cpu"])


def no_dciodvfy_errors(path: Path) -> bool:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; cannot validate DICOM output")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], f"{path.name}: {errors}"
    return True


def test_predict_dicom_out_writes_seg_and_sr_matching_the_label_map(seg_run, tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medlens.io.dicom_seg import read_segmentation

    dataset, run = seg_run
    case = read_image(dataset.root / dataset.test[0].image[0])
    # the test case as an oblique MR series (same voxel size as training), scaled to use the 16-bit range
    affine = oblique_affine(case.spacing, (15.0, -25.0, 40.0), (-10.0, 20.0, 30.0))
    write_mr_series(Image(case.array * 100.0, affine, modality="MR"), tmp_path / "dicom" / "blob")
    result = invoke(str(run), str(tmp_path / "dicom" / "blob"), "--out", str(tmp_path / "nii"),
                    "--dicom-out", str(tmp_path / "dcm"))  # fmt: skip
    assert result.exit_code == 0, result.output
    label = read_image(tmp_path / "nii" / "blob.nii.gz")
    seg_path, sr_path = tmp_path / "dcm" / "blob_seg.dcm", tmp_path / "dcm" / "blob_sr.dcm"
    assert f"wrote {seg_path}" in result.output.replace("\n", "")
    source = read_image(tmp_path / "dicom" / "blob")
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
    blob = np.asarray(label.array[0])
    assert 0 < blob.sum() < blob.size  # the model found a blob, not everything

    seg = read_segmentation(seg_path)
    assert seg.segments == {1: "blob"}
    for k, sop in enumerate(source.meta["SOPInstanceUIDs"]):
        np.testing.assert_array_equal(seg.frame(sop), blob[:, :, k].T, err_msg=f"slice {k}")

    sr = hd.sr.srread(sr_path)
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    (volume,) = group.get_measurements(name=codes.SCT.Volume)
    assert volume.value == pytest.approx(blob.sum() * float(np.prod(case.spacing)))
    assert group.referenced_segment.referenced_sop_instance_uid == seg.dataset.SOPInstanceUID
    assert sr.StudyInstanceUID == seg.dataset.StudyInstanceUID == source.meta["StudyInstanceUID"]
    assert run.name in sr.SoftwareVersions
    assert no_dciodvfy_errors(seg_path) and no_dciodvfy_errors(sr_path)

    # with the predictor's uncertainty (engineer C): the SR carries the score; no referral threshold in this run
    from medlens.serve import load_predictor
    from medlens.serve.dicom_out import dicom_sources, write_dicom_results

    bare = tmp_path / "run_without_referral"  # the shared run may have been evaluated (a referral decided)
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("cache", "evaluation", "fold_*"))
    for fold in run.glob("fold_*"):
        (bare / fold.name).symlink_to(fold)
    info = json.loads((bare / "run.json").read_text())
    info.pop("referral", None)
    (bare / "run.json").write_text(json.dumps(info))
    pred = load_predictor(bare, device="cpu", backend="torch").predict(source, uncertainty=True)
    (_, sr_unc) = write_dicom_results(pred, dicom_sources(source), tmp_path / "unc", run_info=bare)
    (group,) = hd.sr.srread(sr_unc).content.get_image_measurement_groups()
    (score,) = group.get_measurements()
    assert score.name.meaning.startswith("Uncertainty (") and score.value == pytest.approx(
        pred.uncertainty_score
    )
    assert no_dciodvfy_errors(sr_unc)


def test_nifti_input_with_dicom_out_is_refused_before_predicting(seg_run, tmp_path: Path) -> None:
    dataset, run = seg_run
    nifti = dataset.root / dataset.test[0].image[0]
    result = invoke(
        str(run), str(nifti), "--out", str(tmp_path / "nii"), "--dicom-out", str(tmp_path / "dcm")
    )
    assert isinstance(result.exception, InputError)
    message = str(result.exception)
    assert str(nifti) in message and "is not DICOM" in message and "DICOM source" in message
    assert not (tmp_path / "nii").exists() and not (tmp_path / "dcm").exists()


def test_classification_sr_carries_the_predicted_probabilities(cls_run, tmp_path: Path) -> None:
    import highdicom as hd

    dataset, run = cls_run
    image = read_image(dataset.root / dataset.test[0].image[0])
    write_single_frame(image, tmp_path / "dicom" / "film" / "film.dcm")
    result = invoke(str(run), str(tmp_path / "dicom" / "film"), "--out", str(tmp_path / "out"),
                    "--dicom-out", str(tmp_path / "dcm"))  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"][0]
    sr_path = tmp_path / "dcm" / "film_sr.dcm"
    assert no_dciodvfy_errors(sr_path)
    (group,) = hd.sr.srread(sr_path).content.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    for name, p in row["probabilities"].items():
        assert values[f"Probability of {name}"] == pytest.approx(p, abs=1e-6)
    assert values["Threshold Value"] == pytest.approx(row["threshold"])
    decision = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
    assert decision["Predicted class"] == row["prediction"]


def test_a_hostile_series_number_cannot_choose_where_results_land(tmp_path: Path) -> None:
    """A PACS sends the headers: SeriesNumber as LO '/../../escaped' must not climb out of the output folder."""
    from pydicom.dataelem import DataElement

    from medlens.serve.dicom_out import dicom_sources, write_dicom_results

    image = Image((np.indices((6, 5, 3)).sum(0) % 2 * 50.0 + 10.0)[None], np.eye(4), modality="MR")
    write_mr_series(image, tmp_path / "series")
    source = read_image(tmp_path / "series")
    sources = dicom_sources(source)
    for ds in sources:  # explicit VR lets a file declare SeriesNumber as any string VR
        ds[0x00200011] = DataElement(0x00200011, "LO", "/../../escaped")
    out = tmp_path / "a" / "b" / "out"
    label = source.with_array((np.asarray(source.array) > 30).astype(np.uint8))
    info = {"task": "segmentation", "run_name": "r", "dataset": {"name": "d", "labels": {"bg": 0, "fg": 1}}}
    paths = write_dicom_results(label, sources, out, run_info=info)
    assert [p.parent for p in paths] == [out, out]
    assert all(p.name.startswith("series") and "/" not in p.name for p in paths)
    assert not list(tmp_path.rglob("escaped*"))
    for hostile, expected in (("../../x", "_.._x"), ("...", "result"), ("a/b c" * 40, None)):
        from medlens.serve.dicom_out import MAX_STEM, safe_stem

        stem = safe_stem(hostile)
        assert stem == expected if expected else len(stem) == MAX_STEM
        assert not stem.startswith(".") and set(stem) <= set(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
        )
