"""Where and how training runs: device, CPU threads, numeric precision, seeding, RNG state and versions."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import sys
from typing import Any

import numpy as np
import torch

from medlens.errors import InputError, unknown_name

log = logging.getLogger(__name__)


def device_for(spec: str | torch.device = "auto") -> torch.device:
    """The torch device for ``spec``: ``"auto"`` is CUDA when available, else CPU.

    Raises:
        InputError: ``spec`` names CUDA but none is available, or is not a device name.
    """
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {spec!r} (use 'auto', 'cpu', 'cuda' or 'cuda:N')") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {spec!r} requested but no CUDA GPU is available (use 'auto' or 'cpu')")
    return device


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(n: int | None = None, *, workers: int = 0) -> int:
    """Set torch's CPU threads so that nothing oversubscribes the cores.

    On this kind of machine two torch threads collapse (5-15x slower) as soon as anything else takes a
    core, so the default gives torch the cores left after data-loader ``workers`` and shares them among the
    DDP processes of this node (``LOCAL_WORLD_SIZE``). Training data produced in the main thread (the
    default for medlens tasks) costs no extra core.

    Args:
        n: threads to use; None = automatic as above.
        workers: data-loader worker processes that will run beside training.

    Returns:
        The number of threads set.
    """
    if n is None:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        n = max(1, (available_cores() - workers) // local)
    elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"threads must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(1)
    return n


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), which makes bf16 autocast pay off."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``"auto"`` into the precision to use on ``device`` (``"bf16"``, ``"fp16"`` or ``"fp32"``).

    Raises:
        InputError: unknown precision, or bf16 requested on a device without it.
    """
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise unknown_name("precision", precision, ("auto", "bf16", "fp16", "fp32"))
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise InputError("precision 'bf16' requested but this GPU does not support it (use 'fp16' or 'auto')")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for a resolved precision (None for fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All global RNG states as JSON-able lists (for a checkpoint)."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [
            str(np_state[0]),
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def collect_versions(device: torch.device | None = None) -> dict[str, Any]:
    """Versions of what produced a run (for ``versions.json``)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "medlens": ver("medlens"),
        "torch": torch.__version__,
        "monai": ver("monai"),
        "numpy": np.__version__,
        "safetensors": ver("safetensors"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_supports_bf16(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        out["device"] = str(device)
        if device.type == "cuda":
            out["cuda"] = torch.version.cuda
            out["gpu"] = torch.cuda.get_device_name(device)
    return out
