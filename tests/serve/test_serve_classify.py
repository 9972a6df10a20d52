"""The classification predictor: the run's decision rule applied, CSV and JSON written in natural form.

The runs are built by hand (a tiny network whose output layer is set so every image gets known
probabilities), so the tests check the decision and the output format exactly, without training.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medlens.errors import InputError, RunError
from medlens.io import Image, write_image


def make_run(root: Path, ctype: str, names: list[str], logits: list[float], decision: dict[str, Any]) -> Path:
    """A classification run whose network outputs ``logits`` for any image."""
    from medlens.engine import save_weights
    from medlens.models import create_model
    from medlens.plan.planner import make_plan
    from medlens.tasks.classify import num_outputs
    from medlens.tasks.run import write_run

    k = len(names)
    fp = {
        "medlens_fingerprint": 1, "dataset": "hand", "task": "classification", "classification_type": ctype,
        "ndim": 2, "num_cases": 100, "num_channels": 1, "modalities": {"0": "OT"},
        "shape": {"median": [16, 16], "min": [16, 16], "max": [16, 16]},
        "intensity": {"0": {"mean": 1.0, "std": 1.0, "median": 1.0, "p00_5": 0.0, "p99_5": 2.0, "min": 0.0, "max": 9.0}},
        "classes": {"names": {str(i): n for i, n in enumerate(names)}, "counts": {str(i): 10 for i in range(k)}},
    }  # fmt: skip
    plan = make_plan(
        fp, task="classification", budget="1m", device="cpu", measure=False,
        overrides={"network": {"name": "test_classifier", "width": 4}, "threads": 1, "precision": "fp32", "memory_gb": 2},
    )  # fmt: skip
    run = root / "run"
    plan.save(run / "plan.json")
    loss = plan.configuration()["loss"]["name"]
    model = create_model(
        {"name": "test_classifier", "width": 4}, spatial_dims=2, in_channels=1,
        out_channels=num_outputs(ctype, k, loss),
    )  # fmt: skip
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor(logits))
    save_weights(model, run / "fold_0" / "model.safetensors")
    write_run(run, {
        "medlens_run": 1, "task": "classification", "configuration": plan.default_configuration,
        "dataset": {"name": "hand", "labels": {n: i for i, n in enumerate(names)}, "channels": {"0": "gray"},
                    "modalities": {"0": "OT"}, "ndim": 2},
        "folds": [0], "classification": {"type": ctype, "class_names": names, "loss": loss}, "decision": decision,
    })  # fmt: skip
    return run


def images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        write_image(Image.from_spacing(rng.random((1, 16, 16)).astype(np.float32)), folder / f"img{i}.nii.gz")
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_binary_prediction_uses_the_runs_threshold(tmp_path: Path) -> None:
    from medlens.serve import load_predictor

    src = images(tmp_path / "in")
    # softmax of (0, logit(0.6)) gives P(lesion) = 0.6 for every image
    for t, expected in ((0.55, "lesion"), (0.65, "no lesion")):
        run = make_run(tmp_path / str(t), "binary", ["no lesion", "lesion"], [0.0, logit(0.6)],
                       {"rule": "youden", "threshold": t})  # fmt: skip
        paths = load_predictor(run, device="cpu").predict_path(src, tmp_path / f"out{t}")
        assert [p.name for p in paths] == ["predictions.csv", "predictions.json"]
        rows = read_csv(paths[0])
        assert list(rows[0]) == ["case", "source", "prediction", "p_no lesion", "p_lesion", "threshold"]
        assert [r["case"] for r in rows] == ["img0", "img1", "img2"]
        assert all(r["prediction"] == expected and float(r["threshold"]) == t for r in rows)
        assert float(rows[0]["p_lesion"]) == pytest.approx(0.6, abs=1e-5)
        doc = json.loads(paths[1].read_text())
        assert doc["classification_type"] == "binary" and doc["decision"]["threshold"] == t
        assert doc["predictions"][0]["prediction"] == expected
        assert doc["predictions"][0]["probabilities"]["lesion"] == pytest.approx(0.6, abs=1e-5)


def test_multilabel_prediction_lists_the_positive_labels(tmp_path: Path) -> None:
    from medlens.serve.classify import ClassificationPredictor

    names = ["effusion", "mass", "nodule"]
    run = make_run(tmp_path, "multilabel", names, [logit(0.8), logit(0.3), logit(0.6)],
                   {"rule": "youden", "threshold": [0.5, 0.2, 0.7]})  # fmt: skip
    pred = ClassificationPredictor.from_run(run, device="cpu")
    csv_path, json_path = pred.predict_path(images(tmp_path / "in", 1) / "img0.nii.gz", tmp_path / "out")
    row = read_csv(csv_path)[0]
    assert row["labels"] == "effusion;mass"  # 0.8 >= 0.5, 0.3 >= 0.2, 0.6 < 0.7
    assert float(row["threshold_nodule"]) == 0.7
    p = json.loads(json_path.read_text())["predictions"][0]
    assert p["labels"] == ["effusion", "mass"]
    assert p["threshold"] == {"effusion": 0.5, "mass": 0.2, "nodule": 0.7}


def test_ordinal_prediction_gives_the_grade(tmp_path: Path) -> None:
    from medlens.serve.classify import ClassificationPredictor

    names = ["none", "mild", "moderate", "severe"]
    # P(grade > k) = .9, .6, .2 -> P(grade) = .1, .3, .4, .2; median: cumulative .1 .4 .8 -> moderate
    run = make_run(tmp_path, "ordinal", names, [logit(0.9), logit(0.6), logit(0.2)], {"rule": "median grade"})
    pred = ClassificationPredictor.from_run(run, device="cpu")
    result = pred.predict(Image.from_spacing(np.ones((1, 16, 16), np.float32)))
    assert result.grade == "moderate" and result.grade_index == 2
    assert result.expected_grade == pytest.approx(0.3 + 0.8 + 0.6, abs=1e-4)
    assert [round(result.probabilities[n], 4) for n in names] == [0.1, 0.3, 0.4, 0.2]
    csv_path, _ = pred.predict_path(images(tmp_path / "in", 2), tmp_path / "out")
    assert list(read_csv(csv_path)[0])[:5] == ["case", "source", "grade", "grade_index", "expected_grade"]


def test_predict_command_dispatches_classification_runs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medlens.cli import app

    run = make_run(tmp_path, "multiclass", ["a", "b", "c"], [0.0, 2.0, 0.0], {"rule": "argmax"})
    result = CliRunner().invoke(
        app, ["predict", str(run), str(images(tmp_path / "in", 2)), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "o" / "predictions.csv")
    assert [r["prediction"] for r in rows] == ["b", "b"]


def test_bad_runs_and_images_are_refused(tmp_path: Path) -> None:
    from medlens.serve.classify import ClassificationPredictor

    run = make_run(tmp_path, "binary", ["n", "p"], [0.0, 0.0], {"rule": "youden", "threshold": 0.5})
    pred = ClassificationPredictor.from_run(run, device="cpu")
    with pytest.raises(InputError, match="has 3 channel"):
        pred.predict(Image.from_spacing(np.zeros((3, 16, 16), np.float32), meta={"source": "rgb.png"}))
    with pytest.raises(InputError, match="no such file"):
        pred.predict_path(tmp_path / "missing.png", tmp_path / "out")
    info = json.loads((run / "run.json").read_text())
    del info["classification"]
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="no 'classification' section"):
        ClassificationPredictor.from_run(run, device="cpu")
