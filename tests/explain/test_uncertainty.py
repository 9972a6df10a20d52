"""Uncertainty: higher where the model should be unsure, seeded MC-dropout, the fold ensemble, the geometry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medlens.data.dataset import read_case_image
from medlens.errors import InputError
from medlens.explain.uncertainty import (
    classification_uncertainty,
    has_dropout,
    mc_dropout_mode,
    resolve_method,
    segmentation_uncertainty,
)
from medlens.io import read_image
from medlens.io.image import Image
from medlens.serve import load_predictor


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a shared run (without its cache) that a test may change."""
    return Path(shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("cache", "tb", "*optimizer*")))


@pytest.fixture(scope="module")
def seg_dropout_run(tmp_path_factory: pytest.TempPathFactory, seg_run: Any) -> Path:
    """One fold of the blob segmentation trained with dropout 0.2 in the U-Net (MC-dropout's own run)."""
    import builders
    from medlens.tasks.run import train

    ds, _ = seg_run
    root = tmp_path_factory.mktemp("seg_dropout")
    plan = builders.seg_plan(ds, root / "plan.json", iterations=8, dropout=0.2)
    train(ds.root, plan, root / "run", fold="0", n_folds=3, progress=False, device="cpu")
    return root / "run"


def test_segmentation_uncertainty_is_higher_on_noisy_and_blank_images(seg_run: Any) -> None:
    ds, run = seg_run
    predictor = load_predictor(run, device="cpu", backend="torch")
    rng = np.random.default_rng(1)
    for case in ds.test[:2]:
        image = read_case_image(ds, case)
        noisy = image.with_array(image.array + rng.normal(0, 1.5, image.array.shape).astype(np.float32))
        blank = image.with_array(100.0 + rng.normal(0, 0.3, image.array.shape).astype(np.float32))
        for method in ("ensemble", "tta"):
            clean_score = segmentation_uncertainty(predictor, image, method)[2]
            assert segmentation_uncertainty(predictor, noisy, method)[2] > clean_score + 0.05
            _, blank_map, blank_score = segmentation_uncertainty(predictor, blank, method)
            assert blank_score > clean_score + 0.05
            assert blank_map.meta["score_region"] in ("foreground", "whole_image")


def test_classification_errors_are_more_uncertain_and_entropy_is_exact(cls_run: Any) -> None:
    from scipy.stats import entropy
    from sklearn.metrics import roc_auc_score

    from medlens.tasks.classify_data import prepare_image

    ds, run = cls_run
    predictor = load_predictor(run, device="cpu")
    x = np.stack([prepare_image(read_case_image(ds, c), predictor.config) for c in ds.test])
    y = np.array([int(c.label) for c in ds.test])
    res = classification_uncertainty(predictor, x, "ensemble")
    assert res["samples"] == 2 and res["score_name"] == "predictive_entropy"
    np.testing.assert_allclose(res["probs"].sum(1), 1.0, atol=1e-5)
    # Binary: normalised entropy = entropy in bits of the mean probabilities, computed independently.
    np.testing.assert_allclose(res["score"], entropy(res["probs"].T, base=2), atol=1e-5)
    wrong = res["probs"].argmax(1) != y
    assert 0 < wrong.sum() < len(y), "the tiny run should make some mistakes"
    assert res["score"][wrong].mean() > res["score"][~wrong].mean()
    assert roc_auc_score(wrong, res["score"]) > 0.75
    assert np.all(res["mutual_information"] >= 0) and np.all(res["mutual_information"] <= res["score"])
    # The ensemble mean is the mean of the folds' own probabilities.
    folds = [predictor.models[:1], predictor.models[1:]]
    singles = []
    for models in folds:
        one = load_predictor(run, device="cpu")
        one.models = models
        singles.append(one.probabilities(x))
    np.testing.assert_allclose(res["probs"], np.mean(singles, axis=0), atol=1e-5)


def test_segmentation_ensemble_is_the_mean_of_the_two_folds(seg_run: Any) -> None:
    from medlens.serve.predictor import Predictor

    ds, run = seg_run
    image = read_case_image(ds, ds.test[0])
    both = Predictor.from_run(run, device="cpu", backend="torch")
    assert resolve_method(both, "auto") == "ensemble"
    probs, umap, _ = segmentation_uncertainty(both, image, "ensemble")
    assert umap.meta["samples"] == 2 and umap.meta["mutual_information"] > 0
    singles = [
        Predictor.from_run(run, folds=[f], device="cpu", backend="torch").predict(image, probabilities=True)
        for f in (0, 1)
    ]
    mean = np.mean([s.probabilities.array for s in singles if s.probabilities is not None], axis=0)
    np.testing.assert_allclose(probs.array, mean, atol=1e-4)
    # One fold and no dropout: auto falls back to TTA; an "ensemble" of one is refused.
    one = Predictor.from_run(run, folds=[0], device="cpu", backend="torch")
    assert resolve_method(one, "auto") == "tta"
    with pytest.raises(InputError, match="at least 2 trained folds"):
        resolve_method(one, "ensemble")
    with pytest.raises(InputError, match="needs a PyTorch network with dropout"):
        resolve_method(one, "mc_dropout")
    with pytest.raises(InputError, match="Did you mean 'mc_dropout'"):
        resolve_method(one, "mc-dropout")


