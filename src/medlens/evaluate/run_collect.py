"""One prediction pass over the evaluated cases, per task: metrics, per-case performance, uncertainty, pictures.

:func:`collect_segmentation` and :func:`collect_classification` return a
:class:`~medlens.evaluate.run_eval.Collected` that every evidence function of
:mod:`medlens.evaluate.evidence` reads; nothing else predicts the clean cases again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from medlens.evaluate.run_eval import Collected

log = logging.getLogger(__name__)

#: How many worst cases the report pictures.
N_WORST = 3


def collect_segmentation(
    predictor: Any,
    dataset: Any,
    cases: Sequence[Any],
    *,
    seed: int = 0,
) -> Collected:
    """Predict every case (labels and probabilities in its own geometry), score it in mm, and estimate its
    uncertainty; keep the axial slice with most reference foreground of every case for the pictures."""
    from medlens.data.dataset import read_case_image
    from medlens.evaluate.segmentation import segmentation_metrics
    from medlens.evaluate.summary import case_record, summarise
    from medlens.io import read_image

    classes = {n: v for n, v in dataset.labels.items() if v != 0}
    per_case: list[dict[str, Any]] = []
    perf, unc, seconds = [], [], {}
    probs_list: list[np.ndarray] = []
    truth_list: list[np.ndarray] = []
    pictures: dict[str, np.ndarray] = {}
    unc_info: dict[str, Any] = {}
    for case in cases:
        image = read_case_image(dataset, case)
        truth = np.asarray(read_image(dataset.path(str(case.label))).array[0])
        # the deployed prediction, with the uncertainty predict --uncertainty gives (the run's referral method,
        # samples and seed, so the scores are comparable with its threshold)
        result = predictor.predict(image, probabilities=True, uncertainty=True)
        pred = np.asarray(result.label.array[0])
        metrics = segmentation_metrics(pred, truth, image.spacing, classes)
        per_case.append(case_record(case.id, metrics, site=case.site, meta=dict(case.meta)))
        dice = [m["dice"] for m in metrics.values() if np.isfinite(m.get("dice", np.nan))]
        perf.append(float(np.mean(dice)) if dice else np.nan)
        seconds[case.id] = round(result.seconds, 3)
        assert result.probabilities is not None  # asked for above
        probs_list.append(np.asarray(result.probabilities.array, dtype=np.float32))
        truth_list.append(truth)
        unc_image, score = result.uncertainty, float(result.uncertainty_score)
        unc.append(score)
        unc_info = {
            k: v for k, v in result.uncertainty_info.items() if k in ("score_name", "method", "samples")
        }
        k = _best_slice(truth, pred)
        img = np.asarray(image.array[0], dtype=np.float32)
        pictures.update(
            {
                f"{case.id}/image": _take(img, k),
                f"{case.id}/truth": _take(truth, k).astype(np.uint8),
                f"{case.id}/pred": _take(pred, k).astype(np.uint8),
                f"{case.id}/uncertainty": _take(np.asarray(unc_image.array[0], np.float32), k),
                f"{case.id}/spacing": np.asarray(image.spacing[:2], dtype=np.float32),
            }
        )
        log.info("  %s: mean Dice %.3f, uncertainty %.3f", case.id, perf[-1], score)
    performance = np.asarray(perf, dtype=np.float64)
    worst = [cases[i].id for i in np.argsort(np.nan_to_num(performance, nan=-1.0))[:N_WORST]]
    extra = {
        "metrics": summarise(per_case, seed=seed),
        "per_case": per_case,
        "worst_cases": worst,
        "pictured_cases": [c.id for c in cases],
    }
    return Collected(
        task="segmentation",
        ids=[c.id for c in cases],
        sites=[c.site for c in cases],
        meta=[dict(c.meta) for c in cases],
        performance=performance,
        uncertainty=np.asarray(unc),
        uncertainty_info={"score_name": unc_info.get("score_name", "mean foreground entropy"), **unc_info},
        extra=extra,
        pictures=pictures,
        seconds=seconds,
        arrays={"probs": probs_list, "truth": truth_list},
    )


def collect_classification(
    predictor: Any,
    dataset: Any,
    cases: Sequence[Any],
    *,
    seed: int = 0,
) -> Collected:
    """Predict every image, compute the metrics at the run's stored threshold, each case's correctness and
    uncertainty; keep the worst (most confidently wrong) and the most confidently right images for pictures."""
    from medlens.data.dataset import read_case_image
    from medlens.evaluate.classification import classification_metrics
    from medlens.explain.uncertainty import classification_uncertainty, uncertainty_settings
    from medlens.tasks.classify import targets
    from medlens.tasks.classify_data import prepare_image

    t0 = time.perf_counter()
    x = np.stack([prepare_image(read_case_image(dataset, c), predictor.config) for c in cases])
    y = targets(dataset, cases)
    probs = predictor.probabilities(x)
    per_image = (time.perf_counter() - t0) / max(len(cases), 1)
    threshold = predictor.decision.get("threshold")
    metrics = classification_metrics(
        y, probs, classification_type=predictor.ctype, class_names=predictor.class_names,
        threshold=threshold, seed=seed,
    )  # fmt: skip
    correct = correctness(y, probs, predictor.ctype, threshold)
    method, _, _, samples, seed = uncertainty_settings(predictor, "auto")
    unc = classification_uncertainty(predictor, x, method=method, samples=samples, seed=seed)
    loss = _case_loss(y, probs, predictor.ctype)
    order = np.argsort(-loss)
    worst = [int(i) for i in order[:N_WORST]]
    right = [int(i) for i in np.argsort(loss) if correct[i]][:N_WORST]
    pictured = worst + [i for i in right if i not in worst]
    pictures = {f"{cases[i].id}/image": x[i, 0].astype(np.float32) for i in pictured}
    extra = {
        "metrics": metrics,
        "classification_type": predictor.ctype,
        "class_names": list(predictor.class_names),
        "threshold": threshold,
        "targets": np.asarray(y).tolist(),
        "scores": np.round(probs, 6).tolist(),
        "worst_cases": [cases[i].id for i in worst],
        "chosen_cases": [cases[i].id for i in right],
        "pictured_cases": [cases[i].id for i in pictured],
    }
    return Collected(
        task="classification",
        ids=[c.id for c in cases],
        sites=[c.site for c in cases],
        meta=[dict(c.meta) for c in cases],
        performance=correct.astype(np.float64),
        uncertainty=np.asarray(unc["score"], dtype=np.float64),
        uncertainty_info={k: v for k, v in unc.items() if k not in ("probs", "score")},
        extra=extra,
        pictures=pictures,
        seconds={"per_image": round(per_image, 4)},
        arrays={"x": x, "y": np.asarray(y), "probs": probs},
    )


def correctness(y: np.ndarray, probs: np.ndarray, ctype: str, threshold: Any) -> np.ndarray:
    """1/0 per case: the run's decision (stored threshold, argmax, median grade; all labels for multilabel)
    equals the reference."""
    from medlens.evaluate.classification import predict

    if ctype == "binary":
        t = 0.5 if threshold is None else float(threshold)
        return ((probs[:, 1] >= t).astype(int) == np.asarray(y)).astype(np.int64)
    if ctype == "multilabel":
        ts = np.asarray(threshold if threshold is not None else 0.5, dtype=np.float64)
        return np.all((probs >= ts).astype(int) == np.asarray(y), axis=1).astype(np.int64)
    return (np.asarray(predict(probs, ctype)) == np.asarray(y)).astype(np.int64)


def _case_loss(y: np.ndarray, probs: np.ndarray, ctype: str) -> np.ndarray:
    """Per-case cross-entropy of the reference under the predicted probabilities (worst = largest)."""
    eps = 1e-7
    p = np.clip(probs, eps, 1 - eps)
    if ctype == "multilabel":
        yy = np.asarray(y, dtype=np.float64)
        return -np.mean(yy * np.log(p) + (1 - yy) * np.log(1 - p), axis=1)
    return -np.log(p[np.arange(len(p)), np.asarray(y, dtype=np.int64)])


def _best_slice(truth: np.ndarray, pred: np.ndarray) -> int | None:
    """The last-axis slice with most reference (else predicted) foreground; ``None`` for a 2D image."""
    if truth.ndim != 3:
        return None
    counts = (truth > 0).sum(axis=(0, 1))
    if counts.max() == 0:
        counts = (pred > 0).sum(axis=(0, 1))
    return int(np.argmax(counts)) if counts.max() > 0 else truth.shape[2] // 2


def _take(a: np.ndarray, k: int | None) -> np.ndarray:
    return a if k is None else np.ascontiguousarray(a[:, :, k])
