"""Self-supervised pretraining of a classifier's backbone on unlabeled images (``medlens pretrain``).

Method: **SimCLR** (Chen et al., 2020). Each training image is augmented twice, independently and strongly
(:data:`SIMCLR_AUGMENTATION`: flips, rotation, zoom, gamma, brightness, contrast, noise, with the batched
transforms of :mod:`medlens.data.augment`); the backbone of the planned classifier encodes both views, a
two-layer projection head maps the features to a 128-d space, and the NT-Xent loss (:func:`nt_xent`,
temperature 0.5) pulls the two views of an image together and pushes the other images of
the batch away. Contrastive learning was chosen over masked-image modelling because it trains exactly the
network the classifier uses (any registry classifier, 2D or 3D, convolutional), with no decoder to discard.

Sizing: the classification planner's plan for the dataset (``make_plan(..., task="classification")`` within
the budget, or a given ``plan.json``): the same preprocessing, input size, network and batch as the
classifier, so the encoder's tensors have exactly the names and shapes of the classifier's backbone. A
SimCLR step encodes two views, so it runs half the plan's iterations for the same budget.

Selection: the engine keeps the weights with the lowest NT-Xent loss on a held-out tenth of the images
(fixed views); when the images carry binary/multiclass labels, a k-nearest-neighbour accuracy of the
features is logged too (labels are never used for training).

The run directory::

    RUN/
      run.json               task "pretrain", method, plan configuration, init_weights, validation
      plan.json              the classification plan used (train with it, or one with the same network)
      encoder.safetensors    the backbone (classifier keys, no head): what ``medlens train --init RUN`` loads
      simclr/                the engine's run directory (encoder + projection head, history, checkpoints)
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medlens.errors import DatasetError, InputError

log = logging.getLogger(__name__)

#: Strong augmentation for two views of an image (the plan's own augmentation is milder, made for labels).
SIMCLR_AUGMENTATION: dict[str, Any] = {
    "mirror": {"p": 0.5},
    "rotation": {"p": 0.8, "degrees": 30},
    "scaling": {"p": 0.8, "range": [0.6, 1.4]},
    "gamma": {"p": 0.5, "range": [0.6, 1.6], "invert_p": 0.0},
    "brightness": {"p": 0.8, "range": [0.6, 1.4]},
    "contrast": {"p": 0.8, "range": [0.6, 1.4]},
    "noise": {"p": 0.5, "std": [0.0, 0.2]},
}
WEIGHTS_FILE = "encoder.safetensors"
ENGINE_DIR = "simclr"


# ---- model --------------------------------------------------------------------------------------------------
def strip_head(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace the classifier's declared head (``model.medlens_head``, a linear layer) by an identity.

    Returns:
        The model (now a feature extractor, its other parameter names unchanged) and the feature size.

    Raises:
        InputError: a model without a declared linear head.
    """
    head = tuple(getattr(model, "medlens_head", ()))
    if len(head) != 1:
        raise InputError("pretrain: the network declares no single head module; use a registry classifier")
    parent_name, _, leaf = head[0].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = getattr(parent, leaf)
    if not isinstance(layer, nn.Linear):
        raise InputError(f"pretrain: the head {head[0]!r} is not a linear layer; SimCLR needs its input size")
    setattr(parent, leaf, nn.Identity())
    return model, int(layer.in_features)


class SimCLRModel(nn.Module):
    """An encoder (a classifier without its head) and SimCLR's projection head.

    Args:
        encoder: maps ``(B, C, *S)`` images to ``(B, feature_dim)`` features.
        feature_dim: the encoder's output size.
        projection_dim: size of the space the loss compares in.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, projection_dim: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = max(feature_dim, projection_dim)
        self.projection = nn.Sequential(
            nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, projection_dim)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))


def build_simclr(config: Mapping[str, Any], in_channels: int, projection_dim: int = 128) -> SimCLRModel:
    """The SimCLR model around the backbone of the classifier ``config["network"]`` plans."""
    from medlens.models import create_model

    classifier = create_model(
        dict(config["network"]),
        spatial_dims=int(config["spatial_dims"]),
        in_channels=in_channels,
        out_channels=2,
    )
    encoder, dim = strip_head(classifier)
    return SimCLRModel(encoder, dim, projection_dim)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two views' projections ``(B, D)``: row i of ``z1`` and of ``z2`` are positives.

    The same value as MONAI's ``ContrastiveLoss`` (mean over the 2B anchors of the cross-entropy of the
    positive among the other 2B-1 cosine similarities / temperature), computed with a log-sum-exp so a small
    temperature cannot overflow, and without importing ``monai.losses`` (several seconds).
    """
    b = z1.shape[0]
    z = nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return nn.functional.cross_entropy(sim, target)