def test_mc_dropout_samples_differ_but_are_deterministic_per_seed(
    seg_dropout_run: Path, seg_run: Any
) -> None:
    ds, _ = seg_run
    predictor = load_predictor(seg_dropout_run, device="cpu", backend="torch")
    model = predictor.models[0]
    assert has_dropout(model) and resolve_method(predictor, "auto") == "mc_dropout"
    image = read_case_image(ds, ds.test[0])
    before = predictor.predict(image).label.array
    a = segmentation_uncertainty(predictor, image, "auto", samples=4, seed=0)
    b = segmentation_uncertainty(predictor, image, "auto", samples=4, seed=0)
    c = segmentation_uncertainty(predictor, image, "auto", samples=4, seed=1)
    assert a[1].meta["method"] == "mc_dropout" and a[1].meta["samples"] == 4
    np.testing.assert_array_equal(a[1].array, b[1].array)
    assert not np.array_equal(a[1].array, c[1].array)
    assert a[1].meta["mutual_information"] > 0  # the samples disagree
    # Afterwards every module is back in eval mode and the deterministic prediction is unchanged.
    assert not any(m.training for m in model.modules())
    np.testing.assert_array_equal(predictor.predict(image).label.array, before)
    # Inside the mode only dropout layers train: norms keep their eval behaviour.
    with mc_dropout_mode(model):
        training = {type(m).__name__ for m in model.modules() if m.training}
    assert training == {"Dropout"}


def test_mc_dropout_classification_is_seeded(tmp_path: Path, cls_run: Any) -> None:
    from medlens.serve.classify import ClassificationPredictor
    from medlens.tasks.classify_data import prepare_image

    ds, run = cls_run
    # The classifier's weights in a network built with dropout 0.5 before its head (dropout has no weights).
    run = copy_run(run, tmp_path / "run")
    plan = json.loads((run / "plan.json").read_text())
    for cfg in plan["configurations"].values():
        cfg["network"]["dropout"] = 0.5
    (run / "plan.json").write_text(json.dumps(plan))
    predictor = ClassificationPredictor.from_run(run, folds=[0], device="cpu")  # one fold: auto = MC-dropout
    x = np.stack([prepare_image(read_case_image(ds, c), predictor.config) for c in ds.test[:8]])
    a = classification_uncertainty(predictor, x, "auto", samples=6, seed=3)
    b = classification_uncertainty(predictor, x, "mc_dropout", samples=6, seed=3)
    c = classification_uncertainty(predictor, x, "mc_dropout", samples=6, seed=4)
    assert a["method"] == "mc_dropout" and a["samples"] == 6
    np.testing.assert_array_equal(a["score"], b["score"])
    assert not np.array_equal(a["score"], c["score"])
    assert np.all(a["mutual_information"] > 0)


def test_uncertainty_map_has_the_input_geometry_on_an_oblique_image(seg_run: Any) -> None:
    ds, run = seg_run
    predictor = load_predictor(run, device="cpu", backend="torch")
    image = read_case_image(ds, ds.test[1])
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = image.affine.copy()
    affine[:3, :3] = rot @ np.diag([1.5, 1.5, 2.0]) @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])
    affine[:3, 3] = [-12.0, 30.0, 7.5]
    oblique = Image(image.array.copy(), affine, modality="MR", meta={"source": "oblique.nii.gz"})
    probs, umap, score = segmentation_uncertainty(predictor, oblique, "tta", samples=8)
    for out in (probs, umap):
        assert out.spatial_shape == oblique.spatial_shape
        np.testing.assert_allclose(out.affine, oblique.affine)
    assert umap.num_channels == 1 and umap.array.min() >= 0.0 and umap.array.max() <= 1.0 + 1e-6
    # Voxel for voxel, the maps are the input's: the predicted foreground lies on the reference blob.
    truth = read_image(ds.path(str(ds.test[1].label))).array[0] > 0
    fg = probs.array.argmax(0) > 0
    assert fg.any() and truth[fg].mean() > 0.5
    assert 0.0 < score <= 1.0


def test_a_plan_override_puts_dropout_into_the_segmentation_network(seg_run: Any) -> None:
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.models import create_model
    from medlens.plan.planner import make_plan

    ds, _ = seg_run
    plan = make_plan(
        compute_fingerprint(ds), task="segmentation", budget="2m", measure=False,
        overrides={"configurations": ["3d_fullres"], "network": {"dropout": 0.25}},
    )  # fmt: skip
    spec = plan.configuration("3d_fullres")["network"]
    assert spec["dropout"] == 0.25
    model = create_model(dict(spec), spatial_dims=3, in_channels=1, out_channels=2)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.25}


def test_a_run_without_dropout_in_its_plan_still_loads(tmp_path: Path, seg_run: Any) -> None:
    ds, run = seg_run
    old = copy_run(run, tmp_path / "old")
    plan = json.loads((old / "plan.json").read_text())
    for cfg in plan["configurations"].values():
        cfg["network"].pop("dropout", None)  # as written before dropout was a network key
    (old / "plan.json").write_text(json.dumps(plan))
    image = read_case_image(ds, ds.test[0])
    ref = load_predictor(run, device="cpu", backend="torch").predict(image, probabilities=True)
    got = load_predictor(old, device="cpu", backend="torch").predict(image, probabilities=True)
    assert ref.probabilities is not None and got.probabilities is not None
    np.testing.assert_allclose(got.probabilities.array, ref.probabilities.array, atol=1e-6)
    # The same weights also load into a network built with dropout (no parameters): eval output is equal.
    for cfg in plan["configurations"].values():
        cfg["network"]["dropout"] = 0.3
    (old / "plan.json").write_text(json.dumps(plan))
    with_dropout = load_predictor(old, device="cpu", backend="torch")
    assert has_dropout(with_dropout.models[0])
    got = with_dropout.predict(image, probabilities=True)
    assert got.probabilities is not None
    np.testing.assert_allclose(got.probabilities.array, ref.probabilities.array, atol=1e-6)
