"""Transfer learning: start a classifier from another run's weights (``medlens train --init``).

An init source is a medlens run directory (its pretrained encoder, or the weights of its first trained fold),
one fold's directory (``RUN/fold_2``), or a ``.safetensors`` file. The tensors whose names and shapes fit the
new network are loaded; the rest (typically the output head of a model trained on other classes, or absent
from a self-supervised encoder) keep their fresh initialisation, and one log line names them.

Fine-tuning policies (``--finetune``):

* ``full``: every parameter trains; the backbone (everything outside the model's declared head,
  ``model.medlens_head``) at ``backbone_lr`` times the base learning rate (discriminative learning rates;
  0.1 by default, 1.0 switches them off);
* ``head``: the backbone is frozen and only the head trains (a linear probe for a linear head).

The policy becomes the training config's ``param_groups`` section, so the engine applies it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from medlens.errors import InputError, RunError

log = logging.getLogger(__name__)

POLICIES = ("full", "head")
#: run.json key of a run whose initialisation weights are not a fold's (a pretraining run's encoder).
INIT_WEIGHTS_KEY = "init_weights"


@dataclass(frozen=True)
class InitSource:
    """Resolved weights to start from.

    Attributes:
        path: the safetensors file.
        sha256: its SHA-256 (recorded in run.json, so the start point is traceable).
        source: what the user gave (a run, a fold directory or a file).
    """

    path: Path
    sha256: str
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "weights": str(self.path.resolve()), "sha256": self.sha256}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_init(source: str | Path) -> InitSource:
    """The weights file behind ``--init``: a run directory, a fold directory or a safetensors file.

    A run directory gives its ``init_weights`` (a pretraining run's encoder) or else its first trained fold's
    ``model.safetensors``; a directory holding ``model.safetensors`` (a fold) gives that file.

    Raises:
        InputError: the path does not exist or is neither a run, a fold nor a safetensors file.
        RunError: a run without trained weights.
    """
    from medlens.tasks.run import RUN_FILE, fold_dirs, read_run

    p = Path(source)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise InputError(
                f"--init {p}: not a .safetensors file; give a medlens run, a fold folder or weights"
            )
        weights = p
    elif (p / RUN_FILE).is_file():
        info = read_run(p)
        if info.get(INIT_WEIGHTS_KEY):
            weights = p / str(info[INIT_WEIGHTS_KEY])
            if not weights.is_file():
                raise RunError(f"{weights}: missing; the pretraining run did not finish (run it again)")
        else:
            weights = fold_dirs(p, info)[0] / "model.safetensors"
    elif (p / "model.safetensors").is_file():
        weights = p / "model.safetensors"
    elif p.exists():
        raise InputError(
            f"--init {p}: neither a medlens run (run.json), a fold folder (model.safetensors) nor a "
            ".safetensors file"
        )
    else:
        raise InputError(f"--init {p}: no such file or folder; give a medlens run or a .safetensors file")
    return InitSource(path=weights, sha256=_sha256(weights), source=str(source))


def check_policy(policy: str, backbone_lr: float) -> None:
    """Validate ``--finetune`` and ``--backbone-lr``."""
    if policy not in POLICIES:
        raise InputError(f"--finetune {policy!r}: use one of {', '.join(POLICIES)}")
    if isinstance(backbone_lr, bool) or not isinstance(backbone_lr, int | float) or not 0 < backbone_lr <= 10:
        raise InputError(
            f"--backbone-lr {backbone_lr!r}: give a factor in (0, 10], e.g. 0.1 (1 = same as the head)"
        )


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def backbone_prefixes(model: nn.Module, head: tuple[str, ...]) -> list[str]:
    """The largest modules (dotted names) holding parameters but none of the head's."""
    out: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            params = [f"{full}.{n}" for n, _ in child.named_parameters()]
            if not params or any(_under(full, h) for h in head):
                continue
            if not any(_under(p, h) for p in params for h in head):
                out.append(full)
            else:
                walk(child, full + ".")

    walk(model, "")
    return out


def finetune_groups(model: nn.Module, policy: str, backbone_lr: float) -> dict[str, Any]:
    """The training config's ``param_groups`` section for a fine-tuning ``policy`` (see the module docstring).

    Raises:
        InputError: a bad policy or factor, or a model without a declared head.
    """
    check_policy(policy, backbone_lr)
    head = tuple(getattr(model, "medlens_head", ()))
    if not head:
        raise InputError(f"--finetune {policy}: this network declares no head; use a registry classifier")
    if policy == "head":
        return {"trainable": "head", "lr_multipliers": {}}
    if float(backbone_lr) == 1.0:
        return {"trainable": "all", "lr_multipliers": {}}
    return {
        "trainable": "all",
        "lr_multipliers": dict.fromkeys(backbone_prefixes(model, head), float(backbone_lr)),
    }


def freeze_norm_statistics(model: nn.Module, head: tuple[str, ...]) -> int:
    """Keep the backbone's batch-norm layers exactly as loaded while the backbone is frozen.

    A frozen backbone must stay the backbone that was loaded: its normalisation layers normalise with their
    stored running statistics (evaluation mode, pinned: the engine's ``model.train()`` does not switch them
    back) and never overwrite them. Returns the number of layers pinned.
    """
    import types

    def stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
        return nn.Module.train(self, False)

    n = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(_under(name, h) for h in head):
            module.momentum = 0.0
            module.train = types.MethodType(stay_in_eval, module)  # type: ignore[method-assign]
            module.train()
            n += 1
    return n


def initialise(model: nn.Module, init: InitSource | str | Path) -> Any:
    """Load the fitting tensors of ``init`` into ``model``; one line names the re-initialised ones.

    Returns:
        The engine's :class:`~medlens.engine.LoadReport`.

    Raises:
        InputError: not one tensor fits (weights of another network spec).
    """
    from medlens.engine import load_weights

    src = init if isinstance(init, InitSource) else resolve_init(init)
    engine_log = logging.getLogger("medlens.engine.checkpoint")
    level = engine_log.level
    engine_log.setLevel(logging.ERROR)  # our one line below replaces the engine's "partially loaded" warning
    try:
        report = load_weights(model, src.path, strict=False)
    finally:
        engine_log.setLevel(level)
    if not report.loaded:
        raise InputError(
            f"--init {src.source}: none of its tensors fits this network ({report.summary(3)}); it was trained "
            "with another network spec: plan with the same network, or pretrain with this plan (--plan)"
        )
    fresh = sorted({*report.missing, *report.mismatched})
    if fresh:
        shapes = [f"{k} {v[0]}->{v[1]}" for k, v in report.mismatched.items()]
        log.warning(
            "--init %s: loaded %d tensors; re-initialised %d: %s%s",
            src.source, len(report.loaded), len(fresh), ", ".join(fresh[:8]) + (" ..." if len(fresh) > 8 else ""),
            f" (shapes differ: {', '.join(shapes[:4])})" if shapes else "",
        )  # fmt: skip
    else:
        log.info("--init %s: all %d tensors loaded", src.source, len(report.loaded))
    return report
