"""Classification end to end on generated MedMNIST-layout files: import, plan, train, predict, and decide.

Every task type (binary, multiclass, multilabel, ordinal; 2D and 3D) is trained a few dozen steps of a tiny
network on data built to be learnable, and must beat chance clearly on its held-out test split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medlens.data.dataset import load_dataset
from medlens.data.fingerprint import compute_fingerprint
from medlens.data.importers import import_dataset
from medlens.evaluate.classification import classification_metrics, medmnist_auc
from medlens.plan import Plan
from medlens.plan.planner import make_plan
from medlens.tasks.medmnist_synthetic import synthetic_medmnist
from medlens.tasks.run import train

OVERRIDES = {"threads": 1, "precision": "fp32", "memory_gb": 4, "batch_size": 16}
TINY = {"name": "test_classifier", "width": 8}
#: The planner's family (MONAI ResNet-18) at an eighth of its width: batch norm, unlike test_classifier's
#: instance norm, keeps the blob-size signal the ordinal data carries.
SMALL_RESNET = {
    "name": "resnet18",
    "widen_factor": 0.125,
    "conv1_kernel": 3,
    "conv1_stride": 1,
    "no_max_pool": True,
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_run(
    root: Path,
    ctype: str,
    *,
    ndim: int = 2,
    size: int = 16,
    iterations: int = 60,
    num_classes: int = 3,
    options: dict[str, Any] | None = None,
    n_train: int = 96,
    network: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate an npz, import it, plan a tiny network, train fold 0 and predict the test split."""
    from medlens.serve import load_predictor

    npz = synthetic_medmnist(
        root / f"{ctype}.npz", classification_type=ctype, num_classes=num_classes, ndim=ndim, size=size,
        n_train=n_train, n_val=32, n_test=48,
    )  # fmt: skip
    ds = import_dataset("medmnist", npz, root / "data", ordinal=ctype == "ordinal")
    fp = compute_fingerprint(ds)
    plan = make_plan(
        fp, task="classification", budget="2m", device="cpu", measure=False,
        overrides={**OVERRIDES, "network": network or TINY, "iterations": iterations},
    )  # fmt: skip
    data = plan.to_dict()
    cfg = data["configurations"][plan.default_configuration]
    cfg["training"].update(val_every=iterations // 3, checkpoint_every=iterations)
    Plan.from_dict(data).save(root / "plan.json")
    train(root / "data", root / "plan.json", root / "run", progress=False, device="cpu", options=options)
    info = json.loads((root / "run" / "run.json").read_text())
    predictor = load_predictor(root / "run", device="cpu")
    ds = load_dataset(root / "data")
    from medlens.tasks.classify import targets

    y_test = targets(ds, ds.test)
    from medlens.io import read_image

    probs = np.stack(
        [predictor.probabilities(_prepared(predictor, read_image(ds.path(c.image[0]))))[0] for c in ds.test]
    )
    return {
        "info": info,
        "plan": plan,
        "y_test": y_test,
        "probs": probs,
        "dataset": ds,
        "predictor": predictor,
    }


def _prepared(predictor: Any, image: Any) -> np.ndarray:
    from medlens.tasks.classify_data import prepare_image

    return prepare_image(image, predictor.config)[None]


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_run(tmp_path_factory.mktemp("binary"), "binary", options={"sensitivity": 0.9})


def test_binary_beats_chance_and_uses_target_sensitivity(binary_run: dict[str, Any]) -> None:
    r = binary_run
    auc = medmnist_auc(r["y_test"], r["probs"], "binary-class")
    assert auc > 0.9, auc
    decision = r["info"]["decision"]
    assert decision["rule"] == "sensitivity" and decision["target_sensitivity"] == 0.9
    assert decision["validation"]["sensitivity"] >= 0.9
    t = decision["threshold"]
    pred = (r["probs"][:, 1] >= t).astype(int)
    assert (pred == r["y_test"]).mean() > 0.8
    # the run's validation metrics are bootstrapped and use the chosen threshold
    vm = r["info"]["validation_metrics"]
    assert vm["decision"]["threshold"] == pytest.approx(t)
    assert vm["overall"]["recall"]["estimate"] >= 0.9
    assert vm["overall"]["auc"]["low"] <= vm["overall"]["auc"]["estimate"] <= vm["overall"]["auc"]["high"]


def test_binary_run_records_type_and_fold(binary_run: dict[str, Any]) -> None:
    info = binary_run["info"]
    assert info["classification"] == {"type": "binary", "class_names": ["class_0", "class_1"], "loss": "ce"}
    assert info["folds"] == [0]
    assert info["fold_results"]["0"]["iterations"] == 60
    # MedMNIST's own val split is the validation set of the single fold
    assert all(c.startswith("val_") for c in info["fold_results"]["0"]["val_cases"])


def test_decide_defaults_to_youden_on_the_same_evidence(binary_run: dict[str, Any]) -> None:
    from medlens.tasks.classify_train import decide

    youden = decide(binary_run["info"]["validation"], {})["decision"]
    assert youden["rule"] == "youden" and youden["target_sensitivity"] is None
    v = youden["validation"]
    assert v["sensitivity"] + v["specificity"] - 1 >= 0.8


def test_multiclass_beats_chance(tmp_path: Path) -> None:
    r = make_run(tmp_path, "multiclass", num_classes=3, iterations=80)
    m = classification_metrics(r["y_test"], r["probs"], classification_type="multiclass", n_resamples=200)
    assert m["overall"]["auc"]["estimate"] > 0.85
    assert m["overall"]["accuracy"]["estimate"] > 0.6  # chance: 1/3
    assert r["info"]["decision"]["rule"] == "argmax"


def test_multilabel_beats_chance_with_per_label_thresholds(tmp_path: Path) -> None:
    r = make_run(tmp_path, "multilabel", num_classes=3, iterations=80)
    assert r["info"]["classification"]["loss"] == "bce"
    auc = medmnist_auc(r["y_test"], r["probs"], "multi-label, binary-class")
    assert auc > 0.8, auc
    thresholds = r["info"]["decision"]["threshold"]
    assert len(thresholds) == 3 and all(0 < t < 1 for t in thresholds)


def test_ordinal_beats_chance_with_cumulative_head(tmp_path: Path) -> None:
    r = make_run(tmp_path, "ordinal", num_classes=4, iterations=60, network=SMALL_RESNET, n_train=64)
    assert r["info"]["classification"]["loss"] == "coral"
    assert r["plan"].configuration()["loss"]["name"] == "coral"
    probs = r["probs"]
    assert probs.shape == (48, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    m = classification_metrics(r["y_test"], probs, classification_type="ordinal", n_resamples=200)
    assert m["overall"]["auc"]["estimate"] > 0.8
    assert m["overall"]["quadratic_kappa"]["estimate"] > 0.5  # chance: 0
    assert m["overall"]["mae"]["estimate"] < 1.0  # chance (uniform guesses over 4 grades): 1.25


def test_3d_volumes_from_medmnist_npz_beat_chance(tmp_path: Path) -> None:
    r = make_run(tmp_path, "binary", ndim=3, size=12, iterations=40, n_train=64)
    assert r["plan"].configuration()["spatial_dims"] == 3
    assert r["plan"].configuration()["preprocessing"]["orientation"] == "RAS"
    assert medmnist_auc(r["y_test"], r["probs"], "binary-class") > 0.85


def test_fit_can_start_from_other_weights_with_a_new_head(binary_run: dict[str, Any], tmp_path: Path) -> None:
    """The hook ``--init`` plugs into: matching tensors load, the 2-class head is re-initialised for 3 classes."""
    from safetensors.torch import load_file

    from medlens.plan.plan import thaw
    from medlens.tasks.classify_train import fit

    config = thaw(binary_run["plan"].configuration())
    config["training"].update(iterations=2, val_every=2, param_groups={"trainable": "head"})
    config["training"]["schedule"]["warmup_iterations"] = 0
    weights = binary_run["info"]["fold_results"]["0"]
    path = Path(binary_run["predictor"].run_dir) / "fold_0" / "model.safetensors"
    assert weights["iterations"] == 60 and path.is_file()
    rng = np.random.default_rng(0)
    images = rng.random((24, 1, 16, 16)).astype(np.float32)
    res = fit(
        images, np.arange(24) % 3, np.arange(16), np.arange(16, 24), config, ctype="multiclass",
        class_names=["a", "b", "c"], run_dir=tmp_path / "fold_0", progress=False, device="cpu", init=path,
    )  # fmt: skip
    before = load_file(str(path))
    state = res.model.state_dict()
    torch.testing.assert_close(
        state["conv1.weight"], before["conv1.weight"]
    )  # frozen backbone, from the file
    assert state["fc.weight"].shape == (3, 16) and before["fc.weight"].shape == (2, 16)
    assert res.val_scores.shape == (8, 3)
