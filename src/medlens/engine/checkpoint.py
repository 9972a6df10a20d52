"""Weights and checkpoints on disk: safetensors for tensors, JSON for the rest, never pickle.

A resumable checkpoint is three files in the run directory, ``last.safetensors`` (model weights),
``optimizer.safetensors`` (optimizer tensors; its hyper-parameters as JSON metadata) and
``trainer_state.json``, plus ``model.safetensors`` (the best weights) when the checkpoint is taken at a new
best. They must change together, so a checkpoint is committed like a journal:

1. all files are written into a fresh ``.checkpoint.<random>.partial/`` folder (each file fsync'd);
2. that folder is renamed to ``.checkpoint.ready/`` -- one atomic rename, the commit point;
3. the files are moved over the old ones (``trainer_state.json`` last) and the folder removed.

A crash in step 1 leaves the previous checkpoint untouched (the partial folder is deleted on the next start);
a crash in step 3 is finished ("rolled forward") by :func:`recover_checkpoint` before anything reads the run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlens._fs import atomic_path, atomic_write_json
from medlens.errors import RunError

log = logging.getLogger(__name__)

BEST_WEIGHTS = "model.safetensors"
LAST_WEIGHTS = "last.safetensors"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
# Moved into place in this order: the trainer state last, since it names the checkpoint's iteration.
_CHECKPOINT_FILES = (BEST_WEIGHTS, LAST_WEIGHTS, OPTIMIZER, TRAINER_STATE)
_READY = ".checkpoint.ready"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel/DataParallel wrapper (or ``model`` itself)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())


def _read_safetensors(
    path: str | Path, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise RunError(f"{p}: no such weights file (train a model first, or check the run directory)")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            out = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError variants
        raise RunError(
            f"{p}: not a readable safetensors file ({exc}); it is damaged or of another kind"
        ) from exc
    return out, metadata


def save_weights(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the model's ``state_dict`` (parameters and buffers) to a safetensors file, atomically.

    Args:
        model: the model (a DDP wrapper is unwrapped, so keys never start with ``module.``).
        path: destination, normally ending in ``.safetensors``.
        metadata: JSON-able values stored in the file header (values are JSON-encoded strings).
    """
    state = unwrap(model).state_dict()
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, value in state.items():
        ptr = value.data_ptr()
        if value.numel() and ptr in seen:  # tied weights: safetensors refuses shared memory, so copy
            value = value.clone()
        seen.setdefault(ptr, key)
        tensors[key] = value.detach().to("cpu").contiguous()
    meta = {"format": "pt", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    _write_safetensors(path, tensors, meta)
    return Path(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata :func:`save_weights` stored in a safetensors file."""
    _, meta = _read_safetensors(path, tensors=False)
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@dataclass
class LoadReport:
    """What :func:`load_weights` did: loaded keys, and what did not match."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 5) -> str:
        """One line naming (the first few) missing, unexpected and shape-mismatched keys."""

        def names(keys: list[str]) -> str:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({names(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({names(self.unexpected)})")
        if self.mismatched:
            shapes = [f"{k} {v[0]} in file vs {v[1]} in model" for k, v in self.mismatched.items()]
            parts.append(f"{len(shapes)} with other shapes ({names(shapes)})")
        return "; ".join(parts) or f"all {len(self.loaded)} tensors matched"


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a safetensors file written by :func:`save_weights` into ``model``.

    Args:
        model: the model to fill (a DDP wrapper is unwrapped).
        path: the safetensors file.
        strict: require the same keys and shapes; with False, load what matches (e.g. initialising from a
            model trained on other classes) and report the rest.

    Returns:
        A :class:`LoadReport`.

    Raises:
        RunError: the file is missing or unreadable, or (strict) the keys or shapes differ; the message
            lists the missing, unexpected and mismatched keys.
    """
    tensors, _ = _read_safetensors(path)
    target = unwrap(model)
    own = target.state_dict()
    report = LoadReport(
        missing=[k for k in own if k not in tensors],
        unexpected=[k for k in tensors if k not in own],
    )
    usable: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key not in own:
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            report.mismatched[key] = (list(value.shape), list(own[key].shape))
        else:
            usable[key] = value
            report.loaded.append(key)
    if strict and not report.exact:
        raise RunError(
            f"{path}: weights do not fit this model: {report.summary()}. Build the model with the network "
            "spec the weights were trained with, or load with strict=False to take only the matching tensors."
        )
    target.load_state_dict(usable, strict=False)
    if not report.exact:
        log.warning("%s: partially loaded: %s", path, report.summary())
    return report


# ---- optimizer -----------------------------------------------------------------------------------------------


def save_optimizer(
    optimizer: torch.optim.Optimizer, path: str | Path, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write an optimizer's state: tensors as ``state.<param>.<name>``, everything else as JSON metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    meta = {
        "param_groups": json.dumps(sd["param_groups"]),
        "scalar_state": json.dumps(scalars),
        **{k: json.dumps(v) for k, v in (metadata or {}).items()},
    }
    _write_safetensors(path, tensors, meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Restore what :func:`save_optimizer` wrote into an optimizer built over the same parameters."""
    tensors, meta = _read_safetensors(path)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in json.loads(meta.get("scalar_state", "{}")).items():
        state.setdefault(int(pid), {}).update(values)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    except (KeyError, ValueError) as exc:
        raise RunError(
            f"{path}: optimizer state does not fit this model/optimizer ({exc}); resume with the same "
            "network spec and optimizer, or start a new run"
        ) from exc


# ---- resumable checkpoints -----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    best: Mapping[str, Any] | None = None,
) -> None:
    """Commit a resumable checkpoint as one unit (see the module docstring).

    Args:
        run_dir: the run directory.
        model: the model (its weights become ``last.safetensors``).
        optimizer: the optimizer.
        state: the trainer state (JSON); must hold ``iteration``.
        best: when given, the model's weights are also the new best: written as ``model.safetensors`` with
            this metadata (which must hold ``iteration``).
    """
    run_dir = Path(run_dir)
    recover_checkpoint(run_dir)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint.", suffix=".partial", dir=run_dir))
    try:
        iteration = {"iteration": state["iteration"]}
        if best is not None:
            save_weights(model, staging / BEST_WEIGHTS, metadata=best)
        save_weights(model, staging / LAST_WEIGHTS, metadata=iteration)
        save_optimizer(optimizer, staging / OPTIMIZER, metadata=iteration)
        atomic_write_json(staging / TRAINER_STATE, state)
        _fsync_dir(staging)
        os.replace(staging, run_dir / _READY)  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(run_dir)
    _promote(run_dir)


def _promote(run_dir: Path) -> None:
    ready = run_dir / _READY
    for name in _CHECKPOINT_FILES:
        if (ready / name).exists():
            os.replace(ready / name, run_dir / name)
    shutil.rmtree(ready)
    _fsync_dir(run_dir)


def recover_checkpoint(run_dir: str | Path) -> None:
    """Finish a committed checkpoint whose files were not all moved into place, and drop unfinished ones."""
    run_dir = Path(run_dir)
    for partial in run_dir.glob(".checkpoint.*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    if (run_dir / _READY).is_dir():
        log.info("%s: completing a checkpoint interrupted while being moved into place", run_dir)
        _promote(run_dir)


def read_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The trainer state of the last checkpoint in ``run_dir`` (after recovery), or None if there is none.

    Raises:
        RunError: the state and the weight files belong to different iterations (files edited by hand).
    """
    run_dir = Path(run_dir)
    recover_checkpoint(run_dir)
    path = run_dir / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: unreadable trainer state ({exc}); start a new run") from exc
    expected = {LAST_WEIGHTS: state.get("iteration"), OPTIMIZER: state.get("iteration")}
    if state.get("best_iteration") is not None:
        expected[BEST_WEIGHTS] = state["best_iteration"]
    for name, iteration in expected.items():
        found = read_metadata(run_dir / name).get("iteration")
        if found != iteration:
            raise RunError(
                f"{run_dir / name}: belongs to iteration {found}, but {TRAINER_STATE} expects {iteration}; "
                "the checkpoint files were mixed up, start a new run"
            )
    return state
