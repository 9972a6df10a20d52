"""How sure is the model? Per-case uncertainty scores, voxel-wise uncertainty maps, and referral to an expert.

Three ways to draw *samples* of a prediction (each sample is one set of class probabilities):

- ``ensemble``: one sample per cross-validation fold model of the run (deep ensembles; needs >= 2 folds).
- ``mc_dropout``: ``samples`` stochastic passes per fold model with only the dropout modules switched to training
  mode (batch/instance norm stay in eval), seeded; needs a network built with dropout (plan:
  ``network.dropout``, e.g. ``make_plan(..., overrides={"network": {"dropout": 0.2}})``).
- ``tta``: ``samples`` passes per fold model over transformed inputs: first the mirroring flips (segmentation:
  every spatial axis, as :mod:`medlens.tasks.inference`; classification: only the flips the plan's
  augmentation trained the model to ignore), then, when ``samples`` asks for more, small intensity jitter of the
  normalised input (a gain per channel uniform in [0.9, 1.1] and Gaussian noise with sd 0.1 per voxel), seeded.
- ``auto``: ``ensemble`` with >= 2 folds, else ``mc_dropout`` when the network has dropout, else ``tta``.

Scores (all in [0, 1]; higher = less sure):

- classification: the predictive entropy of the mean probabilities divided by log K (multilabel: the mean
  over labels of the binary entropy divided by log 2), and the mutual information (expected information gain,
  the part of the entropy due to disagreement between samples), normalised the same way.
- segmentation: a voxel map of the normalised predictive entropy, in the input's geometry; the per-case score
  is its mean over the voxels predicted foreground (argmax of the mean probabilities is not background), or
  over the whole image when nothing is predicted (``score_region`` says which).

Referral (:func:`decide_referral`): the threshold is the ``1 - fraction`` quantile of the scores of the run's
validation cases, stored in ``run.json["referral"]``; a prediction is referred when ``score > threshold``
(so a fraction of 0 refers nothing seen on validation, and ties at the threshold are kept).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import InputError, RunError, unknown_name
from medlens.io.image import Image

log = logging.getLogger(__name__)

METHODS = ("ensemble", "mc_dropout", "tta")
JITTER_GAIN = (0.9, 1.1)
JITTER_NOISE_SD = 0.1
SEG_SCORE = "mean_foreground_entropy"
CLS_SCORE = "predictive_entropy"


# ---- method choice and dropout ---------------------------------------------------------------------------------
def has_dropout(model: Any) -> bool:
    """Whether ``model`` is a torch module with at least one dropout layer of non-zero probability."""
    from torch import nn

    if not isinstance(model, nn.Module):
        return False
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def resolve_method(predictor: Any, method: str) -> str:
    """The concrete method for ``predictor`` ("auto" resolved, the others checked to be possible)."""
    models = list(predictor.models)
    if method == "auto":
        if len(models) >= 2:
            return "ensemble"
        return "mc_dropout" if all(has_dropout(m) for m in models) else "tta"
    if method not in METHODS:
        raise unknown_name("uncertainty method", method, ("auto", *METHODS))
    if method == "ensemble" and len(models) < 2:
        raise InputError(
            f"{predictor.run_dir}: uncertainty method 'ensemble' needs at least 2 trained folds, this run has "
            f"{len(models)}; train more folds (--fold all) or use 'mc_dropout' or 'tta'"
        )
    if method == "mc_dropout" and not all(has_dropout(m) for m in models):
        raise InputError(
            f"{predictor.run_dir}: uncertainty method 'mc_dropout' needs a PyTorch network with dropout; this "
            "one has none (or runs on ONNX: use --backend torch). Retrain with the plan's network.dropout "
            "set (e.g. 0.2), or use 'ensemble' or 'tta'"
        )
    return method


@contextlib.contextmanager
def mc_dropout_mode(model: Any) -> Iterator[None]:
    """Within the block, only the dropout modules of ``model`` are in training mode; restored afterwards."""
    from torch import nn

    changed = []
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and not m.training:
            m.train(True)
            changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.train(False)


@contextlib.contextmanager
def _seeded(seed: int, device: Any) -> Iterator[None]:
    """Seed torch inside the block without disturbing the caller's random state."""
    import torch

    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _jitter(rng: np.random.Generator, x: np.ndarray, channel_axis: int) -> np.ndarray:
    """``x`` with a random gain per channel and Gaussian noise per voxel (normalised intensity units).

    The noise matters: instance normalisation undoes a global gain, so a gain alone would change nothing.
    """
    shape = [1] * x.ndim
    shape[channel_axis] = x.shape[channel_axis]
    gain = rng.uniform(*JITTER_GAIN, size=shape).astype(np.float32)
    noise = rng.normal(0.0, JITTER_NOISE_SD, size=x.shape).astype(np.float32)
    return np.asarray(x * gain + noise, dtype=np.float32)


