"""Regularisation for small datasets: label smoothing, mixup, and which weights training keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medlens.data.augment import parse_augmentation
from medlens.errors import InputError, PlanError
from medlens.tasks.classify import ClassificationLoss, ClassificationTask

CONFIG: dict[str, Any] = {
    "spatial_dims": 2,
    "patch_size": [8, 8],
    "batch_size": 8,
    "loss": {"name": "ce"},
    "sampling": {"balanced": False},
    "augmentation": {},
    "validation": {"max_cases": 8},
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_task(n: int = 24, **changes: Any) -> ClassificationTask:
    images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 8, 8), np.float32)
    cfg = {**CONFIG, **changes}
    return ClassificationTask(
        images, np.arange(n) % 2, np.arange(n - 8), np.arange(n - 8, n), cfg, "binary", 2
    )


def test_label_smoothing_matches_torch_and_softens_bce_and_coral_targets() -> None:
    logits = torch.tensor([[3.0, -1.0], [0.5, 0.2], [-2.0, 2.0]])
    y = torch.tensor([0, 1, 1])
    smooth = ClassificationLoss({"name": "ce", "label_smoothing": 0.1}, "binary", 2)(logits, y)
    torch.testing.assert_close(smooth, torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1))
    # BCE: targets 0/1 become 0.05/0.95, so a confident correct logit no longer has zero loss
    confident = torch.tensor([[30.0, -30.0]])
    label = torch.tensor([[1.0, 0.0]])
    plain = ClassificationLoss({"name": "bce"}, "multilabel", 2)(confident, label)
    soft = ClassificationLoss({"name": "bce", "label_smoothing": 0.1}, "multilabel", 2)(confident, label)
    assert float(plain) < 1e-6 < float(soft)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(confident, torch.tensor([[0.95, 0.05]]))
    torch.testing.assert_close(soft, expected)
    coral = ClassificationLoss({"name": "coral", "label_smoothing": 0.2}, "ordinal", 3)
    levels = torch.tensor([[0.9, 0.1]])  # grade 1 of 3: P(>0) = 1, P(>1) = 0, smoothed by 0.2
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([[1.0, -1.0]]), levels)
    torch.testing.assert_close(coral(torch.tensor([[1.0, -1.0]]), torch.tensor([1])), expected)
    with pytest.raises(PlanError, match="label_smoothing"):
        ClassificationLoss({"name": "ce", "label_smoothing": 1.5}, "binary", 2)


def test_mixup_mixes_pairs_reproducibly_and_mixes_the_loss_alike() -> None:
    task = make_task(augmentation={"mixup": {"p": 1.0, "alpha": 0.4}})
    plain = make_task()
    a, b, ref = task.batch(3, 7), task.batch(3, 7), plain.batch(3, 7)
    torch.testing.assert_close(a["image"], b["image"])  # a pure function of (seed, index)
    lam = float(a["mix"])
    assert 0.5 <= lam <= 1.0
    # every mixed image is lam * its own + (1 - lam) * another image of the batch, with that image's target
    own, other = ref["image"][:, 0, 0, 0], a["image"][:, 0, 0, 0]
    partner = (other - lam * own) / (1 - lam)
    assert all(any(abs(float(p) - float(o)) < 1e-3 for o in own) for p in partner)
    value_to_target = {float(v): int(t) for v, t in zip(own, ref["target"], strict=True)}
    assert [value_to_target[round(float(p))] for p in partner] == a["target_mixed"].tolist()
    # the loss is the same mixture of the two targets' losses
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    logits = model(a["image"])
    want = lam * torch.nn.functional.cross_entropy(logits, a["target"]) + (
        1 - lam
    ) * torch.nn.functional.cross_entropy(logits, a["target_mixed"])
    torch.testing.assert_close(task.loss(model, a), want)
    assert "mix" not in plain.batch(3, 7)
    half = make_task(augmentation={"mixup": {"p": 0.5}})
    mixed = sum("mix" in half.batch(0, i) for i in range(200))
    assert 70 < mixed < 130


def test_mixup_settings_are_validated_with_the_augmentation() -> None:
    params = parse_augmentation({"mixup": {"p": 0.5, "alpha": 0.4}}, 2)
    assert (params.mixup_p, params.mixup_alpha) == (0.5, 0.4)
    assert not params.active  # BatchAugment has nothing to do: the task mixes
    with pytest.raises(InputError, match=r"augmentation\.mixup\.alpha"):
        parse_augmentation({"mixup": {"alpha": 0}}, 2)
    with pytest.raises(InputError, match="Did you mean 'alpha'"):
        parse_augmentation({"mixup": {"alpah": 0.2}}, 2)


def test_selection_scores_best_smoothed_and_last() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    best, smooth, last = (make_task(validation={"selection": s}) for s in ("best", "smoothed", "last"))
    assert (best.score_key, smooth.score_key, last.score_key) == ("auc", "auc_smoothed", "trained_batches")
    for i in range(5):
        last.batch(0, i)
    aucs = []
    for _ in range(4):
        m = smooth.validate(model)
        aucs.append(m["auc"])
    assert m["auc_smoothed"] == pytest.approx(np.mean(aucs[-3:]))
    assert last.validate(model)["trained_batches"] == 5.0  # rises with training, so the newest weights win
    with pytest.raises(PlanError, match=r"validation\.selection 'newest'"):
        make_task(validation={"selection": "newest"})


def test_fit_with_selection_last_keeps_the_final_weights(tmp_path: Path) -> None:
    from medlens.tasks.classify_train import fit

    rng = np.random.default_rng(0)
    y = np.arange(48) % 2
    images = (rng.normal(size=(48, 1, 8, 8)) + y[:, None, None, None] * 1.5).astype(np.float32)
    config = {
        **CONFIG,
        "network": {"name": "test_classifier", "width": 4},
        "validation": {"max_cases": 16, "selection": "last"},
        "training": {"iterations": 12, "val_every": 3, "checkpoint_every": 12, "precision": "fp32",
                     "threads": 1, "schedule": {"name": "cosine"}},
    }  # fmt: skip
    res = fit(
        images, y, np.arange(32), np.arange(32, 48), config, ctype="binary", class_names=["a", "b"],
        run_dir=tmp_path / "fold_0", progress=False, device="cpu",
    )  # fmt: skip
    val = res.history["val"]
    assert [h["iteration"] for h in val] == [3, 6, 9, 12]
    # the kept weights are the last ones, and best_score is their validation AUC (not the selection score)
    assert res.trained.best_score == pytest.approx(val[-1]["auc"])
    from medlens.evaluate.classification import point_metrics
    from medlens.tasks.classify import predict_scores

    scores = predict_scores(res.model, images, np.arange(32, 48), "binary", "ce", 16)
    assert point_metrics(y[32:], scores, classification_type="binary")["medmnist_auc"] == pytest.approx(
        val[-1]["auc"], abs=1e-6
    )
