"""Segmentation end to end: plan -> train -> predict back in the input's geometry, post-processing, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_blob_dataset, quick_plan
from medlens.data.dataset import Dataset, read_case_image
from medlens.errors import InputError, RunError
from medlens.evaluate.segmentation import segmentation_metrics
from medlens.io import Image, read_image
from medlens.serve.predictor import Predictor
from medlens.tasks.run import read_run, train
from medlens.tasks.segment import SegmentationTask, decide_postprocessing, keep_largest_component

CLASSES = {"blob": 1, "cube": 2}


def test_3d_model_beats_chance_and_predicts_in_the_oblique_input_geometry(
    trained3d: tuple[Dataset, Path],
) -> None:
    ds, run = trained3d
    predictor = Predictor.from_run(run)
    for case in ds.test:
        image = read_case_image(ds, case)
        assert abs(np.linalg.det(image.direction) - 1) < 1e-6 and not np.allclose(image.direction, np.eye(3))
        result = predictor.predict(image)
        assert result.label.same_geometry(image, atol=1e-6)
        truth = read_image(ds.path(str(case.label))).array[0]
        metrics = segmentation_metrics(result.label.array[0], truth, image.spacing, CLASSES)
        # Chance (a random label per voxel) gives a blob Dice near its volume fraction (~0.1); the cube is
        # brighter still.
        assert metrics["blob"]["dice"] > 0.6, metrics
        assert metrics["cube"]["dice"] > 0.3, metrics


def test_run_records_folds_split_and_postprocessing(trained3d: tuple[Dataset, Path]) -> None:
    _, run = trained3d
    info = read_run(run)
    assert info["folds"] == [0] and info["task"] == "segmentation"
    val = set(info["fold_results"]["0"]["val_cases"])
    assert val and val.isdisjoint(info["splits"]["folds"][0]["train"])
    assert set(info["postprocessing"]) == {"blob", "cube"}
    assert len(info["postprocessing_reasons"]) == 2
    assert (run / "fold_0" / "model.safetensors").is_file() and (run / "plan.json").is_file()


def test_predict_path_writes_label_maps_with_probabilities(
    trained3d: tuple[Dataset, Path], tmp_path: Path
) -> None:
    ds, run = trained3d
    src = ds.path(ds.test[0].image[0])
    written = Predictor.from_run(run).predict_path(src, tmp_path / "out", probabilities=True)
    assert [p.name for p in written] == [src.name]
    label, image = read_image(written[0]), read_image(src)
    assert label.same_geometry(image, atol=1e-4)
    probs = read_image(tmp_path / "out" / src.name.replace(".nii.gz", "_probabilities.nii.gz"))
    assert probs.num_channels == 3
    np.testing.assert_allclose(probs.array.sum(0), 1.0, atol=1e-3)


def test_predict_refuses_an_image_with_the_wrong_channels(trained3d: tuple[Dataset, Path]) -> None:
    ds, run = trained3d
    image = read_case_image(ds, ds.test[0])
    two = image.with_array(np.concatenate([image.array, image.array]), source="two.nii.gz")
    with pytest.raises(InputError, match=r"two.nii.gz: has 2 channel\(s\); this model was trained on 1"):
        Predictor.from_run(run).predict(two)
    ct = Image(image.array, image.affine, modality="CT", meta={"source": "ct.dcm"})
    with pytest.raises(InputError, match=r"ct\.dcm: modality CT; this model was trained on MR"):
        Predictor.from_run(run).predict(ct)


def test_training_a_trained_fold_again_needs_resume(trained3d: tuple[Dataset, Path]) -> None:
    ds, run = trained3d
    with pytest.raises(RunError, match="already trained here; use --resume"):
        train(ds.root, run / "plan.json", run, fold=0, progress=False)


def test_2d_model_beats_chance(tmp_path: Path) -> None:
    ds = make_blob_dataset(tmp_path / "ds", n_train=10, n_test=2, shape=(40, 40), spacing=(0.8, 0.8))
    plan = quick_plan(ds, tmp_path / "plan.json", iterations=40)
    train(ds.root, plan, tmp_path / "run", fold=0, progress=False)
    predictor = Predictor.from_run(tmp_path / "run")
    dice = []
    for case in ds.test:
        image = read_case_image(ds, case)
        pred = predictor.predict(image).label
        assert pred.ndim == 2 and pred.same_geometry(image)
        truth = read_image(ds.path(str(case.label))).array[0]
        dice.append(segmentation_metrics(pred.array[0], truth, image.spacing, CLASSES)["blob"]["dice"])
    assert np.mean(dice) > 0.6, dice


def test_interrupted_training_resumes_to_completion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_blob_dataset(tmp_path / "ds", n_train=6, n_test=0, shape=(16, 16, 12))
    plan = quick_plan(ds, tmp_path / "plan.json", iterations=20, val_every=10)
    calls = {"n": 0}
    original = SegmentationTask.validate

    def dies_on_second_validation(self: SegmentationTask, model: torch.nn.Module) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C (or the machine went down) at step 20
        return original(self, model)

    monkeypatch.setattr(SegmentationTask, "validate", dies_on_second_validation)
    with pytest.raises(KeyboardInterrupt):
        train(ds.root, plan, tmp_path / "run", fold=0, progress=False)
    state = json.loads((tmp_path / "run" / "fold_0" / "trainer_state.json").read_text())
    assert state["iteration"] == 10  # the checkpoint after the first validation survived
    assert not (tmp_path / "run" / "run.json").exists()
    done = train(ds.root, plan, tmp_path / "run", fold=0, resume=True, progress=False)
    assert done[0].iterations == 20
    assert read_run(tmp_path / "run")["folds"] == [0]


def test_keep_largest_component_only_for_the_chosen_classes() -> None:
    labels = np.zeros((10, 10), np.uint8)
    labels[1:4, 1:4] = 1  # large component of class 1
    labels[8, 8] = 1  # a speck of class 1
    labels[6, 1] = labels[6, 5] = 2  # two specks of class 2
    out = keep_largest_component(labels, [1])
    assert out[8, 8] == 0 and out[1:4, 1:4].all()
    assert out[6, 1] == 2 and out[6, 5] == 2


def test_postprocessing_is_kept_only_where_it_raises_dice() -> None:
    effects = {
        "a": {"liver": [0.80, 0.85], "vessels": [0.60, 0.40]},
        "b": {"liver": [0.70, 0.72], "vessels": [0.50, 0.50]},
    }
    decisions, reasons = decide_postprocessing(effects)
    assert decisions == {"liver": True, "vessels": False}
    assert "0.7500 -> 0.7850" in reasons[0]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_run(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 medlens train``: gloo DDP, rank 0 alone writes the run."""
    import socket
    import subprocess
    import sys

    ds = make_blob_dataset(tmp_path / "ds", n_train=6, n_test=0, shape=(16, 16, 12))
    plan = quick_plan(ds, tmp_path / "plan.json", iterations=20, val_every=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += [
        "-m",
        "medlens.cli",
        "-q",
        "train",
        str(ds.root),
        "--plan",
        str(plan),
        "--out",
        str(tmp_path / "run"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "fold_0" / "config.json").read_text())
    assert config["world_size"] == 2
    assert read_run(tmp_path / "run")["folds"] == [0]


def test_mirroring_tta_keeps_geometry_and_quality(trained3d: tuple[Dataset, Path]) -> None:
    ds, run = trained3d
    predictor = Predictor.from_run(run, backend="torch")
    case = ds.test[0]
    image = read_case_image(ds, case)
    truth = read_image(ds.path(str(case.label))).array[0]
    plain = predictor.predict(image).label
    tta = predictor.predict(image, tta=True).label
    assert tta.same_geometry(image, atol=1e-6)
    d_plain = segmentation_metrics(plain.array[0], truth, image.spacing, CLASSES)["blob"]["dice"]
    d_tta = segmentation_metrics(tta.array[0], truth, image.spacing, CLASSES)["blob"]["dice"]
    assert d_tta > d_plain - 0.05  # averaging 8 mirrored passes does not lose what one pass finds
    assert not np.array_equal(plain.array, tta.array)  # and it really is a different computation


def test_two_folds_are_trained_and_ensembled(tmp_path: Path) -> None:
    ds = make_blob_dataset(tmp_path / "ds", n_train=8, n_test=1, shape=(16, 16, 12))
    plan = quick_plan(ds, tmp_path / "plan.json", iterations=10, val_every=10)
    trained = train(ds.root, plan, tmp_path / "run", fold="0,1", progress=False)
    assert [t.fold for t in trained] == [0, 1]
    info = read_run(tmp_path / "run")
    assert info["folds"] == [0, 1]
    assert set(info["fold_results"]["0"]["val_cases"]).isdisjoint(info["fold_results"]["1"]["val_cases"])
    predictor = Predictor.from_run(tmp_path / "run")
    assert len(predictor.models) == 2
    image = read_case_image(ds, ds.test[0])
    assert predictor.predict(image).meta["folds"] == 2
    with pytest.raises(InputError, match="folds run from 0 to 4"):
        train(ds.root, plan, tmp_path / "other", fold="7", progress=False)
