"""Folds are patient-disjoint, stratified, reproducible per seed, and respect fixed splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from medlens.data.dataset import Case, Dataset
from medlens.data.splits import folds_from_json, make_folds, splits_json
from medlens.errors import DatasetError, InputError


def cls_dataset(n: int = 60, per_patient: int = 3, positives_every: int = 4, **kw) -> Dataset:
    """n cases, ``per_patient`` per patient, 1 in ``positives_every`` patients positive (imbalanced)."""
    training = []
    for i in range(n):
        p = i // per_patient
        training.append(Case(id=f"c{i:03d}", image=[f"{i}.nii.gz"], label=int(p % positives_every == 0),
                             meta={"patient_id": f"p{p}", "site": "AB"[p % 2]}))  # fmt: skip
    return Dataset(root=Path("/nowhere"), name="t", task="classification", labels={"neg": 0, "pos": 1},
                   channels={}, modalities={}, training=training, classification_type="binary", **kw)  # fmt: skip


def test_folds_partition_cases_and_keep_patients_together() -> None:
    ds = cls_dataset()
    folds = make_folds(ds, n_folds=5, seed=0)
    assert len(folds) == 5
    patient = {c.id: c.patient_id for c in ds.training}
    all_val = [cid for f in folds for cid in f.val]
    assert sorted(all_val) == sorted(patient)  # every case validated exactly once
    for f in folds:
        assert not set(f.train) & set(f.val)
        assert set(f.train) | set(f.val) == set(patient)
        assert not {patient[c] for c in f.train} & {patient[c] for c in f.val}


def test_folds_are_stratified_by_label() -> None:
    ds = cls_dataset(n=90, per_patient=1, positives_every=3)  # 30 positives in 90
    label = {c.id: c.label for c in ds.training}
    for f in make_folds(ds, n_folds=5, seed=1):
        assert f.stratified_by == "label"
        assert sum(label[c] for c in f.val) == 6 and len(f.val) == 18


def test_same_seed_same_folds_other_seed_other_folds() -> None:
    ds = cls_dataset()
    a, b, c = make_folds(ds, seed=7), make_folds(ds, seed=7), make_folds(ds, seed=8)
    assert a == b
    assert [f.val for f in a] != [f.val for f in c]
    shuffled = cls_dataset()
    shuffled.training.reverse()  # the order of dataset.json does not matter
    assert [f.val for f in make_folds(shuffled, seed=7)] == [f.val for f in a]


def test_unstratified_group_folds_are_balanced() -> None:
    ds = cls_dataset(n=60, per_patient=3)
    folds = make_folds(ds, n_folds=4, seed=0, stratify=False)
    assert [len(f.val) for f in folds] == [15, 15, 15, 15] and folds[0].stratified_by == "none"


def test_fixed_train_val_give_one_fold_and_test_is_excluded() -> None:
    ds = cls_dataset(n=12, per_patient=1)
    for c in ds.training:
        n = int(c.id[1:])
        c.split = "train" if n < 8 else "val" if n < 10 else "test"
    ds.test = [Case(id="extra", image=["e.nii.gz"], label=0)]
    (fold,) = make_folds(ds, n_folds=5)
    assert fold.stratified_by == "fixed split"
    assert fold.train == tuple(f"c{i:03d}" for i in range(8))
    assert fold.val == ("c008", "c009")
    assert fold.test == ("c010", "c011", "extra")


def test_fixed_val_joins_every_fold_and_patients_follow_their_fixed_cases() -> None:
    ds = cls_dataset(n=30, per_patient=1)
    ds.training[0].split = "val"
    ds.training[1].split = "train"
    ds.training.append(Case(id="c999", image=["x"], label=0, meta={"patient_id": "p0"}))  # p0 is fixed val
    folds = make_folds(ds, n_folds=3)
    for f in folds:
        assert {"c000", "c999"} <= set(f.val) and "c001" in f.train
    assert sum(len(f.val) for f in folds) == 3 * 2 + 28  # fixed val in each fold + the pool once


def test_only_train_marked_cases_are_cross_validated() -> None:
    ds = cls_dataset(n=20, per_patient=1)
    for c in ds.training:
        c.split = "train"
    folds = make_folds(ds, n_folds=4)
    assert len(folds) == 4 and sorted(x for f in folds for x in f.val) == sorted(c.id for c in ds.training)


def test_patient_in_two_fixed_splits_or_in_test_is_an_error() -> None:
    ds = cls_dataset(n=12, per_patient=2)
    ds.training[0].split, ds.training[1].split = "train", "val"
    with pytest.raises(DatasetError, match="patient 'p0' has cases with split 'train' and 'val'"):
        make_folds(ds)
    ds = cls_dataset(n=12, per_patient=2)
    ds.training[0].split = "test"
    with pytest.raises(DatasetError, match="patient 'p0' has test case 'c000' and training case 'c001'"):
        make_folds(ds)


def test_bad_fold_counts() -> None:
    with pytest.raises(DatasetError, match="4 patients cannot fill 5 folds"):
        make_folds(cls_dataset(n=12, per_patient=3), n_folds=5)
    with pytest.raises(InputError, match="n_folds=1"):
        make_folds(cls_dataset(), n_folds=1)


def test_segmentation_stratified_by_classes_present_from_fingerprint() -> None:
    training = [Case(id=f"s{i:02d}", image=["x"], label="y") for i in range(20)]
    ds = Dataset(root=Path("/x"), name="s", task="segmentation", labels={"bg": 0, "tumour": 1}, channels={},
                 modalities={}, training=training)  # fmt: skip
    fingerprint = {"cases": [{"id": c.id, "classes": [1] if i < 5 else []} for i, c in enumerate(training)]}
    folds = make_folds(ds, n_folds=5, seed=0, fingerprint=fingerprint)
    assert folds[0].stratified_by == "classes present"
    assert all(sum(int(c[1:]) < 5 for c in f.val) == 1 for f in folds)
    assert make_folds(ds, n_folds=5)[0].stratified_by == "none"


def test_multilabel_and_rare_strata() -> None:
    ds = cls_dataset(n=40, per_patient=1)
    ds.classification_type = "multilabel"
    for i, c in enumerate(ds.training):
        c.label = [int(i % 2 == 0), int(i % 10 == 0), int(i == 3)]  # label 2 has one positive only
    folds = make_folds(ds, n_folds=4, seed=0)
    assert folds[0].stratified_by == "rarest positive label"
    rare_label1 = Counter(next(f.index for f in folds if f"c{i:03d}" in f.val) for i in range(0, 40, 10))
    assert sorted(rare_label1.values()) == [1, 1, 1, 1]  # the 4 cases positive for label 1 are spread


def test_splits_json_round_trip() -> None:
    folds = make_folds(cls_dataset(), n_folds=3, seed=5)
    obj = splits_json(folds)
    assert obj["seed"] == 5 and obj["n_folds"] == 3 and obj["stratified_by"] == "label"
    assert folds_from_json(obj) == folds
    nnunet_style = [{"train": list(f.train), "val": list(f.val)} for f in folds]
    assert [f.val for f in folds_from_json(nnunet_style)] == [f.val for f in folds]
    with pytest.raises(DatasetError, match="fold 1 must be an object"):
        folds_from_json([nnunet_style[0], {"train": []}])
