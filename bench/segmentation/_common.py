"""What every peer of the segmentation benchmark is given and what it hands back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _measure import Measured


class PeerFailed(Exception):
    """A peer could not produce predictions; the message says which step failed and where its log is."""


@dataclass(frozen=True)
class Context:
    """The shared setup of one benchmark run.

    Attributes:
        dataset_dir: the medlens ``brain-tissue`` dataset folder (nnU-Net raw layout inside).
        work: the run's work folder (each peer gets ``work/<peer>``).
        budget_s: the wall-clock training budget per peer, in seconds.
        budget_text: the budget as given on the command line (passed to ``medlens plan``).
        train_ids / val_ids: fold 0 of medlens' 5-fold split (``make_folds(dataset, 5, seed=0)``).
        folds: all five folds as ``{"train": [...], "val": [...]}`` (nnU-Net ``splits_final.json``).
        test_ids: the dataset's held-out ``test`` cases, on which every peer is evaluated.
        labels: class name -> label value.
        python: the project's Python (``.venv/bin/python``).
        medlens: the ``medlens`` command.
    """

    dataset_dir: Path
    work: Path
    budget_s: float
    budget_text: str
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    folds: list[dict[str, list[str]]]
    test_ids: tuple[str, ...]
    labels: dict[str, int]
    python: str
    medlens: str

    def peer_dir(self, peer: str) -> Path:
        d = self.work / peer
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class PeerResult:
    """One peer's run: timings, memory, what it trained on, and where its test predictions are.

    Attributes:
        peer: short name (``medlens``, ``nnunet``, ``monai``).
        title: display name.
        setup: configuration actually used, for the table (e.g. "3d_fullres 80x96x80 b2").
        pred_dir: folder with one label map per test case.
        train / predict: the measured training and prediction commands.
        prepare: other measured steps (venv build, planning, preprocessing), by name.
        train_samples: training samples (patches) the peer's optimiser saw.
        sample_voxels: voxels per training sample (patch volume).
        iterations: optimiser steps.
        notes: what the reader should know about this peer's run.
        error: why the peer failed, if it did.
        extra: anything else worth recording (raw summaries).
    """

    peer: str
    title: str
    setup: str = ""
    pred_dir: Path | None = None
    train: Measured | None = None
    predict: Measured | None = None
    prepare: dict[str, Measured] = field(default_factory=dict)
    train_samples: int | None = None
    sample_voxels: int | None = None
    iterations: int | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        if self.train is None or not self.train_samples:
            return math.nan
        return self.train_samples / self.train.seconds

    @property
    def mvox_per_s(self) -> float:
        if not self.sample_voxels:
            return math.nan
        return self.samples_per_s * self.sample_voxels / 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "title": self.title,
            "setup": self.setup,
            "pred_dir": str(self.pred_dir) if self.pred_dir else None,
            "train": self.train.to_json() if self.train else None,
            "predict": self.predict.to_json() if self.predict else None,
            "prepare": {k: v.to_json() for k, v in self.prepare.items()},
            "train_samples": self.train_samples,
            "sample_voxels": self.sample_voxels,
            "iterations": self.iterations,
            "samples_per_s": self.samples_per_s,
            "notes": self.notes,
            "error": self.error,
            "extra": self.extra,
        }


def require(m: Measured, step: str) -> Measured:
    """Raise :class:`PeerFailed` naming ``step`` when the measured command did not succeed."""
    if not m.ok:
        raise PeerFailed(f"{step}: {m.failure()}")
    return m
