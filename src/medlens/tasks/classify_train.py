"""Training one classification fold, and the decisions taken from every fold's validation predictions.

``train_fold`` preprocesses the dataset's training images once (cached, shared by all folds), builds the
planned network, trains it with the engine (best validation AUC kept) and returns each validation case's
class probabilities. ``decide`` pools those out-of-fold predictions and chooses the decision threshold of a
binary task (or of each label of a multi-label task): Youden's J, or the highest threshold reaching
``options["sensitivity"]`` (``medlens train --sensitivity 0.95``); it also summarises the validation
metrics with bootstrap CIs. Both land in ``run.json`` (``decision``, ``validation_metrics``), where the
predictor reads the threshold.

The validation evidence in ``run.json`` is ``{case_id: {"target": ..., "scores": [...]}}`` plus one reserved
entry, ``"__classification__"``, naming the classification type and classes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens.data.dataset import Dataset
from medlens.data.splits import Fold
from medlens.tasks.run import FoldOutcome, TrainedFold

if TYPE_CHECKING:
    from medlens.tasks.transfer import InitSource

log = logging.getLogger(__name__)

META_KEY = "__classification__"


@dataclass
class FitResult:
    """A trained classifier and its probabilities on every validation image."""

    model: Any
    trained: TrainedFold
    val_scores: np.ndarray
    history: dict[str, Any]


def fit(
    images: np.ndarray,
    y: np.ndarray,
    train_rows: Sequence[int] | np.ndarray,
    val_rows: Sequence[int] | np.ndarray,
    config: Mapping[str, Any],
    *,
    ctype: str,
    class_names: Sequence[str],
    run_dir: Path,
    fold: int = 0,
    resume: bool = False,
    progress: bool = True,
    device: str = "auto",
    init: InitSource | str | Path | None = None,
    finetune: str | None = None,
    backbone_lr: float = 0.1,
) -> FitResult:
    """Train the planned network on ``images[train_rows]``, selecting by AUC on ``images[val_rows]``.

    Shared by :func:`train_fold` (a dataset) and the MedMNIST benchmark (arrays straight from an ``.npz``).
    ``init`` starts from a safetensors file: the tensors that fit are loaded, the rest (e.g. a head trained
    on other classes) keep their fresh initialisation, and a warning names them. Which parameters train,
    and at which learning rate, is the plan's ``training.param_groups``, unless ``finetune`` (with ``init``)
    replaces it: ``"full"`` or ``"head"`` with ``backbone_lr`` (see :mod:`medlens.tasks.transfer`).
    """
    from medlens.engine import Trainer, configure_threads, resolve_precision, seed_everything
    from medlens.models import create_model
    from medlens.tasks.classify import ClassificationTask, check_loss, num_outputs, predict_scores
    from medlens.tasks.inference import autocast_for

    configure_threads(config["training"].get("threads"))
    loss = check_loss(ctype, config.get("loss", {}))
    seed_everything(int(config["training"].get("seed", 0)) + fold)
    model = create_model(
        dict(config["network"]),
        spatial_dims=int(config["spatial_dims"]),
        in_channels=int(images.shape[1]),
        out_channels=num_outputs(ctype, len(class_names), loss),
    )
    if init is not None:
        from medlens.tasks.transfer import finetune_groups, freeze_norm_statistics, initialise

        initialise(model, init)
        if finetune is not None:
            groups = finetune_groups(model, finetune, backbone_lr)
            config = {**config, "training": {**config["training"], "param_groups": groups}}
        if (finetune or config["training"].get("param_groups", {}).get("trainable")) == "head":
            freeze_norm_statistics(model, tuple(getattr(model, "medlens_head", ())))
    task = ClassificationTask(images, y, train_rows, val_rows, config, ctype, len(class_names))
    log.info("fold %d: %d training and %d validation images", fold, len(train_rows), len(val_rows))
    result = Trainer(model, task, dict(config["training"]), run_dir, progress=progress, device=device).fit(
        resume=resume
    )
    best = result.best_score
    if task.score_key != "auc":  # report the validation AUC of the weights kept, not the selection score
        kept = [h for h in result.history.get("val", []) if h.get("iteration") == result.best_iteration]
        best = float(kept[-1]["auc"]) if kept and kept[-1].get("auc") is not None else None
    model.eval()
    dev = next(model.parameters()).device
    precision = resolve_precision(str(config["training"].get("precision", "auto")), dev)
    scores = predict_scores(
        model, images, val_rows, ctype, loss, 2 * int(config["batch_size"]),
        autocast=lambda: autocast_for(dev, precision),
    )  # fmt: skip
    trained = TrainedFold(
        fold=fold,
        run_dir=run_dir,
        best_score=best,
        iterations=result.iterations,
        seconds=result.seconds,
    )
    return FitResult(model, trained, scores, result.history)


def train_fold(
    dataset: Dataset,
    config: Mapping[str, Any],
    fold: Fold,
    run_dir: Path,
    *,
    cache_dir: Path,
    resume: bool = False,
    progress: bool = True,
    device: str = "auto",
    options: dict[str, Any] | None = None,
) -> FoldOutcome:
    """Preprocess (cached), train one fold, and return its validation cases' probabilities.

    Args:
        dataset: a classification dataset.
        config: the resolved plan configuration.
        fold: which cases train and which validate.
        run_dir: the fold's directory (the engine's checkpoints).
        cache_dir: where the preprocessed images are cached.
        resume: continue from the fold's last checkpoint.
        progress: rich progress bars.
        device: "auto", "cpu" or "cuda".
        options: ``sensitivity`` (target sensitivity for the threshold; checked here, used by :func:`decide`);
            ``init`` (a run, fold folder or safetensors file to start from, see :func:`fit`; recorded in
            run.json with its SHA-256), ``finetune`` (``full``/``head``) and ``backbone_lr`` (default 0.1).

    Raises:
        DatasetError: labels that do not fit the dataset's classification type or classes (case named).
        PlanError: a plan whose loss does not fit the classification type.
    """
    from medlens.tasks.classify import check_loss, targets
    from medlens.tasks.classify_data import dataset_images
    from medlens.tasks.threshold import check_target_sensitivity

    opts = dict(options or {})
    init = None
    if opts.get("init") is not None:
        from medlens.tasks.transfer import check_policy, resolve_init

        check_policy(opts.get("finetune", "full"), opts.get("backbone_lr", 0.1))
        init = resolve_init(opts["init"])
    if opts.get("sensitivity") is not None:
        check_target_sensitivity(opts["sensitivity"])
    ctype = dataset.classification_type or "multiclass"
    if opts.get("sensitivity") is not None and ctype not in ("binary", "multilabel"):
        log.warning("--sensitivity sets the threshold of binary and multi-label tasks; ignored for %s", ctype)
    check_loss(ctype, config.get("loss", {}), where=f"plan for {dataset.name}")
    names = dataset.class_names
    cases = sorted((c for c in dataset.training if c.split != "test"), key=lambda c: c.id)
    y = targets(dataset, cases)  # every case's label checked before any image is read
    images = dataset_images(dataset, cases, config, Path(cache_dir))
    row = {c.id: i for i, c in enumerate(cases)}
    train_rows = [row[c] for c in fold.train]
    val_rows = [row[c] for c in fold.val]
    res = fit(
        images, y, train_rows, val_rows, config, ctype=ctype, class_names=names, run_dir=run_dir,
        fold=fold.index, resume=resume, progress=progress, device=device, init=init,
        finetune=opts.get("finetune", "full"), backbone_lr=opts.get("backbone_lr", 0.1),
    )  # fmt: skip
    evidence: dict[str, Any] = {META_KEY: {"type": ctype, "class_names": list(names)}}
    for cid, r, s in zip(fold.val, val_rows, res.val_scores, strict=True):
        target = y[r].astype(int).tolist() if ctype == "multilabel" else int(y[r])
        evidence[cid] = {"target": target, "scores": [round(float(v), 5) for v in s]}
    run_info: dict[str, Any] = {
        "classification": {"type": ctype, "class_names": list(names), "loss": config["loss"]["name"]}
    }
    if init is not None:
        policy = {"finetune": opts.get("finetune", "full"), "backbone_lr": opts.get("backbone_lr", 0.1)}
        run_info["init"] = {**init.to_json(), **policy}
    return FoldOutcome(trained=res.trained, validation=evidence, run_info=run_info)


def decide(validation: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The decision rule and validation metrics from every trained fold's validation cases (run.json keys)."""
    meta = validation.get(META_KEY)
    cases = {k: v for k, v in validation.items() if k != META_KEY}
    if meta is None or not cases:
        return {}
    ctype, names = str(meta["type"]), list(meta["class_names"])
    y = np.asarray([v["target"] for v in cases.values()])
    s = np.asarray([v["scores"] for v in cases.values()], dtype=np.float64)
    decision = decide_threshold(y, s, ctype, names, options.get("sensitivity"))
    from medlens.evaluate.classification import classification_metrics

    metrics = classification_metrics(
        y,
        s,
        classification_type=ctype,
        class_names=names,
        threshold=decision.get("threshold"),
        n_resamples=1000,
    )
    return {"decision": decision, "validation_metrics": metrics}