def _flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes``, the identity first."""
    import itertools

    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _check_samples(samples: int) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"uncertainty samples must be a positive integer, got {samples!r}")
    return samples


# ---- entropy -------------------------------------------------------------------------------------------------
def _entropy(p: np.ndarray, axis: int, multilabel: bool = False) -> np.ndarray:
    """Normalised entropy along ``axis``: classes (divided by log K) or binary per label (mean, by log 2)."""
    eps = 1e-12
    p = np.clip(p.astype(np.float64), 0.0, 1.0)
    if multilabel:
        h = -(p * np.log(p + eps) + (1 - p) * np.log(1 - p + eps)) / math.log(2)
        return h.mean(axis=axis)
    k = p.shape[axis]
    return -(p * np.log(p + eps)).sum(axis=axis) / math.log(max(k, 2))


# ---- classification -------------------------------------------------------------------------------------------
def classification_uncertainty(
    predictor: Any, images: np.ndarray, method: str = "ensemble", samples: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Uncertainty of a classification run's predictions on preprocessed images.

    Args:
        predictor: a :class:`medlens.serve.classify.ClassificationPredictor`.
        images: ``(N, C, *size)`` from :func:`medlens.tasks.classify_data.prepare_image` (stacked).
        method: "ensemble", "mc_dropout", "tta" or "auto" (see the module docstring).
        samples: passes per fold model for mc_dropout and tta (ignored by ensemble).
        seed: seeds the dropout masks and the intensity jitter.

    Returns:
        ``probs`` (N, K) mean over the samples, ``score`` (N,) normalised predictive entropy, ``score_name``,
        ``mutual_information`` (N,), ``samples`` (the number drawn per image) and ``method``.
    """
    from medlens.tasks.classify import predict_scores
    from medlens.tasks.inference import autocast_for

    method = resolve_method(predictor, method)
    samples = _check_samples(samples)
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != int(predictor.config["spatial_dims"]) + 2:
        raise InputError(f"images must be (N, C, *size) preprocessed arrays, got shape {x.shape}")
    batch = 2 * int(predictor.config["batch_size"])

    def run(model: Any, inp: np.ndarray) -> np.ndarray:
        return predict_scores(
            model, inp, None, predictor.ctype, predictor.loss, batch,
            autocast=lambda: autocast_for(predictor.device, predictor.precision),
        )  # fmt: skip

    draws: list[np.ndarray] = []
    if method == "ensemble":
        draws = [run(m, x) for m in predictor.models]
    elif method == "mc_dropout":
        with _seeded(seed, predictor.device):
            for m in predictor.models:
                with mc_dropout_mode(m):
                    draws += [run(m, x) for _ in range(samples)]
    else:
        aug = predictor.config.get("augmentation", {}).get("mirror", {})
        axes = [int(a) + 2 for a in aug.get("axes", [])] if float(aug.get("p", 0.0)) > 0 else []
        flips = _flip_sets(axes)
        rng = np.random.default_rng(seed)
        for m in predictor.models:
            for t in range(samples):
                inp = np.flip(x, flips[t % len(flips)]) if flips[t % len(flips)] else x
                if t >= len(flips):
                    inp = _jitter(rng, inp, channel_axis=1)
                draws.append(run(m, np.ascontiguousarray(inp)))
    stack = np.stack(draws)  # (T, N, K)
    multilabel = predictor.ctype == "multilabel"
    mean = stack.mean(0)
    score = _entropy(mean, axis=-1, multilabel=multilabel)
    expected = np.mean([_entropy(s, axis=-1, multilabel=multilabel) for s in stack], axis=0)
    return {
        "probs": mean.astype(np.float32),
        "score": score.astype(np.float64),
        "score_name": CLS_SCORE,
        "mutual_information": np.clip(score - expected, 0.0, None),
        "samples": len(draws),
        "method": method,
    }


