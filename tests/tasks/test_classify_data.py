"""Classification data: preprocessing, the batch stream, the loss per type, and bad input named clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medlens.data.dataset import Case, Dataset, load_dataset
from medlens.errors import DatasetError, ImageReadError, InputError, PlanError
from medlens.io import Image, write_image
from medlens.tasks.classify import (
    ClassificationLoss,
    ClassificationTask,
    class_probabilities,
    targets,
)
from medlens.tasks.classify_data import dataset_images, prepare_arrays, prepare_image

CONFIG: dict[str, Any] = {
    "spatial_dims": 2,
    "patch_size": [8, 8],
    "batch_size": 8,
    "preprocessing": {
        "orientation": "none",
        "normalization": {"0": {"scheme": "rescale", "range": [0, 255]}},
        "cache_dtype": "float16",
    },
    "loss": {"name": "ce"},
    "sampling": {"balanced": False},
    "augmentation": {},
    "validation": {"max_cases": 4},
}


def small_dataset(
    root: Path, labels: list[Any], ctype: str = "multiclass", shapes: list[tuple] | None = None
) -> Dataset:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    cases = []
    for i, lab in enumerate(labels):
        shape = shapes[i] if shapes else (8, 8)
        write_image(
            Image.from_spacing(rng.integers(0, 255, (1, *shape)).astype(np.uint8)),
            root / "images" / f"c{i}.nii.gz",
        )
        cases.append(Case(id=f"c{i}", image=[f"images/c{i}.nii.gz"], label=lab))
    names = {"a": 0, "b": 1, "c": 2}
    ds = Dataset(
        root,
        "small",
        "classification",
        names,
        {0: "gray"},
        {0: "OT"},
        cases,
        classification_type=ctype,
        ndim=2,
    )
    ds.save()
    return load_dataset(root)


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_a_label_outside_the_declared_classes_names_the_case_and_file(tmp_path: Path) -> None:
    ds = small_dataset(tmp_path, [0, 1, 7])
    with pytest.raises(
        DatasetError, match=r"dataset\.json: case 'c2' has label 7, which is not a declared class"
    ):
        targets(ds, ds.training)


def test_a_multilabel_list_in_a_multiclass_dataset_says_what_to_change(tmp_path: Path) -> None:
    ds = small_dataset(tmp_path, [0, [1, 0, 1], 2])
    with pytest.raises(DatasetError, match=r"case 'c1' has the multi-label list \[1, 0, 1\].*\"multilabel\""):
        targets(ds, ds.training)
    ml = small_dataset(tmp_path / "ml", [[1, 0, 1], 2], ctype="multilabel")
    with pytest.raises(
        DatasetError, match=r"case 'c1' has label 2; a multilabel case needs a list of 3 values"
    ):
        targets(ml, ml.training)


def test_targets_map_label_values_to_indices(tmp_path: Path) -> None:
    ds = small_dataset(tmp_path, [2, 0, 1])
    assert targets(ds, ds.training).tolist() == [2, 0, 1]
    ml = small_dataset(tmp_path / "ml", [[1, 0, 1], [0, 0, 0]], ctype="multilabel")
    assert targets(ml, ml.training).tolist() == [[1, 0, 1], [0, 0, 0]]


def test_an_npz_missing_a_split_key_is_named(tmp_path: Path) -> None:
    from medlens.data.importers import import_dataset
    from medlens.tasks.medmnist import bench_medmnist
    from medlens.tasks.medmnist_synthetic import synthetic_medmnist

    npz = synthetic_medmnist(tmp_path / "pathmnist.npz", n_train=8, n_val=4, n_test=4, omit=("val_labels",))
    with pytest.raises(ImageReadError, match=r"pathmnist\.npz: has no 'val_labels' array"):
        import_dataset("medmnist", npz, tmp_path / "ds")
    with pytest.raises(ImageReadError, match="'val_labels'"):
        bench_medmnist(npz, budget="5s", measure=False)


def test_images_of_mixed_sizes_in_a_2d_folder_are_refused_by_file(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    from medlens.data.importers import import_dataset

    for cls, size in (("a", (16, 16)), ("b", (16, 16)), ("b", (20, 12))):
        folder = tmp_path / "src" / cls
        folder.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.iterdir()))
        PILImage.fromarray(np.full(size[::-1], 100, np.uint8)).save(folder / f"{n}.png")
    with pytest.raises(DatasetError, match=r"1\.png.*allow_mixed_sizes"):
        import_dataset("folder", tmp_path / "src", tmp_path / "ds")
    # allowed, the plan resizes every image to one input size
    ds = import_dataset("folder", tmp_path / "src", tmp_path / "ds", allow_mixed_sizes=True)
    arr = dataset_images(ds, ds.training, CONFIG, tmp_path / "cache")
    assert arr.shape == (3, 1, 8, 8)


def test_an_image_with_another_channel_count_is_refused_by_file(tmp_path: Path) -> None:
    ds = small_dataset(tmp_path, [0, 1])
    rgb = Image.from_spacing(np.zeros((3, 8, 8), np.uint8))
    write_image(rgb, tmp_path / "images" / "c1.nii.gz")
    with pytest.raises(DatasetError, match=r"c1\.nii\.gz: has 3 channel\(s\); this model takes 1.*case 'c1'"):
        dataset_images(ds, ds.training, CONFIG, tmp_path / "cache")


def test_a_loss_that_does_not_fit_the_type_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match=r"loss\.name 'bce' does not fit a multiclass task"):
        ClassificationLoss({"name": "bce"}, "multiclass", 3)
    with pytest.raises(PlanError, match="class_weights has 2 values for 3 classes"):
        ClassificationLoss({"name": "ce", "class_weights": [1.0, 2.0]}, "multiclass", 3)


# ---- preprocessing and the cache ------------------------------------------------------------------------------------
def test_files_and_arrays_are_preprocessed_identically(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (1, 12, 10)).astype(np.uint8)
    write_image(Image.from_spacing(arr, spacing=(0.5, 0.7)), tmp_path / "x.nii.gz")
    from medlens.io import read_image

    cfg = {
        **CONFIG,
        "preprocessing": {**CONFIG["preprocessing"], "normalization": {"0": {"scheme": "zscore"}}},
    }
    a = prepare_image(read_image(tmp_path / "x.nii.gz"), cfg)
    b = prepare_arrays(arr[None], cfg)[0]
    assert a.shape == (1, 8, 8)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert abs(a.mean()) < 1e-5 and a.std() == pytest.approx(1.0, abs=1e-4)  # per-image z-score


def test_the_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path: Path) -> None:
    ds = small_dataset(tmp_path, [0, 1, 2])
    first = dataset_images(ds, ds.training, CONFIG, tmp_path / "cache")
    assert first.dtype == np.float16 and first.shape == (3, 1, 8, 8)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0  # rescaled 0..255 -> 0..1
    files = sorted((tmp_path / "cache").glob("images_*.npy"))
    assert len(files) == 1 and json.loads(files[0].with_suffix(".json").read_text())["ids"] == [
        "c0",
        "c1",
        "c2",
    ]
    assert dataset_images(ds, ds.training, CONFIG, tmp_path / "cache").filename == first.filename
    write_image(Image.from_spacing(np.zeros((1, 8, 8), np.uint8)), tmp_path / "images" / "c1.nii.gz")
    changed = dataset_images(ds, ds.training, CONFIG, tmp_path / "cache")
    assert changed.filename != first.filename and float(np.abs(changed[1]).max()) == 0.0


# ---- the batch stream and the loss ------------------------------------------------------------------------------------
def make_task(labels: np.ndarray, balanced: bool = False, ctype: str = "multiclass") -> ClassificationTask:
    n = len(labels)
    images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 8, 8), np.float32)
    cfg = {**CONFIG, "sampling": {"balanced": balanced}}
    return ClassificationTask(
        images, labels, np.arange(n - 4), np.arange(n - 4, n), cfg, ctype, int(labels.max()) + 1
    )


def test_batches_are_a_pure_function_of_seed_and_index_and_cover_each_epoch() -> None:
    task = make_task(np.arange(28) % 3)
    a = [b["image"][:, 0, 0, 0].tolist() for _, b in zip(range(6), task.batches(5, 0), strict=False)]
    resumed = [b["image"][:, 0, 0, 0].tolist() for _, b in zip(range(3), task.batches(5, 3), strict=False)]
    assert resumed == a[3:]
    epoch = sorted(
        int(v) for batch in a[:3] for v in batch
    )  # 3 batches of 8 = one epoch of 24 training images
    assert epoch == list(range(24))
    other = next(task.batches(6, 0))["image"][:, 0, 0, 0].tolist()
    assert other != a[0]
    batch = next(task.batches(5, 0))
    assert batch["target"].tolist() == [int(v) % 3 for v in batch["image"][:, 0, 0, 0]]


def test_balanced_sampling_draws_the_classes_equally() -> None:
    labels = np.array([0] * 90 + [1] * 10 + [0, 1, 0, 1])
    task = make_task(labels, balanced=True)
    drawn = torch.cat([task.batch(0, i)["target"] for i in range(200)]).numpy()
    assert abs((drawn == 1).mean() - 0.5) < 0.05  # 10% of the images, half of the draws
    plain = torch.cat([make_task(labels).batch(0, i)["target"] for i in range(50)]).numpy()
    assert (plain == 1).mean() < 0.2


def test_validation_is_capped_to_a_fixed_random_subset() -> None:
    task = make_task(np.arange(30) % 3)
    assert len(task.val_rows) == 4
    n = 40
    cfg = {**CONFIG, "validation": {"max_cases": 5}}
    images = np.zeros((n, 1, 8, 8), np.float32)
    t1 = ClassificationTask(images, np.arange(n) % 2, np.arange(10), np.arange(10, n), cfg, "binary", 2)
    t2 = ClassificationTask(images, np.arange(n) % 2, np.arange(10), np.arange(10, n), cfg, "binary", 2)
    assert len(t1.val_rows) == 5 and t1.val_rows.tolist() == t2.val_rows.tolist()
    assert t1.val_rows.tolist() != list(range(10, 15))


def test_ordinal_probabilities_are_monotone_differences_and_coral_targets_are_cumulative() -> None:
    logits = torch.tensor(
        [[2.0, 0.5, 1.0], [-3.0, -4.0, -5.0]]
    )  # the second cumulative is not monotone at first
    p = class_probabilities(logits, "ordinal", "coral")
    assert p.shape == (2, 4)
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    assert bool((p >= 0).all())
    above = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(p[0, 0], 1 - above)
    loss = ClassificationLoss({"name": "coral"}, "ordinal", 4)
    perfect = torch.tensor([[20.0, 20.0, -20.0], [-20.0, -20.0, -20.0]])  # grade 2 and grade 0
    assert float(loss(perfect, torch.tensor([2, 0]))) < 1e-6
    assert float(loss(perfect, torch.tensor([0, 3]))) > 5


def test_class_weights_change_the_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    plain = ClassificationLoss({"name": "ce"}, "binary", 2)(logits, y)
    weighted = ClassificationLoss({"name": "ce", "class_weights": [1.0, 3.0]}, "binary", 2)(logits, y)
    expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weighted, expected)
    assert float(weighted) > float(plain)  # the misclassified case is of the up-weighted class


def test_prediction_refuses_images_the_model_cannot_take() -> None:
    from medlens.tasks.classify_data import check_image

    with pytest.raises(InputError, match="is a 3D image; this model takes 2D images"):
        check_image(Image.from_spacing(np.zeros((1, 4, 4, 4))), CONFIG, 1, "vol.nii.gz")