def decide_threshold(
    y: np.ndarray, s: np.ndarray, ctype: str, names: Sequence[str], sensitivity: float | None
) -> dict[str, Any]:
    """The ``decision`` section of run.json: the rule and, for binary/multilabel tasks, the threshold(s)."""
    from medlens.tasks.threshold import choose_threshold, choose_thresholds

    if ctype in ("multiclass", "ordinal"):
        if ctype == "ordinal":
            reason = "decision: the median grade of the predicted distribution (#{k: P(grade > k) > 0.5})"
            return {"type": ctype, "rule": "median grade", "reasons": [reason]}
        return {"type": ctype, "rule": "argmax", "reasons": ["decision: the most probable class (argmax)"]}
    rule = "youden" if sensitivity is None else "sensitivity"
    if ctype == "binary":
        choice = choose_threshold(y, s[:, -1], rule=rule, target_sensitivity=sensitivity, name=names[-1])
        return {
            "type": ctype, "rule": choice.rule, "target_sensitivity": sensitivity, "threshold": choice.threshold,
            "positive_class": names[-1], "validation": choice.to_dict(), "reasons": [choice.reason],
        }  # fmt: skip
    choices = choose_thresholds(y, s, rule=rule, target_sensitivity=sensitivity, names=names)
    return {
        "type": ctype, "rule": rule, "target_sensitivity": sensitivity,
        "threshold": [c.threshold for c in choices],
        "validation": {n: c.to_dict() for n, c in zip(names, choices, strict=True)},
        "reasons": [c.reason for c in choices],
    }  # fmt: skip