# ---- segmentation ---------------------------------------------------------------------------------------------
def segmentation_uncertainty(
    predictor: Any, image: Image, method: str = "ensemble", samples: int = 8, seed: int = 0
) -> tuple[Image, Image, float]:
    """Uncertainty of a segmentation run's prediction on one image.

    Args:
        predictor: a :class:`medlens.serve.predictor.Predictor`.
        image: the input (all channels stacked), in any geometry.
        method: "ensemble", "mc_dropout", "tta" or "auto" (see the module docstring).
        samples: passes per fold model for mc_dropout and tta (ignored by ensemble).
        seed: seeds the dropout masks and the intensity jitter.

    Returns:
        ``(probs, uncertainty, score)``: the mean class probabilities ``(K, *S)`` and the normalised entropy
        map ``(1, *S)``, both Images in the input's geometry (``uncertainty.meta`` holds ``score_name``,
        ``score_region``, ``method``, ``samples`` and ``mutual_information``, the case mean of the voxel
        mutual information over the same region), and the per-case score.
    """
    import torch

    from medlens.plan.preprocess import invert, preprocess_case
    from medlens.tasks.inference import sliding_window_logits

    method = resolve_method(predictor, method)
    samples = _check_samples(samples)
    source = str(image.meta.get("source", "image"))
    predictor.check_input(image, source)
    config = predictor.config
    data, _, pinfo = preprocess_case(image, None, config, case_id=Path(source).name)
    inf = config.get("inference", {})
    spatial_dims = int(config["spatial_dims"])
    slice_axis = (
        config.get("sampling", {}).get("slice_axis") if spatial_dims == 2 and data.ndim == 4 else None
    )
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))

    def run(model: Any, inp: torch.Tensor, mirror: Sequence[int]) -> np.ndarray:
        p = sliding_window_logits(
            model, inp, list(inf.get("roi_size", config["patch_size"])), overlap=float(inf.get("overlap", 0.25)),
            sw_batch_size=int(inf.get("sw_batch_size", 4)), mirror_axes=mirror, precision=predictor.precision,
            device=predictor.device, slice_axis=slice_axis,
        )  # fmt: skip
        return p.numpy()

    total: np.ndarray | None = None
    entropy_sum: np.ndarray | None = None
    count = 0

    def add(p: np.ndarray) -> None:
        nonlocal total, entropy_sum, count
        h = _entropy(p, axis=0)
        total = p.astype(np.float64) if total is None else total + p
        entropy_sum = h if entropy_sum is None else entropy_sum + h
        count += 1

    default_mirror = list(inf.get("mirror_axes", []))
    if method == "ensemble":
        for m in predictor.models:
            add(run(m, x, default_mirror))
    elif method == "mc_dropout":
        with _seeded(seed, predictor.device):
            for m in predictor.models:
                with mc_dropout_mode(m):
                    for _ in range(samples):
                        add(run(m, x, default_mirror))
    else:
        axes = [a + 1 for a in range(data.ndim - 1) if a != slice_axis]
        flips = _flip_sets(axes)
        rng = np.random.default_rng(seed)
        for m in predictor.models:
            for t in range(samples):
                dims = flips[t % len(flips)]
                inp = torch.flip(x, dims) if dims else x
                if t >= len(flips):
                    inp = torch.from_numpy(_jitter(rng, inp.numpy(), channel_axis=0))
                p = run(m, inp, ())
                add(np.ascontiguousarray(np.flip(p, dims)) if dims else p)
    assert total is not None and entropy_sum is not None  # at least one model and one sample
    mean = (total / count).astype(np.float32)
    entropy = _entropy(mean, axis=0).astype(np.float32)
    mi = np.clip(entropy - entropy_sum / count, 0.0, None).astype(np.float32)
    # Back to the input grid; outside the cropped region the image was empty: certain background.
    fg = invert(mean[1:], pinfo, is_label=False, fill=0.0)
    probs = np.concatenate([1.0 - fg.sum(0, keepdims=True), fg]).astype(np.float32)
    ent_in = invert(entropy, pinfo, is_label=False, fill=0.0).astype(np.float32)
    mi_in = invert(mi, pinfo, is_label=False, fill=0.0)
    foreground = probs.argmax(0) > 0
    region = "foreground" if foreground.any() else "whole_image"
    mask = foreground if foreground.any() else np.ones_like(foreground)
    score = float(ent_in[mask].mean())
    meta = {
        "source": source, "score_name": SEG_SCORE, "score_region": region, "method": method,
        "samples": count, "mutual_information": float(mi_in[mask].mean()),
    }  # fmt: skip
    prob_img = Image(probs, image.affine.copy(), modality="OT", meta={"source": source})
    unc_img = Image(ent_in[None], image.affine.copy(), modality="OT", meta=meta)
    return prob_img, unc_img, score


