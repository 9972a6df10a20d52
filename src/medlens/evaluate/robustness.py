"""Robustness of a trained model: metrics under input perturbations and adversarial attacks, as curves.

Two kinds of stress, each at stated strengths (strength 0 is always the clean point):

* **Input space** (:mod:`medlens.evaluate.perturb`): Gaussian noise, blur in mm, contrast (gamma) and a bias
  field, applied to the image as read; the predictor then runs its whole pipeline (preprocessing, fold
  ensemble, post-processing, inversion) on the perturbed image.
* **Adversarial** (:mod:`medlens.evaluate.adversarial`): FGSM and PGD (L-inf, random start, 10 steps of
  ``2.5 * epsilon / steps``) in the *preprocessed* space, through the fold ensemble (logits averaged), models
  in eval mode and fp32, maximising the task's loss against the truth. ``epsilon`` is in **z-score units of
  the normalised network input**: with ``zscore`` or ``ct`` normalisation (nnU-Net's) the input already is
  z-scored, so 0.1 is a tenth of the intensity std; with ``rescale`` or ``none`` the budget is multiplied per
  image and channel by the std of the normalised input, so the unit is the same.

Segmentation attacks run on the preprocessed case: whole when it fits in the plan's patch (padded to it),
otherwise on one crop of the patch size centred on the centroid of the reference foreground (the volume's
centre when it has none), so the attack's cost is bounded. Dice is then measured on that grid (argmax of the
ensemble's softmax, no post-processing, padding excluded), so an adversarial curve's clean point can differ
slightly from the input-space curves' clean point, which is scored on the input grid.

Metrics (``metric_name`` in the result): segmentation: mean Dice over the foreground classes per case (a class
absent from both prediction and reference scores 1, as :mod:`medlens.evaluate.segmentation`), CI by case
bootstrap (:func:`medlens.evaluate.bootstrap.bootstrap_ci`); classification: AUC of the positive class for
binary tasks, macro AUC for multilabel, accuracy for multiclass and ordinal (the run's argmax / median-grade
rule), with the case-bootstrap CI of :func:`medlens.evaluate.classification.classification_metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medlens.errors import InputError, unknown_name
from medlens.evaluate.adversarial import ADVERSARIAL, PGD_STEPS, TASKS, adversarial, as_ensemble
from medlens.evaluate.perturb import (
    PERTURBATIONS,
    Perturbation,
    bias_field,
    check_strength,
    foreground_std,
    perturb,
    perturbation_kind,
)
from medlens.io.image import Image

__all__ = [
    "ADVERSARIAL",
    "KINDS",
    "PERTURBATIONS",
    "PGD_STEPS",
    "Perturbation",
    "adversarial",
    "bias_field",
    "foreground_std",
    "kind_spec",
    "perturb",
    "perturbation_kind",
    "robustness_curves",
]

log = logging.getLogger(__name__)

#: Every kind :func:`robustness_curves` reports, in display order.
KINDS: tuple[str, ...] = (*PERTURBATIONS, *ADVERSARIAL)
#: Normalisation schemes whose output already is in z-score units (the epsilon unit).
_Z_SCHEMES = ("zscore", "ct")


# ---- the curves ---------------------------------------------------------------------------------------------------
def robustness_curves(
    predictor: Any,
    images: Sequence[Image],
    references: Any,
    *,
    task: str,
    strengths: Mapping[str, Sequence[float]] | None = None,
    seed: int = 0,
    max_cases: int | None = None,
    kinds: Sequence[str] | None = None,
    steps: int = PGD_STEPS,
    n_resamples: int = 1000,
) -> dict[str, dict[str, Any]]:
    """The model's metric as a function of each perturbation's strength, with bootstrap CIs over cases.

    Args:
        predictor: a segmentation :class:`~medlens.serve.predictor.Predictor` or a
            :class:`~medlens.serve.classify.ClassificationPredictor` (torch backend for the attacks).
        images: the test images as read.
        references: segmentation: the reference label-map images, one per image; classification: class indices
            ``(N,)`` (0/1 labels ``(N, K)`` for multilabel), indexing ``predictor.class_names``.
        task: ``segmentation`` or ``classification``.
        strengths: per kind, the strengths to use instead of the defaults (:data:`PERTURBATIONS`,
            :data:`ADVERSARIAL`); 0 is added when missing, and the ladder is sorted.
        seed: seeds the noise, the bias fields and PGD's random start (one realisation per case, shared by
            all strengths, so a curve compares like with like) and the bootstrap.
        max_cases: use only the first ``max_cases`` cases (a quick look).
        kinds: the kinds to compute (default :data:`KINDS`: the four input perturbations, ``fgsm``, ``pgd``).
        steps: PGD iterations.
        n_resamples: bootstrap resamples per point.

    Returns:
        ``{kind: {"label", "unit", "description", "strengths", "metric_name", "metric", "ci", "n_cases"}}``:
        ``metric[i]`` is the estimate at ``strengths[i]`` (None where undefined) and ``ci[i]`` its 95 %
        interval ``[lo, hi]``.

    Raises:
        InputError: an unknown task or kind (with the closest name), a bad strength, mismatched references.
    """
    if task not in TASKS:
        raise unknown_name("task", str(task), TASKS)
    chosen = list(KINDS) if kinds is None else [str(k) for k in kinds]
    for k in chosen:
        if k not in KINDS:
            raise unknown_name("robustness kind", k, KINDS)
    ladders = _ladders(strengths, chosen)
    n = len(images)
    if max_cases is not None:
        if isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 1:
            raise InputError(f"max_cases={max_cases!r} must be a positive integer")
        n = min(n, max_cases)
    if n == 0:
        raise InputError("no images to evaluate robustness on")
    images = list(images)[:n]
    if any(k in ADVERSARIAL for k in ladders):  # fail before the long part, not after it
        as_ensemble(list(getattr(predictor, "models", None) or []))
    if task == "segmentation":
        return _segmentation(predictor, images, references, ladders, seed, steps, n_resamples)
    return _classification(predictor, images, references, ladders, seed, steps, n_resamples)


def _ladders(strengths: Mapping[str, Sequence[float]] | None, kinds: list[str]) -> dict[str, list[float]]:
    given = dict(strengths or {})
    for k in given:
        if k not in KINDS:
            raise unknown_name("robustness kind in strengths", str(k), KINDS)
    out: dict[str, list[float]] = {}
    for k in kinds:
        spec = PERTURBATIONS.get(k) or ADVERSARIAL[k]
        raw = given.get(k, spec.strengths)
        if isinstance(raw, str) or not isinstance(raw, Sequence | np.ndarray):
            raise InputError(f"strengths[{k!r}] = {raw!r} must be a list of numbers in {spec.unit}")
        values = {check_strength(k, s, signed=spec.signed) for s in raw} | {0.0}
        out[k] = sorted(values)
    return out


def kind_spec(kind: str) -> Perturbation:
    """The :class:`Perturbation` record (label, unit, default ladder) of any kind in :data:`KINDS`."""
    if kind in ADVERSARIAL:
        return ADVERSARIAL[kind]
    if kind not in PERTURBATIONS:
        raise unknown_name("robustness kind", str(kind), KINDS)
    return perturbation_kind(kind)


def _curve(
    kind: str, ladder: list[float], metric_name: str, points: list[tuple[Any, Any]], n: int
) -> dict[str, Any]:
    spec = kind_spec(kind)
    return {
        "label": spec.label,
        "unit": spec.unit,
        "description": spec.description,
        "strengths": [float(s) for s in ladder],
        "metric_name": metric_name,
        "metric": [_num(est) for est, _ in points],
        "ci": [[_num(lo), _num(hi)] for _, (lo, hi) in points],
        "n_cases": n,
    }


def _num(value: Any) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _case_seed(seed: int, i: int) -> int:
    """A seed per case: independent noise across cases, the same realisation at every strength."""
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0])


# ---- segmentation -------------------------------------------------------------------------------------------------
def _segmentation(
    predictor: Any,
    images: list[Image],
    references: Any,
    ladders: dict[str, list[float]],
    seed: int,
    steps: int,
    n_resamples: int,
) -> dict[str, dict[str, Any]]:
    from medlens.evaluate.bootstrap import bootstrap_ci

    if not hasattr(predictor, "labels") or not hasattr(predictor, "predict"):
        raise InputError(
            f"task 'segmentation' needs a segmentation predictor, got {type(predictor).__name__}"
        )
    refs = _segmentation_references(images, references)
    values = sorted(int(v) for v in predictor.labels.values() if int(v) != 0)
    seeds = [_case_seed(seed, i) for i in range(len(images))]
    name = "Dice (mean over foreground classes)"

    def point(per_case: list[float]) -> tuple[Any, Any]:
        ci = bootstrap_ci(per_case, np.nanmean, n_resamples=n_resamples, seed=seed)
        return ci.estimate, (ci.low, ci.high)

    out: dict[str, dict[str, Any]] = {}
    clean: list[float] | None = None
    for kind, ladder in ladders.items():
        if kind in ADVERSARIAL:
            continue
        points = []
        for s in ladder:
            if s == 0.0 and clean is not None:
                per_case = clean
            else:
                per_case = [
                    _dice(
                        predictor.predict(perturb(im, kind, s, seed=sd)).label.array[0], ref.array[0], values
                    )
                    for im, ref, sd in zip(images, refs, seeds, strict=True)
                ]
                clean = per_case if s == 0.0 else clean
            points.append(point(per_case))
            log.info("robustness %s %g: Dice %.3f", kind, s, points[-1][0])
        out[kind] = _curve(kind, ladder, name, points, len(images))
    attacks = [k for k in ladders if k in ADVERSARIAL]
    if attacks:
        inputs = [_attack_inputs(predictor, im, ref) for im, ref in zip(images, refs, strict=True)]
        k = len(predictor.labels)
        for kind in attacks:
            points = []
            for eps in ladders[kind]:
                per_case = []
                for (x, y, scale), sd in zip(inputs, seeds, strict=True):
                    xa = x if eps == 0.0 else adversarial(
                        predictor.models, x, y, kind=kind, epsilon=eps * scale, steps=steps,
                        task="segmentation", mask=(y != -100)[:, None], seed=sd,
                    )  # fmt: skip
                    per_case.append(_patch_dice(predictor.models, xa, y, k))
                points.append(point(per_case))
                log.info("robustness %s %g: Dice %.3f", kind, eps, points[-1][0])
            out[kind] = _curve(kind, ladders[kind], name, points, len(images))
    return {kind: out[kind] for kind in ladders}


def _segmentation_references(images: list[Image], references: Any) -> list[Image]:
    refs = list(references)
    if len(refs) < len(images):
        raise InputError(f"{len(images)} images but {len(refs)} reference label maps; give one per image")
    for n, (im, ref) in enumerate(zip(images, refs, strict=False)):
        if not isinstance(ref, Image):
            raise InputError(
                f"reference {n} is a {type(ref).__name__}; give the reference label maps as Images"
            )
        if ref.spatial_shape != im.spatial_shape:
            src = im.meta.get("source", f"image {n}")
            raise InputError(
                f"{src}: reference label map has shape {ref.spatial_shape}, the image {im.spatial_shape}; "
                "they must share one grid"
            )
    return refs[: len(images)]


def _dice(pred: np.ndarray, truth: np.ndarray, values: Sequence[int]) -> float:
    """Mean Dice over the foreground values; a value absent from both maps scores 1."""
    scores = []
    for v in values:
        p, t = pred == v, truth == v
        denom = int(p.sum()) + int(t.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return float(np.mean(scores))


def _attack_inputs(predictor: Any, image: Image, reference: Image) -> tuple[Any, Any, Any]:
    """The preprocessed case as a batch the network takes: ``x (B, C, *patch)``, ``y (B, *patch)`` (-100 on
    padding) and the epsilon scale ``(1, C, 1, ...)`` (module docstring)."""
    import torch

    from medlens.plan.preprocess import preprocess_case

    config = predictor.config
    data, seg, info = preprocess_case(image, reference, config, case_id=str(image.meta.get("source", "case")))
    assert seg is not None  # a reference was given
    x, y = torch.from_numpy(data)[None], torch.from_numpy(seg.astype(np.int64))
    if int(config["spatial_dims"]) == 2 and data.ndim == 4:  # a 2D model on a volume: slices as the batch
        axis = int(config.get("sampling", {}).get("slice_axis", 2))
        x, y = torch.movedim(x[0], axis + 1, 0), torch.movedim(y[0], axis, 0)
    x, y = _fit_patch(x, y, [int(p) for p in config["patch_size"]])
    valid = y != -100
    scale = torch.ones((1, x.shape[1], *[1] * (x.ndim - 2)))
    for c, rec in enumerate(info.normalization):
        if rec.get("scheme") not in _Z_SCHEMES:
            scale[0, c] = max(float(x[:, c][valid].std()), 1e-8)
    return x.to(predictor.device), y.to(predictor.device), scale.to(predictor.device)


def _fit_patch(x: Any, y: Any, patch: list[int]) -> tuple[Any, Any]:
    """Crop (centred on the foreground centroid) and pad (data 0, label -100) ``x``/``y`` to ``patch``."""
    import torch

    fg = torch.nonzero(y > 0)
    for axis, p in enumerate(patch):
        size = x.shape[axis + 2]
        if size > p:
            centre = float(fg[:, axis + 1].float().mean()) if len(fg) else (size - 1) / 2.0
            start = int(min(max(round(centre - p / 2.0), 0), size - p))
            x, y = x.narrow(axis + 2, start, p), y.narrow(axis + 1, start, p)
        elif size < p:
            pad_x = [0, 0] * (x.ndim - 2 - axis - 1) + [0, p - size]
            x = torch.nn.functional.pad(x, pad_x, value=0.0)
            y = torch.nn.functional.pad(y, pad_x, value=-100)
    return x.contiguous(), y.contiguous()


def _patch_dice(models: Sequence[Any], x: Any, y: Any, num_classes: int) -> float:
    """Mean foreground Dice of the fold ensemble (softmax averaged, as the predictor does) on a batch."""
    import torch

    with torch.no_grad():
        probs = sum(torch.softmax(m(x).float(), dim=1) for m in models)
    pred = torch.as_tensor(probs).argmax(1)
    valid = y != -100
    return _dice(pred[valid].cpu().numpy(), y[valid].cpu().numpy(), range(1, num_classes))


# ---- classification -----------------------------------------------------------------------------------------------
def _classification(
    predictor: Any,
    images: list[Image],
    references: Any,
    ladders: dict[str, list[float]],
    seed: int,
    steps: int,
    n_resamples: int,
) -> dict[str, dict[str, Any]]:
    from medlens.evaluate.classification import classification_metrics
    from medlens.tasks.classify_data import check_image, prepare_image

    if not hasattr(predictor, "ctype") or not hasattr(predictor, "probabilities"):
        raise InputError(
            f"task 'classification' needs a classification predictor, got {type(predictor).__name__}"
        )
    config, ctype = predictor.config, str(predictor.ctype)
    y = np.asarray(references)
    if len(y) < len(images):
        raise InputError(f"{len(images)} images but {len(y)} reference labels; give one per image")
    y = y[: len(images)]
    for n, im in enumerate(images):
        check_image(im, config, predictor.num_channels, str(im.meta.get("source", f"image {n}")))
    seeds = [_case_seed(seed, i) for i in range(len(images))]
    key = "auc" if ctype in ("binary", "multilabel") else "accuracy"
    name = {"binary": "AUC", "multilabel": "macro AUC"}.get(ctype, "accuracy")

    def point(probs: np.ndarray) -> tuple[Any, Any]:
        m = classification_metrics(y, probs, classification_type=ctype, n_resamples=n_resamples, seed=seed)
        d = m["overall"][key]
        return d["estimate"], (d["low"], d["high"])

    x0 = np.stack([prepare_image(im, config) for im in images])
    clean = point(predictor.probabilities(x0))
    out: dict[str, dict[str, Any]] = {}
    for kind, ladder in ladders.items():
        points = []
        for s in ladder:
            if s == 0.0:
                points.append(clean)
                continue
            if kind in ADVERSARIAL:
                x = _attack_batches(predictor, x0, y, kind, s, steps, seed)
            else:
                x = np.stack(
                    [
                        prepare_image(perturb(im, kind, s, seed=sd), config)
                        for im, sd in zip(images, seeds, strict=True)
                    ]
                )
            points.append(point(predictor.probabilities(x)))
            log.info("robustness %s %g: %s %.3f", kind, s, name, points[-1][0])
        out[kind] = _curve(kind, ladder, name, points, len(images))
    return out


def _attack_batches(
    predictor: Any, x0: np.ndarray, y: np.ndarray, kind: str, eps: float, steps: int, seed: int
) -> np.ndarray:
    """Attack ``x0`` in batches; epsilon scaled per image and channel to z-score units (module docstring)."""
    import torch

    schemes = predictor.config["preprocessing"].get("normalization", {})
    scale = np.ones((len(x0), x0.shape[1]) + (1,) * (x0.ndim - 2), dtype=np.float32)
    for c in range(x0.shape[1]):
        if dict(schemes.get(str(c), {"scheme": "zscore"})).get("scheme") not in _Z_SCHEMES:
            scale[:, c] = np.maximum(x0[:, c].reshape(len(x0), -1).std(axis=1), 1e-8).reshape(
                -1, *scale.shape[2:]
            )
    batch = max(1, 2 * int(predictor.config.get("batch_size", 16)))
    parts = []
    for b, start in enumerate(range(0, len(x0), batch)):
        sl = slice(start, start + batch)
        xa = adversarial(
            predictor.models, torch.from_numpy(np.ascontiguousarray(x0[sl])), torch.from_numpy(y[sl]),
            kind=kind, epsilon=torch.from_numpy(eps * scale[sl]), steps=steps, task="classification",
            ctype=predictor.ctype, loss=predictor.loss, seed=_case_seed(seed, b),
        )  # fmt: skip
        parts.append(xa.cpu().numpy())
    return np.concatenate(parts)