# ---- the engine's task --------------------------------------------------------------------------------------
class SimCLRTask:
    """A :class:`~medlens.engine.task.TrainTask`: two augmented views per image, NT-Xent loss.

    Args:
        images: ``(N, C, *size)`` preprocessed images.
        train_rows / val_rows: rows that train, and rows whose NT-Xent loss selects the weights.
        batch_size: images per batch (2x views).
        spatial_dims: 2 or 3.
        temperature: NT-Xent temperature.
        labels: optional class indices ``(N,)`` for the kNN accuracy logged at validation (never trained on).
    """

    score_key = "neg_ntxent"

    def __init__(
        self,
        images: np.ndarray,
        train_rows: Sequence[int] | np.ndarray,
        val_rows: Sequence[int] | np.ndarray,
        *,
        batch_size: int,
        spatial_dims: int,
        temperature: float = 0.5,
        labels: np.ndarray | None = None,
    ) -> None:
        from medlens.data.augment import BatchAugment

        self.images = images
        self.train_rows = np.asarray(train_rows, dtype=np.int64)
        self.val_rows = np.asarray(val_rows, dtype=np.int64)
        if len(self.train_rows) < 2:
            raise DatasetError(f"pretrain: {len(self.train_rows)} training image(s); SimCLR needs at least 2")
        # NT-Xent needs at least 2 images in a batch, and no image twice
        self.batch_size = max(2, min(int(batch_size), len(self.train_rows)))
        self.augment = BatchAugment(SIMCLR_AUGMENTATION, spatial_dims)
        if not 0 < temperature <= 10:
            raise InputError(f"temperature {temperature!r}: give a value in (0, 10], e.g. 0.5")
        self.temperature = float(temperature)
        self.labels = labels

    def _images(self, rows: np.ndarray) -> torch.Tensor:
        order = np.argsort(rows, kind="stable")
        data = np.empty((len(rows), *self.images.shape[1:]), dtype=np.float32)
        data[order] = self.images[rows[order]]
        return torch.from_numpy(data)

    def views(self, rows: np.ndarray, seed: Sequence[int]) -> dict[str, torch.Tensor]:
        """Two independently augmented views of ``images[rows]`` (a pure function of ``seed``)."""
        x = self._images(rows)
        out = {}
        for v in (1, 2):
            gen = torch.Generator().manual_seed(int(np.random.default_rng([*seed, v]).integers(2**62)))
            out[f"view{v}"] = self.augment({"image": x}, gen)["image"]
        return out

    def batch(self, seed: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of the stream for ``seed``: epoch-wise shuffles, no image twice in a batch."""
        b, n = self.batch_size, len(self.train_rows)
        per_epoch = n // b
        epoch, k = divmod(index, per_epoch)
        perm = np.random.default_rng([seed, 1_000_003, epoch]).permutation(self.train_rows)
        return self.views(perm[k * b : (k + 1) * b], (seed, index))

    def batches(self, seed: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        index = int(start)
        while True:
            yield self.batch(int(seed), index)
            index += 1

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        z1, z2 = model(batch["view1"]).float(), model(batch["view2"]).float()
        return nt_xent(z1, z2, self.temperature)

    def validate(self, model: nn.Module) -> dict[str, float]:
        """NT-Xent on the held-out images (fixed views, batches of the training size); kNN accuracy if labelled."""
        device = next(model.parameters()).device
        rows = self.val_rows
        losses, weights = [], []
        for start in range(0, len(rows) - 1, self.batch_size):
            chunk = rows[start : start + self.batch_size]
            if len(chunk) < 2:
                continue
            v = self.views(chunk, (2**31, start))  # fixed views, apart from any training seed
            z1, z2 = model(v["view1"].to(device)).float(), model(v["view2"].to(device)).float()
            losses.append(float(nt_xent(z1, z2, self.temperature)))
            weights.append(len(chunk))
        out: dict[str, float] = {}
        if losses:
            out["ntxent"] = float(np.average(losses, weights=weights))
            out["neg_ntxent"] = -out["ntxent"]
        if self.labels is not None and len(rows) and isinstance(model, SimCLRModel):
            out["knn_acc"] = self._knn(model, device)
        return out

    def _knn(self, model: SimCLRModel, device: torch.device, k: int = 10, bank: int = 2000) -> float:
        labels = self.labels if self.labels is not None else np.zeros(len(self.images), dtype=np.int64)
        ref = self.train_rows[:bank]

        def feats(rows: np.ndarray) -> torch.Tensor:
            parts = [
                model.features(self._images(rows[s : s + 64]).to(device)).float()
                for s in range(0, len(rows), 64)
            ]
            return nn.functional.normalize(torch.cat(parts), dim=1)

        sim = feats(self.val_rows) @ feats(ref).T
        idx = sim.topk(min(k, len(ref)), dim=1).indices.cpu().numpy()
        votes = labels[ref][idx]
        pred = np.array([np.bincount(v).argmax() for v in votes])
        return float((pred == labels[self.val_rows]).mean())


# ---- the command ----------------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    """What :func:`pretrain` produced."""

    run_dir: Path
    weights: Path
    iterations: int
    best_score: float | None
    seconds: float
    history: dict[str, Any]


def _labels(dataset: Any, cases: Sequence[Any]) -> np.ndarray | None:
    """Class indices for the kNN metric when every case has a binary/multiclass label, else None."""
    if dataset.classification_type not in ("binary", "multiclass", None):
        return None
    if any(c.label is None for c in cases):
        return None
    from medlens.tasks.classify import targets

    try:
        return targets(dataset, cases)
    except DatasetError:
        return None


def _rescale(training: dict[str, Any], iterations: int) -> None:
    """Fit the plan's training section to ``iterations``: the same number of validations and warm-up share."""
    planned = max(1, int(training["iterations"]))
    ratio = iterations / planned
    training.update(iterations=iterations, param_groups={"trainable": "all", "lr_multipliers": {}})
    if training.get("val_every"):
        training["val_every"] = max(1, min(iterations, round(int(training["val_every"]) * ratio)))
    schedule = dict(training.get("schedule") or {})
    if schedule.get("warmup_iterations"):
        schedule["warmup_iterations"] = min(iterations - 1, round(int(schedule["warmup_iterations"]) * ratio))
        training["schedule"] = schedule
    training["early_stopping_patience"] = None  # the contrastive loss keeps improving slowly
    if training.get("checkpoint_every"):
        training["checkpoint_every"] = max(
            1, min(iterations, round(int(training["checkpoint_every"]) * ratio))
        )


def pretrain(
    dataset_dir: str | Path,
    out: str | Path,
    *,
    budget: str | float = "5m",
    plan_path: str | Path | None = None,
    configuration: str | None = None,
    iterations: int | None = None,
    val_every: int | None = None,
    temperature: float = 0.5,
    val_fraction: float = 0.1,
    device: str = "auto",
    progress: bool = True,
    measure: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> PretrainResult:
    """SimCLR-pretrain the planned classifier's backbone on a dataset's training images (labels unused).

    Args:
        dataset_dir: a classification dataset (the images of its test split are left out).
        out: the run directory (see the module docstring).
        budget: wall time, e.g. ``"5m"``: the plan's iterations for this budget, halved (two views a step);
            training stops at the budget in any case (the engine's time limit).
        plan_path: a classification ``plan.json`` to take the network and preprocessing from (default: plan
            the dataset now); train the classifier with the same network so every backbone tensor fits.
        configuration: the plan configuration (default: the plan's default).
        iterations: optimizer steps, overriding the budget.
        val_every: validate every this many steps (default: as often, relatively, as the plan).
        temperature: NT-Xent temperature.
        val_fraction: share of the images held out to select the weights by NT-Xent.
        device: "auto", "cpu" or "cuda".
        progress: rich progress bars.
        measure: when planning, time real training steps (False: FLOP model only, fast).
        overrides: planner overrides when planning (e.g. a smaller network for tests).

    Raises:
        InputError: a non-classification dataset, a bad budget, or an existing run at ``out``.
    """
    from medlens._fs import atomic_write_json
    from medlens.data.dataset import load_dataset
    from medlens.engine import Trainer, configure_threads, save_weights, seed_everything
    from medlens.plan.budget import parse_budget
    from medlens.plan.plan import Plan
    from medlens.tasks.classify_data import dataset_images
    from medlens.tasks.run import RUN_FILE, RUN_VERSION
    from medlens.tasks.transfer import INIT_WEIGHTS_KEY

    out = Path(out)
    if (out / RUN_FILE).is_file():
        raise InputError(f"--out {out}: already holds a run; choose another folder or delete it")
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction {val_fraction!r}: give a fraction in (0, 1), e.g. 0.1")
    dataset = load_dataset(dataset_dir)
    if dataset.task != "classification":
        raise InputError(
            f"{dataset.root}: is a {dataset.task} dataset; pretrain learns a classifier's backbone (classification)"
        )
    seconds = parse_budget(budget)
    if plan_path is not None:
        plan = Plan.load(plan_path)
        if plan.task != "classification":
            raise InputError(f"{plan_path}: plans a {plan.task} model; give a classification plan")
    else:
        from medlens.data.fingerprint import compute_fingerprint
        from medlens.plan.planner import make_plan

        plan = make_plan(
            compute_fingerprint(dataset), task="classification", budget=seconds, device=device,
            measure=measure, overrides=overrides,
        )  # fmt: skip
    name = configuration or plan.default_configuration
    config = plan.configuration(name)
    training = dict(config["training"])
    if iterations is None:
        planned = float(plan.to_dict().get("planner", {}).get("budget_seconds") or seconds)
        iterations = max(1, round(int(training["iterations"]) * seconds / planned / 2))
    _rescale(training, int(iterations))
    training["time_limit_seconds"] = seconds  # the pretraining budget, not the plan's
    if val_every is not None:
        training["val_every"] = max(1, min(int(val_every), int(iterations)))

    cases = sorted((c for c in dataset.training if c.split != "test"), key=lambda c: c.id)
    if len(cases) < 4:
        raise DatasetError(f"{dataset.json_path}: {len(cases)} training images; SimCLR needs at least 4")
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    images = dataset_images(dataset, cases, config, out / "cache" / name)
    perm = np.random.default_rng(int(training.get("seed", 0))).permutation(len(cases))
    n_val = max(2, round(val_fraction * len(cases)))
    val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    configure_threads(training.get("threads"))
    seed_everything(int(training.get("seed", 0)))
    model = build_simclr(config, int(images.shape[1]))
    task = SimCLRTask(
        images, train_rows, val_rows, batch_size=int(config["batch_size"]),
        spatial_dims=int(config["spatial_dims"]), temperature=temperature, labels=_labels(dataset, cases),
    )  # fmt: skip
    log.info("SimCLR: %d images (%d held out), %d iterations", len(cases), len(val_rows), iterations)
    result = Trainer(model, task, training, out / ENGINE_DIR, progress=progress, device=device).fit()
    from medlens.engine import load_weights

    load_weights(model, out / ENGINE_DIR / "model.safetensors")  # the best (lowest validation NT-Xent)
    weights = save_weights(
        model.encoder.cpu(), out / WEIGHTS_FILE, metadata={"method": "simclr", "network": config["network"]}
    )
    info = {
        "medlens_run": RUN_VERSION,
        "task": "pretrain",
        "method": "simclr",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "configuration": name,
        "network": config["network"],
        INIT_WEIGHTS_KEY: WEIGHTS_FILE,
        "dataset": {"name": dataset.name, "root": str(dataset.root.resolve()), "images": len(cases)},
        "simclr": {"temperature": temperature, "projection_dim": 128, "augmentation": SIMCLR_AUGMENTATION},
        "iterations": result.iterations,
        "seconds": round(result.seconds, 1),
        "best_score": result.best_score,
        "validation": result.history.get("val", []),
        "folds": [],
    }
    atomic_write_json(out / RUN_FILE, info)
    return PretrainResult(
        out, Path(weights), result.iterations, result.best_score, result.seconds, result.history
    )