# ---- referral ------------------------------------------------------------------------------------------------
def referral_for(predictor: Any, method: str) -> tuple[str, dict[str, Any] | None, str]:
    """The method to use and the run's stored referral that applies to it.

    Returns:
        ``(method, referral or None, note)``: "auto" becomes the stored method when the run has a referral
        (so its threshold applies); ``note`` says why no threshold applies when there is none.
    """
    referral = predictor.info.get("referral")
    if not isinstance(referral, dict) or "threshold" not in referral:
        return resolve_method(predictor, method), None, "the run has no referral threshold (run.json)"
    stored = str(referral.get("method"))
    chosen = resolve_method(predictor, stored if method == "auto" else method)
    if chosen != stored:
        return chosen, None, f"the run's referral threshold is for method {stored!r}, not {chosen!r}"
    return chosen, referral, ""


def uncertainty_settings(predictor: Any, method: str) -> tuple[str, dict[str, Any] | None, str, int, int]:
    """``(method, referral, note, samples, seed)`` for a prediction's uncertainty: :func:`referral_for`, plus
    the sample count and seed the referral threshold was decided with (8 and 0 without one), so scores are
    comparable with the threshold."""
    chosen, referral, note = referral_for(predictor, method)
    samples = int(referral.get("samples", 8)) if referral else 8
    seed = int(referral.get("seed", 0)) if referral else 0
    return chosen, referral, note, samples, seed


def check_referral(run_dir: str | Path, method: str = "auto") -> str:
    """Refuse to flag referrals without a validated threshold; return the method whose threshold applies.

    A "refer: no" from a threshold nobody validated on this model would be false reassurance, so
    ``medlens predict --uncertainty`` refuses rather than invent one; the fix is one option away.

    Raises:
        RunError: the run has no ``referral`` section, or it was set for another method.
    """
    from medlens.tasks.run import read_run

    if method != "auto" and method not in METHODS:
        raise unknown_name("uncertainty method", method, ("auto", *METHODS))
    referral = read_run(run_dir).get("referral")
    if not isinstance(referral, dict) or "threshold" not in referral:
        raise RunError(
            f"{run_dir}: has no referral threshold (run.json 'referral'), so no validated 'refer' flag can be "
            "given; add --referral-data DATASET to set it on the run's validation cases"
        )
    stored = str(referral.get("method"))
    if method not in ("auto", stored):
        raise RunError(
            f"{run_dir}: the referral threshold was set for uncertainty method {stored!r}, not {method!r}; use "
            f"--uncertainty-method {stored} or set a new one with --referral-data DATASET"
        )
    return stored


def refer(score: float, referral: dict[str, Any] | None) -> bool | None:
    """``score > threshold``, or None when no threshold applies (never a made-up decision)."""
    if referral is None:
        return None
    return bool(score > float(referral["threshold"]))


