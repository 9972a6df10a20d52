"""``medlens bench medmnist``: train medlens on a MedMNIST ``.npz`` and compare with the published baselines.

The bench trains straight from the ``.npz`` (no NIfTI import: 100,000 images would take minutes to write):
the official train split trains, val selects the model (best validation AUC, MedMNIST's own selection) and
chooses the decision threshold, and test is evaluated once, with MedMNIST's ACC and AUC
(:func:`medlens.evaluate.classification.medmnist_acc`/``medmnist_auc``) and medlens's metrics with bootstrap
CIs. The run directory it writes is a normal medlens run: ``medlens predict RUN image.png`` applies it.

The dataset is recognised by its file name (``pathmnist.npz``, ``pathmnist_64.npz``, ``organmnist3d_28.npz``);
an unknown name is benchmarked all the same, without published numbers to compare with. Learnable files in
the same layout, to try the command without a download: :mod:`medlens.tasks.medmnist_synthetic`.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens._fs import atomic_write_json
from medlens.errors import InputError

log = logging.getLogger(__name__)

#: Published test AUC and ACC of MedMNIST v2's ResNet baselines, as ``(AUC, ACC)``: Yang, Shi, Wei, Liu, Zhao,
#: Ke, Pfister, Ni, "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image
#: classification", Scientific Data 10, 41 (2023), doi:10.1038/s41597-022-01721-8; Table 3 (2D: ResNet-18 at 28
#: and at 224 pixels) and Table 4 (3D: ResNet-18+3D and ResNet-18+ACS at 28^3).
#: Checked 2026-11-22. The paper's own tables (nature.com, PMC9852451, arXiv 2110.14795 / ar5iv) could not be
#: read from the sources at hand, and the benchmark table in the MedMNIST project site (MedMNIST/medmnist.github.io
#: v2.html, "Updated on Aug, 2021") is a pre-publication draft whose 224-pixel and 3D numbers differ from those
#: quoted for the published tables, so it verifies nothing. Each value kept is one that a public quotation of
#: MedMNIST v2's Table 3/4 (Yang et al. 2023) gives exactly (secondary sources, not the paper itself); a value no
#: quotation gave exactly is None, printed "n/a", rather than a number typed from memory. A whole method entry
#: may be None, or one value of its pair.
PUBLISHED_SOURCE = "MedMNIST v2 (Yang et al., Scientific Data 2023), Tables 3 and 4"
PUBLISHED: dict[str, dict[str, Any]] = {
    "pathmnist": {
        "classes": 9,
        "type": "multiclass",
        "ResNet-18 (28)": (0.983, 0.907),
        "ResNet-18 (224)": (0.989, 0.909),
    },
    "chestmnist": {
        "classes": 14,
        "type": "multilabel",
        "ResNet-18 (28)": (0.768, None),
        "ResNet-18 (224)": (0.773, 0.947),
    },
    "dermamnist": {
        "classes": 7,
        "type": "multiclass",
        "ResNet-18 (28)": (0.917, 0.735),
        "ResNet-18 (224)": (0.920, None),
    },
    "octmnist": {
        "classes": 4,
        "type": "multiclass",
        "ResNet-18 (28)": (0.943, 0.743),
        "ResNet-18 (224)": (0.958, 0.763),
    },
    "pneumoniamnist": {
        "classes": 2,
        "type": "binary",
        "ResNet-18 (28)": (0.944, 0.854),
        "ResNet-18 (224)": (0.956, 0.864),
    },
    "retinamnist": {
        "classes": 5,
        "type": "ordinal",
        "ResNet-18 (28)": (0.717, 0.524),
        "ResNet-18 (224)": (0.710, 0.493),
    },
    "breastmnist": {
        "classes": 2,
        "type": "binary",
        "ResNet-18 (28)": (0.901, 0.863),
        "ResNet-18 (224)": None,
    },
    "bloodmnist": {
        "classes": 8,
        "type": "multiclass",
        "ResNet-18 (28)": None,
        "ResNet-18 (224)": (0.998, None),
    },
    "tissuemnist": {
        "classes": 8,
        "type": "multiclass",
        "ResNet-18 (28)": (0.930, 0.676),
        "ResNet-18 (224)": (0.933, 0.681),
    },
    "organamnist": {
        "classes": 11,
        "type": "multiclass",
        "ResNet-18 (28)": (0.997, 0.935),
        "ResNet-18 (224)": (0.998, 0.951),
    },
    "organcmnist": {
        "classes": 11,
        "type": "multiclass",
        "ResNet-18 (28)": None,
        "ResNet-18 (224)": None,
    },
    "organsmnist": {
        "classes": 11,
        "type": "multiclass",
        "ResNet-18 (28)": None,
        "ResNet-18 (224)": None,
    },
    "organmnist3d": {
        "classes": 11,
        "type": "multiclass",
        "ResNet-18+3D (28)": (0.996, 0.907),
        "ResNet-18+ACS (28)": (0.994, 0.900),
    },
    "nodulemnist3d": {
        "classes": 2,
        "type": "binary",
        "ResNet-18+3D (28)": None,
        "ResNet-18+ACS (28)": None,
    },
    "adrenalmnist3d": {
        "classes": 2,
        "type": "binary",
        "ResNet-18+3D (28)": None,
        "ResNet-18+ACS (28)": None,
    },
    "fracturemnist3d": {
        "classes": 3,
        "type": "multiclass",
        "ResNet-18+3D (28)": None,
        "ResNet-18+ACS (28)": None,
    },
    "vesselmnist3d": {
        "classes": 2,
        "type": "binary",
        "ResNet-18+3D (28)": None,
        "ResNet-18+ACS (28)": None,
    },
    "synapsemnist3d": {
        "classes": 2,
        "type": "binary",
        "ResNet-18+3D (28)": None,
        "ResNet-18+ACS (28)": None,
    },
}


def recognise(path: str | Path) -> tuple[str | None, int | None]:
    """``pathmnist_64.npz`` -> ``("pathmnist", 64)``; ``pathmnist.npz`` -> ``("pathmnist", 28)``; unknown -> None."""
    stem = Path(path).name.lower().split(".")[0]
    m = re.fullmatch(r"([a-z0-9]+?)(?:_(\d+))?", stem)
    if m is None or m.group(1) not in PUBLISHED:
        return None, None
    return m.group(1), int(m.group(2) or 28)


def channel_first(images: np.ndarray) -> np.ndarray:
    """MedMNIST storage (``N x H x W``, ``N x H x W x 3``, ``N x D x H x W``) -> medlens ``(N, C, *spatial)``
    in index order (``i`` = columns), as :func:`medlens.io.medmnist.to_image` does per image."""
    if images.ndim == 3:
        return np.swapaxes(images, 1, 2)[:, None]
    if images.shape[-1] == 3:
        return np.transpose(images, (0, 3, 2, 1))
    return np.transpose(images, (0, 3, 2, 1))[:, None]


def classification_type(name: str | None, labels: np.ndarray) -> str:
    """The known type of a recognised dataset, else inferred from the labels (``N x K`` is multilabel)."""
    if name is not None:
        return str(PUBLISHED[name]["type"])
    if labels.shape[1] > 1:
        return "multilabel"
    return "binary" if int(labels.max()) <= 1 else "multiclass"


def fingerprint_from_arrays(
    images: np.ndarray, labels: np.ndarray, *, ctype: str, names: list[str], modality: str, dataset: str
) -> dict[str, Any]:
    """The fingerprint keys the classification planner reads, computed from ``(N, C, *spatial)`` arrays."""
    n, nch = images.shape[:2]
    spatial = list(images.shape[2:])
    sample = images[np.random.default_rng(0).choice(n, size=min(n, 2000), replace=False)].astype(np.float64)
    intensity = {}
    for c in range(nch):
        x = sample[:, c].ravel()
        intensity[str(c)] = {
            "mean": float(x.mean()), "std": float(x.std()), "median": float(np.median(x)),
            "p00_5": float(np.percentile(x, 0.5)), "p99_5": float(np.percentile(x, 99.5)),
            "min": float(images[:, c].min()), "max": float(images[:, c].max()),
        }  # fmt: skip
    if ctype == "multilabel":
        counts = {str(k): int(labels[:, k].sum()) for k in range(labels.shape[1])}
    else:
        counts = {str(k): int((labels[:, 0] == k).sum()) for k in range(len(names))}
    return {
        "medlens_fingerprint": 1, "dataset": dataset, "task": "classification", "classification_type": ctype,
        "ndim": len(spatial), "num_cases": n, "num_channels": nch,
        "modalities": {str(c): modality for c in range(nch)}, "channel_names": {str(c): f"ch{c}" for c in range(nch)},
        "spacing": {k: [1.0] * len(spatial) for k in ("median", "min", "max", "p10", "p90")},
        "shape": {"median": spatial, "min": spatial, "max": spatial},
        "intensity": intensity,
        "classes": {"names": {str(k): v for k, v in enumerate(names)}, "counts": counts},
    }  # fmt: skip


@dataclass
class BenchResult:
    """What :func:`bench_medmnist` measured (``to_dict`` is what ``bench_result.json`` holds)."""

    dataset: str
    classification_type: str
    size: int
    medmnist_acc: float
    medmnist_auc: float
    metrics: dict[str, Any]
    published: dict[str, tuple[float | None, float | None] | None]
    seconds: dict[str, float]
    train_images_per_second: float
    run_dir: Path | None
    plan_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "classification_type": self.classification_type, "size": self.size,
            "medmnist": {"acc": self.medmnist_acc, "auc": self.medmnist_auc, **self.metrics["medmnist"]},
            "published": {
                k: dict(zip(("auc", "acc"), v or (None, None), strict=True)) for k, v in self.published.items()
            },
            "published_source": PUBLISHED_SOURCE, "seconds": self.seconds,
            "train_images_per_second": self.train_images_per_second, "metrics": self.metrics,
            "run_dir": None if self.run_dir is None else str(self.run_dir), "plan_reasons": self.plan_reasons,
        }  # fmt: skip

    def table(self) -> list[list[str]]:
        """Rows ``[method, AUC, ACC]``: medlens (with 95% CIs) next to the published baselines."""
        m = self.metrics["medmnist"]
        rows = [[
            f"medlens ({self.size})",
            f"{self.medmnist_auc:.3f} [{m['auc']['low']:.3f}, {m['auc']['high']:.3f}]",
            f"{self.medmnist_acc:.3f} [{m['acc']['low']:.3f}, {m['acc']['high']:.3f}]",
        ]]  # fmt: skip
        rows += [[name, *(_fmt(x) for x in (v or (None, None)))] for name, v in self.published.items()]
        return rows


def _fmt(value: float | None) -> str:
    """A published value to three decimals, or "n/a" where none was verified (see :data:`PUBLISHED`)."""
    return "n/a" if value is None else f"{value:.3f}"


def bench_medmnist(
    npz: str | Path,
    *,
    budget: str | float = "5m",
    size: int | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    measure: bool = True,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    n_resamples: int = 2000,
) -> BenchResult:
    """Plan for the budget, train on train (selecting on val), evaluate on test, compare with the paper.

    Args:
        npz: a MedMNIST file (keys ``train_images``, ``train_labels``, ``val_*``, ``test_*``).
        budget: training budget (``"5m"``, ``"90s"``).
        size: network input size (default: the planner's choice, the file's own size for MedMNIST).
        out: run directory to keep (default: a temporary one, deleted afterwards).
        device: "auto", "cpu" or "cuda".
        measure: time real training steps when planning (False: the FLOP model; for tests).
        overrides: planner overrides (e.g. ``{"network": {"name": "test_classifier"}}`` in tests).
        progress: rich progress bar while training.
        n_resamples: bootstrap resamples of the test metrics.

    Raises:
        ImageReadError: not a MedMNIST file, or a missing split key (named).
        DatasetError: labels outside the classes, or of the wrong shape for the dataset's type.
    """
    from medlens.data.importers.medmnist import MEDMNIST_MODALITY, _check_label_values
    from medlens.evaluate.classification import (
        MEDMNIST_TASKS,
        classification_metrics,
        medmnist_acc,
        medmnist_auc,
    )
    from medlens.io.medmnist import SPLITS, load_medmnist
    from medlens.plan.planner import make_plan
    from medlens.tasks.classify import predict_scores
    from medlens.tasks.classify_data import build_array, prepare_arrays
    from medlens.tasks.classify_train import decide_threshold, fit

    t0 = time.perf_counter()
    npz = Path(npz)
    arrays = load_medmnist(npz)
    name, _ = recognise(npz)
    labels = {s: arrays.split(s).labels for s in SPLITS}
    ctype = classification_type(name, labels["train"])
    if ctype == "multilabel" and arrays.num_labels == 1:
        raise InputError(
            f"{npz}: {name} is multi-label, but the file holds one label per image; is it another dataset?"
        )
    if ctype != "multilabel" and arrays.num_labels > 1:
        raise InputError(
            f"{npz}: train_labels is N x {arrays.num_labels} (multi-label), but {name or 'this file'} is a "
            f"{ctype} dataset; check the file"
        )
    if name is not None:
        k = int(PUBLISHED[name]["classes"])
    else:
        k = (
            arrays.num_labels
            if ctype == "multilabel"
            else int(max(int(v.max()) for v in labels.values())) + 1
        )
    k = max(k, 2)
    if ctype == "multilabel" and arrays.num_labels != k:
        raise InputError(f"{npz}: train_labels has {arrays.num_labels} labels per image; {name} has {k}")
    for s in SPLITS:
        _check_label_values(npz, s, labels[s], ctype, k)
    names = [f"label_{j}" if ctype == "multilabel" else f"class_{j}" for j in range(k)]
    modality = MEDMNIST_MODALITY.get(name or "", "OT")
    trainval = np.concatenate([channel_first(arrays.train.images), channel_first(arrays.val.images)])
    y_all = np.concatenate([labels["train"], labels["val"]])
    y = y_all.astype(np.float32) if ctype == "multilabel" else y_all[:, 0].astype(np.int64)
    fp = fingerprint_from_arrays(
        trainval, y_all, ctype=ctype, names=names, modality=modality, dataset=name or npz.stem
    )
    plan_overrides = dict(overrides or {})
    if size is not None:
        plan_overrides["patch_size"] = [int(size)] * (trainval.ndim - 2)
    plan = make_plan(
        fp, task="classification", budget=budget, device=device, overrides=plan_overrides, measure=measure
    )
    config = plan.configuration()
    input_size = int(config["patch_size"][0])

    tmp = None if out is not None else tempfile.TemporaryDirectory(prefix="medlens-bench-")
    run_dir = Path(out) if out is not None else Path(tmp.name)  # type: ignore[union-attr]
    try:
        t_prep = time.perf_counter()
        # ~64 MB of float32 per preprocessing chunk, whatever the image size
        chunk = max(1, 2**24 // (trainval.shape[1] * math.prod(int(v) for v in config["patch_size"])))
        ids = [f"train_{i}" for i in range(len(arrays.train))] + [f"val_{i}" for i in range(len(arrays.val))]
        chunks = (prepare_arrays(trainval[i : i + chunk], config) for i in range(0, len(trainval), chunk))
        images = build_array(run_dir / "cache" / "images.npy", ids, chunks, config, trainval.shape[1])
        n_train = len(arrays.train)
        t_train = time.perf_counter()
        res = fit(
            images, y, np.arange(n_train), np.arange(n_train, len(ids)), config, ctype=ctype, class_names=names,
            run_dir=run_dir / "fold_0", progress=progress, device=device,
        )  # fmt: skip
        t_test = time.perf_counter()
        decision = decide_threshold(y[n_train:], res.val_scores, ctype, names, None)
        test_x = channel_first(arrays.test.images)
        loss, batch = config["loss"]["name"], 2 * int(config["batch_size"])
        scores = np.concatenate([
            predict_scores(res.model, prepare_arrays(test_x[i : i + chunk], config), None, ctype, loss, batch)
            for i in range(0, len(test_x), chunk)
        ])  # fmt: skip
        y_test = labels["test"] if ctype == "multilabel" else labels["test"][:, 0]
        task = MEDMNIST_TASKS[ctype]
        acc, auc = medmnist_acc(y_test, scores, task), medmnist_auc(y_test, scores, task)
        metrics = classification_metrics(
            y_test, scores, classification_type=ctype, class_names=names, threshold=decision.get("threshold"),
            n_resamples=n_resamples,
        )  # fmt: skip
        t_end = time.perf_counter()
        seen = res.trained.iterations * int(config["batch_size"])
        result = BenchResult(
            dataset=name or npz.stem,
            classification_type=ctype,
            size=input_size,
            medmnist_acc=acc,
            medmnist_auc=auc,
            metrics=metrics,
            published={
                kk: v for kk, v in PUBLISHED.get(name or "", {}).items() if kk not in ("type", "classes")
            },
            seconds={
                "load_and_plan": round(t_prep - t0, 1),
                "preprocess": round(t_train - t_prep, 1),
                "train": round(res.trained.seconds, 1),
                "test": round(t_end - t_test, 1),
                "total": round(t_end - t0, 1),
            },
            train_images_per_second=round(seen / max(res.trained.seconds, 1e-9), 1),
            run_dir=Path(out) if out is not None else None,
            plan_reasons=plan.reasons,
        )
        if out is not None:
            _write_run(
                run_dir, plan, config, name or npz.stem, names, ctype, modality, trainval, decision, res
            )
            atomic_write_json(run_dir / "bench_result.json", result.to_dict())
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def _write_run(
    run_dir: Path, plan: Any, config: Any, name: str, names: list[str], ctype: str, modality: str,
    trainval: np.ndarray, decision: dict[str, Any], res: Any,
) -> None:  # fmt: skip
    """A run directory ``medlens predict`` can apply (run.json, plan.json, fold_0/)."""
    import datetime

    from medlens import __version__
    from medlens.tasks.run import RUN_VERSION, write_run

    plan.save(run_dir / "plan.json")
    nch = int(trainval.shape[1])
    info = {
        "medlens_run": RUN_VERSION,
        "medlens_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "task": "classification",
        "configuration": plan.default_configuration,
        "dataset": {
            "name": name,
            "root": None,
            "labels": {n: i for i, n in enumerate(names)},
            "channels": {str(c): ("gray" if nch == 1 else "RGB"[c]) for c in range(nch)},
            "modalities": {str(c): modality for c in range(nch)},
            "ndim": int(trainval.ndim - 2),
        },
        "splits": {"source": "MedMNIST train/val/test"},
        "folds": [0],
        "fold_results": {
            "0": {
                "best_score": res.trained.best_score,
                "iterations": res.trained.iterations,
                "seconds": round(res.trained.seconds, 1),
            }
        },
        "classification": {"type": ctype, "class_names": names, "loss": config["loss"]["name"]},
        "decision": decision,
    }
    write_run(run_dir, info)
