"""Patient-level cross-validation folds that respect the splits a dataset prescribes.

Rules, in order:

1. Test cases (the ``test`` section, and training cases with ``split == "test"``) are never in a fold; they
   are listed in :attr:`Fold.test` so a run records what it held out.
2. A patient is never in two places: all of a patient's cases go to the same side. A patient whose cases
   sit in two fixed splits (or in test and training) is an error (``medlens dataset check`` reports it too).
3. Cases with ``split == "train"`` are always trained on and cases with ``split == "val"`` always validate
   (a patient's unsplit cases follow their fixed ones). When every case is fixed and some are ``"val"``,
   there is exactly one fold: the source's own split (e.g. MedMNIST's train/val). When cases are only
   marked ``"train"``, they are cross-validated like unsplit cases.
4. The remaining cases are divided into ``n_folds`` folds by patient with scikit-learn's
   ``StratifiedGroupKFold``, stratified by the class (classification: the label; multilabel: the rarest
   positive label; segmentation: which classes are present, from a fingerprint, else the site; detection:
   with/without boxes, else the site). Strata smaller than ``n_folds`` are pooled. Without stratification,
   patients are dealt to the smallest fold, largest patients first.

The same dataset and seed always give the same folds (cases are sorted by id first, so the order of
``dataset.json`` does not matter).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from medlens.data.dataset import Case, Dataset
from medlens.errors import DatasetError, InputError

__all__ = ["Fold", "folds_from_json", "make_folds", "splits_json"]

log = logging.getLogger(__name__)

SPLITS_VERSION = 1


@dataclass(frozen=True)
class Fold:
    """One train/validation split of a dataset's case ids.

    Attributes:
        index: fold number, from 0.
        train / val: case ids, sorted.
        test: held-out test case ids (identical in every fold), sorted.
        seed: the seed the folds were made with.
        stratified_by: what the folds were balanced on (``"label"``, ``"site"``, ``"classes present"``,
            ``"boxes"``, ``"none"``, or ``"fixed split"`` for a source-given split).
    """

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...] = ()
    seed: int = 0
    stratified_by: str = "none"


def make_folds(
    dataset: Dataset,
    n_folds: int = 5,
    seed: int = 0,
    stratify: bool = True,
    fingerprint: dict[str, Any] | None = None,
) -> list[Fold]:
    """Split the training cases of ``dataset`` into patient-disjoint folds (rules in the module docstring).

    Args:
        dataset: a loaded dataset; ``patient_id`` metadata groups cases (a case is its own patient otherwise).
        n_folds: number of folds (at least 2; ignored when the dataset prescribes its own validation set).
        seed: shuffling seed; the same seed gives the same folds.
        stratify: balance the folds by class (see module docstring); False only groups by patient.
        fingerprint: a fingerprint of ``dataset``; segmentation folds are stratified by the classes present
            in each case when it is given.

    Returns:
        The folds, ``Fold.index`` from 0.

    Raises:
        InputError: ``n_folds`` below 2.
        DatasetError: no training cases, fewer patients than folds, or a patient in two fixed splits.
    """
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise InputError(f"n_folds={n_folds!r}: cross-validation needs an integer of at least 2")
    where = dataset.json_path
    test_cases = [*dataset.test, *(c for c in dataset.training if c.split == "test")]
    test_ids = tuple(sorted(c.id for c in test_cases))
    test_patients = {c.patient_id: c.id for c in test_cases}
    usable = sorted((c for c in dataset.training if c.split != "test"), key=lambda c: c.id)
    side: dict[str, str] = {}
    for c in usable:
        if c.patient_id in test_patients:
            raise DatasetError(
                f"{where}: patient {c.patient_id!r} has test case {test_patients[c.patient_id]!r} and training "
                f"case {c.id!r}; a patient belongs to one split (run 'medlens dataset check')"
            )
        if c.split in ("train", "val") and side.setdefault(c.patient_id, c.split) != c.split:
            raise DatasetError(
                f"{where}: patient {c.patient_id!r} has cases with split 'train' and 'val' (e.g. {c.id!r}); "
                "a patient belongs to one split"
            )
    fixed_train = [c for c in usable if side.get(c.patient_id) == "train"]
    fixed_val = [c for c in usable if side.get(c.patient_id) == "val"]
    pool = [c for c in usable if c.patient_id not in side]
    if not pool and fixed_val:
        log.info(
            "dataset prescribes its validation set: one fold (%d train, %d val)",
            len(fixed_train),
            len(fixed_val),
        )
        return [Fold(0, _ids(fixed_train), _ids(fixed_val), test_ids, seed, "fixed split")]
    if not pool:
        pool, fixed_train = fixed_train, []
    if not pool:
        raise DatasetError(f"{where}: has no training cases to split into folds")
    patients = sorted({c.patient_id for c in pool})
    if len(patients) < n_folds:
        raise DatasetError(
            f"{where}: {len(patients)} patients cannot fill {n_folds} folds; use n_folds <= {len(patients)}"
        )
    strata, by = _strata(dataset, pool, n_folds, fingerprint) if stratify else (None, "none")
    if strata is None:
        fold_of = _deal_patients(pool, n_folds, seed)
        by = "none"
    else:
        from sklearn.model_selection import StratifiedGroupKFold

        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        groups = [c.patient_id for c in pool]
        fold_of = {}
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(pool)), strata, groups)):
            fold_of.update({pool[i].id: k for i in val_idx})
    folds = []
    for k in range(n_folds):
        val = [c for c in pool if fold_of[c.id] == k] + fixed_val
        train = [c for c in pool if fold_of[c.id] != k] + fixed_train
        folds.append(Fold(k, _ids(train), _ids(val), test_ids, seed, by))
    log.info(
        "made %d folds of %d cases (%d patients), stratified by %s", n_folds, len(usable), len(patients), by
    )
    return folds


def splits_json(folds: list[Fold]) -> dict[str, Any]:
    """The folds as JSON a run records (``folds`` entries are nnU-Net ``splits_final.json`` compatible)."""
    if not folds:
        raise InputError("splits_json: no folds given")
    return {
        "medlens_splits": SPLITS_VERSION,
        "seed": folds[0].seed,
        "n_folds": len(folds),
        "stratified_by": folds[0].stratified_by,
        "test": list(folds[0].test),
        "folds": [{"fold": f.index, "train": list(f.train), "val": list(f.val)} for f in folds],
    }


def folds_from_json(obj: Any, where: str = "splits.json") -> list[Fold]:
    """Read folds back from :func:`splits_json` output (or an nnU-Net ``splits_final.json`` list)."""
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        meta, entries = obj, obj.get("folds")
    else:
        entries = obj
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{where}: expected a list of folds with 'train' and 'val' case ids")
    folds = []
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or not all(isinstance(e.get(s), list) for s in ("train", "val")):
            raise DatasetError(
                f"{where}: fold {k} must be an object with 'train' and 'val' lists of case ids"
            )
        folds.append(
            Fold(
                index=int(e.get("fold", k)),
                train=tuple(str(i) for i in e["train"]),
                val=tuple(str(i) for i in e["val"]),
                test=tuple(str(i) for i in meta.get("test", [])),
                seed=int(meta.get("seed", 0)),
                stratified_by=str(meta.get("stratified_by", "none")),
            )
        )
    return folds


# ---- helpers --------------------------------------------------------------------------------------------------
def _ids(cases: list[Case]) -> tuple[str, ...]:
    return tuple(sorted(c.id for c in cases))


def _strata(
    dataset: Dataset, pool: list[Case], n_folds: int, fingerprint: dict[str, Any] | None
) -> tuple[list[str] | None, str]:
    """One stratum name per pool case and what it is based on; ``None`` when nothing varies."""
    candidates: list[tuple[str, list[str]]] = []
    if dataset.task == "classification":
        if dataset.classification_type == "multilabel":
            positives: Counter[int] = Counter()
            for c in pool:
                if isinstance(c.label, list):
                    positives.update(k for k, v in enumerate(c.label) if v)

            def rarest(c: Case) -> str:
                pos = [k for k, v in enumerate(c.label) if v] if isinstance(c.label, list) else []
                return str(min(pos, key=lambda k: (positives[k], k))) if pos else "none"

            candidates.append(("rarest positive label", [rarest(c) for c in pool]))
        else:
            candidates.append(("label", [str(c.label) for c in pool]))
    elif dataset.task == "segmentation" and fingerprint is not None:
        present = {r.get("id"): r.get("classes") for r in fingerprint.get("cases", []) if isinstance(r, dict)}
        if all(isinstance(present.get(c.id), list) for c in pool):
            keys = ["+".join(str(v) for v in sorted(present[c.id] or [])) or "empty" for c in pool]
            candidates.append(("classes present", keys))
    elif dataset.task == "detection":
        candidates.append(("boxes", ["boxes" if c.boxes else "no boxes" for c in pool]))
    if any(c.site is not None for c in pool):
        candidates.append(("site", [c.site or "unknown" for c in pool]))
    for by, keys in candidates:
        pooled = _pool_rare(keys, n_folds)
        if len(set(pooled)) > 1:
            return pooled, by
    return None, "none"


def _pool_rare(keys: list[str], n_folds: int) -> list[str]:
    """Merge strata with fewer than ``n_folds`` cases; a merged stratum still too small joins the largest."""
    counts = Counter(keys)
    rare = {k for k, n in counts.items() if n < n_folds}
    if not rare:
        return keys
    out = ["(rare)" if k in rare else k for k in keys]
    if sum(counts[k] for k in rare) < n_folds:
        common = [k for k in counts if k not in rare]
        largest = max(common, key=lambda k: (counts[k], k)) if common else "(rare)"
        out = [largest if k == "(rare)" else k for k in out]
    return out


def _deal_patients(pool: list[Case], n_folds: int, seed: int) -> dict[str, int]:
    """Group k-fold: patients in seeded random order, largest first, each to the fold with fewest cases."""
    by_patient: dict[str, list[Case]] = defaultdict(list)
    for c in pool:
        by_patient[c.patient_id].append(c)
    order = sorted(by_patient)
    perm = np.random.default_rng(seed).permutation(len(order))
    shuffled = sorted((order[i] for i in perm), key=lambda p: -len(by_patient[p]))  # stable: keeps shuffle
    sizes = [0] * n_folds
    fold_of: dict[str, int] = {}
    for p in shuffled:
        k = int(np.argmin(sizes))
        sizes[k] += len(by_patient[p])
        fold_of.update({c.id: k for c in by_patient[p]})
    return fold_of