def decide_referral(
    run_dir: str | Path,
    dataset_dir: str | Path,
    fraction: float = 0.1,
    method: str = "auto",
    *,
    samples: int = 8,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Choose the run's referral threshold on its validation cases and store it in ``run.json["referral"]``.

    Each fold's validation cases are scored out-of-fold, by that fold's model alone, for ``mc_dropout`` and
    ``tta``. An ``ensemble`` cannot be formed out-of-fold (a case is unseen by one fold only), so its validation
    cases are scored by all folds: members that trained on a case are surer of it, which lowers the threshold,
    so new cases are referred somewhat more often than ``fraction`` (the safe direction). Likewise, predictions
    pool the samples of all folds, whose disagreement only adds to the score.

    Args:
        run_dir: a trained run.
        dataset_dir: the dataset it was trained on (the validation cases are read from it).
        fraction: the share of validation cases to refer, in (0, 1).
        method: "auto", "ensemble", "mc_dropout" or "tta".
        samples: passes per model (mc_dropout, tta).
        seed: seeds dropout masks and jitter.
        device: "auto", "cpu" or "cuda".

    Returns:
        The stored section: ``method, score_name, threshold, fraction, reason`` plus ``samples, seed,
        n_cases, scored, referred_validation``.
    """
    from medlens.data.dataset import load_dataset, read_case_image
    from medlens.errors import DatasetError
    from medlens.evaluate.deferral import refer_threshold
    from medlens.serve import load_predictor
    from medlens.tasks.run import read_run, write_run

    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise InputError(f"referral fraction must be a number between 0 and 1 (e.g. 0.1), got {fraction!r}")
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    predictor = load_predictor(run_dir, device=device, backend="torch")
    method = resolve_method(predictor, method)
    dataset = load_dataset(dataset_dir)
    folds = [int(f) for f in info.get("folds", [])]
    per_fold = {f: list((info.get("fold_results") or {}).get(str(f), {}).get("val_cases", [])) for f in folds}
    if not any(per_fold.values()):
        raise RunError(f"{run_dir}: run.json lists no validation cases for its folds; cannot set a threshold")
    ids: list[str] = []
    scores: list[float] = []
    for n, f in enumerate(folds):
        if not per_fold[f]:
            continue
        scorer = predictor
        if method != "ensemble":
            scorer = copy.copy(predictor)
            scorer.models = [predictor.models[n]]
        try:
            cases = [dataset.case(cid) for cid in per_fold[f]]
        except DatasetError as e:
            raise DatasetError(
                f"{e} (a validation case of {run_dir}: give the dataset it was trained on)"
            ) from None
        images = [read_case_image(dataset, c) for c in cases]
        if info.get("task") == "classification":
            from medlens.tasks.classify_data import check_image, prepare_image

            for c, im in zip(cases, images, strict=True):
                check_image(im, predictor.config, predictor.num_channels, f"case {c.id!r}")
            x = np.stack([prepare_image(im, predictor.config) for im in images])
            res = classification_uncertainty(scorer, x, method, samples, seed)
            scores += [float(s) for s in res["score"]]
            score_name = CLS_SCORE
        else:
            for c, im in zip(cases, images, strict=True):
                im.meta.setdefault("source", c.id)
                scores.append(segmentation_uncertainty(scorer, im, method, samples, seed)[2])
            score_name = SEG_SCORE
        ids += [c.id for c in cases]
    values = np.asarray(scores, dtype=np.float64)
    threshold = refer_threshold(values, fraction)  # the 1 - fraction quantile (linear interpolation)
    scored = "all folds (ensemble)" if method == "ensemble" else "out-of-fold (each case by its fold's model)"
    section = {
        "method": method,
        "score_name": score_name,
        "threshold": threshold,
        "fraction": float(fraction),
        "reason": (
            f"{1 - fraction:.0%} quantile of the {score_name} of {len(values)} validation cases scored {scored}; "
            "refer when score > threshold"
        ),
        "samples": samples,
        "seed": seed,
        "n_cases": len(values),
        "scored": scored,
        "referred_validation": float((values > threshold).mean()),
    }
    latest = read_run(run_dir)  # re-read: keep whatever else was written meanwhile
    latest["referral"] = section
    write_run(run_dir, latest)
    log.info("%s: referral threshold %.4f (%s)", run_dir, threshold, section["reason"])
    return section
