"""Referral: a threshold set on validation cases, stored in run.json, and ``predict --uncertainty`` flags."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medlens.data.dataset import read_case_image
from medlens.errors import RunError
from medlens.explain.uncertainty import decide_referral, segmentation_uncertainty
from medlens.io import read_image, write_image
from medlens.serve import load_predictor
from medlens.tasks.run import read_run


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a shared run (without its cache, and without a referral another test may have decided on
    the shared run) whose run.json a test may change."""
    ignore = shutil.ignore_patterns("cache", "tb", "*optimizer*", "evaluation")
    run = Path(shutil.copytree(run_dir, dest, ignore=ignore))
    info = json.loads((run / "run.json").read_text())
    info.pop("referral", None)
    (run / "run.json").write_text(json.dumps(info))
    return run


def invoke(*args: str) -> Any:
    from typer.testing import CliRunner

    from medlens.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_segmentation_referral_is_stored_and_predict_flags_the_uncertain_cases(
    tmp_path: Path, seg_run: Any
) -> None:
    ds, shared = seg_run
    run = copy_run(shared, tmp_path / "run")
    before = read_run(run)
    ref = decide_referral(run, ds.root, fraction=0.25, device="cpu")
    after = read_run(run)
    assert after["referral"] == json.loads(json.dumps(ref))
    assert {k: v for k, v in after.items() if k != "referral"} == before  # nothing else touched
    assert ref["method"] == "ensemble" and ref["score_name"] == "mean_foreground_entropy"
    # Independently: the 75% quantile of the validation cases' scores (every fold's validation cases).
    predictor = load_predictor(run, device="cpu", backend="torch")
    val = [c for f in before["folds"] for c in before["fold_results"][str(f)]["val_cases"]]
    scores = [
        segmentation_uncertainty(predictor, read_case_image(ds, ds.case(c)), "ensemble")[2] for c in val
    ]
    assert ref["n_cases"] == len(val) and ref["threshold"] == pytest.approx(np.quantile(scores, 0.75))

    src = tmp_path / "in"
    rng = np.random.default_rng(2)
    inputs = {}
    for case in ds.test[:2]:
        image = read_case_image(ds, case)
        inputs[case.id] = image
        inputs[f"{case.id}_noisy"] = image.with_array(
            image.array + rng.normal(0, 1.5, image.array.shape).astype(np.float32)
        )
    inputs["blank"] = inputs[ds.test[0].id].with_array(
        100.0 + rng.normal(0, 0.3, inputs[ds.test[0].id].array.shape).astype(np.float32)
    )
    for name, image in inputs.items():
        write_image(image, src / f"{name}.nii.gz")
    result = invoke("predict", run, src, "--out", tmp_path / "out", "--uncertainty", "--device", "cpu")
    assert result.exit_code == 0, result.output
    records = {}
    for name, image in inputs.items():
        umap = read_image(tmp_path / "out" / f"{name}_uncertainty.nii.gz")
        assert umap.spatial_shape == image.spatial_shape
        np.testing.assert_allclose(umap.affine, image.affine, atol=1e-5)
        rec = json.loads((tmp_path / "out" / f"{name}_uncertainty.json").read_text())
        assert {"score", "score_name", "method", "refer", "threshold"} <= set(rec)
        assert rec["threshold"] == pytest.approx(ref["threshold"]) and rec["method"] == "ensemble"
        assert rec["refer"] == (rec["score"] > ref["threshold"])
        records[name] = rec
    referred = {n for n, r in records.items() if r["refer"]}
    assert {"blank", *(f"{c.id}_noisy" for c in ds.test[:2])} <= referred
    kept = [r["score"] for n, r in records.items() if n not in referred]
    assert min(records[n]["score"] for n in referred) > max(kept, default=-1.0)


def test_classification_predict_refuses_without_a_threshold_then_flags_rows(
    tmp_path: Path, cls_run: Any
) -> None:
    ds, shared = cls_run
    run = copy_run(shared, tmp_path / "run")
    src = tmp_path / "in"
    src.mkdir()
    for case in ds.test:
        shutil.copy(ds.path(case.image[0]), src / f"{case.id}.nii.gz")
    out = tmp_path / "out"

    # No threshold in the run: the library leaves 'refer' undecided, the command refuses in one line.
    predictor = load_predictor(run, device="cpu")
    one = predictor.predict(read_case_image(ds, ds.test[0]), uncertainty=True)
    assert one.uncertainty is not None and 0.0 <= one.uncertainty <= 1.0 and one.refer is None
    assert one.uncertainty_info is not None and "no referral threshold" in one.uncertainty_info["note"]
    result = invoke("predict", run, src, "--out", out, "--uncertainty", "--device", "cpu")
    assert result.exit_code != 0 and isinstance(result.exception, RunError)
    assert "no referral threshold" in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()

    result = invoke(
        "predict", run, src, "--out", out, "--uncertainty", "--device", "cpu",
        "--referral-data", ds.root, "--referral-fraction", "0.2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ref = read_run(run)["referral"]
    assert ref["method"] == "ensemble" and ref["fraction"] == 0.2
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(ds.test) and {"uncertainty", "refer"} <= set(rows[0])
    flags = [r["refer"] == "true" for r in rows]
    scores = np.array([float(r["uncertainty"]) for r in rows])
    clear = np.abs(scores - ref["threshold"]) > 1e-6  # the CSV rounds scores; ties at the threshold stay kept
    assert [f for f, c in zip(flags, clear, strict=True) if c] == [
        bool(s > ref["threshold"]) for s in scores[clear]
    ]
    assert 0 < sum(flags) < len(rows)
    assert scores[flags].min() >= scores[np.logical_not(flags)].max()  # the most uncertain are referred
    doc = json.loads((out / "predictions.json").read_text())
    assert [p["refer"] for p in doc["predictions"]] == flags

    # A threshold set for one method does not apply to another.
    result = invoke("predict", run, src, "--out", out, "--uncertainty", "--uncertainty-method", "tta")
    assert isinstance(result.exception, RunError) and "'ensemble'" in str(result.exception)
