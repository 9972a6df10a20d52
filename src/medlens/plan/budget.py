"""Time and memory: the budget a plan must fit, and what a training step costs on this machine.

Two ways to cost a network at a patch and batch size:

* :func:`trace_cost` runs one forward and backward pass on PyTorch's ``meta`` device (no memory, no
  arithmetic): it counts the FLOPs and the bytes autograd keeps for the backward pass. Both scale exactly
  with the number of voxels for a fully convolutional network whose input is divisible by its strides, so
  one trace per topology prices every patch size.
* :func:`time_training_step` times real optimizer steps (forward, Dice+CE loss, backward, AdamW) on the
  target device and precision. The planner uses it to calibrate the FLOP model on the machine it runs on.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medlens.errors import InputError

log = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|hr|h|min|m|sec|s)")


def parse_budget(budget: str | float | int) -> float:
    """Turn a time budget into seconds.

    Args:
        budget: ``"90s"``, ``"10m"``, ``"1h"``, ``"1h30m"``, ``"2.5h"``; a bare number means seconds.

    Raises:
        InputError: the text is not a positive duration.
    """
    if isinstance(budget, bool):
        raise InputError(f"budget {budget!r}: expected a duration such as 90s, 10m, 1h or 1h30m")
    if isinstance(budget, int | float):
        seconds = float(budget)
    else:
        text = str(budget).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise InputError(
                    f"budget {budget!r}: expected a duration such as 90s, 10m, 1h or 1h30m"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"budget {budget!r}: must be a positive duration such as 90s, 10m or 1h")
    return seconds


def format_seconds(seconds: float) -> str:
    """Human-readable duration: ``"45 s"``, ``"12 min"``, ``"3.2 h"``."""
    if seconds < 90:
        return f"{seconds:.3g} s"
    if seconds < 5400:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


@dataclass(frozen=True)
class StepCost:
    """The cost of one training step of a network for ONE sample of a given patch.

    Attributes:
        flops: floating-point operations of forward + backward.
        activation_bytes: bytes autograd saves for the backward pass (fp32).
        param_bytes: bytes of the parameters (fp32).
        voxels: voxels of the patch the cost was traced at.
    """

    flops: float
    activation_bytes: float
    param_bytes: float
    voxels: int

    def scaled(self, patch_size: Sequence[int]) -> StepCost:
        """The same network at another (stride-divisible) patch size: activations and FLOPs scale with voxels."""
        v = math.prod(int(p) for p in patch_size)
        f = v / self.voxels
        return StepCost(self.flops * f, self.activation_bytes * f, self.param_bytes, v)

    def memory_bytes(self, batch_size: int, activation_factor: float = 3.0) -> float:
        """Training memory: saved activations (x ``activation_factor`` for gradients and workspace) plus
        weights, gradients and two Adam moments."""
        return batch_size * self.activation_bytes * activation_factor + 4 * self.param_bytes


def _build(spec: Mapping[str, Any], spatial_dims: int, in_channels: int, out_channels: int) -> Any:
    from medlens.models import create_model

    return create_model(
        dict(spec), spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels
    )


def trace_cost(
    spec: Mapping[str, Any],
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
) -> StepCost:
    """Count FLOPs and saved activation bytes of one training step (batch 1) on the ``meta`` device.

    Only the forward pass is traced: it is where autograd saves activations, and the backward pass of a
    convolutional network costs two forward passes.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    saved = [0]
    params: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params:  # weights are saved too, but they are counted once, in param_bytes
            saved[0] += t.numel() * t.element_size()
        return t

    with torch.device("meta"):
        model = _build(spec, spatial_dims, in_channels, out_channels)
        params.update(id(p) for p in model.parameters())
        # Batch 2, halved below: batch norm in training mode refuses one value per channel, which a
        # classifier's 1x1 bottleneck of a small image would give with a batch of 1.
        x = torch.empty(2, in_channels, *[int(p) for p in patch_size])
        with (
            FlopCounterMode(display=False) as counter,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            model(x)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    # backward of a convolution costs two forwards (input and weight gradients): tracing it is not needed
    flops = 3.0 * counter.get_total_flops() / 2
    return StepCost(flops, float(saved[0]) / 2, float(param_bytes), math.prod(x.shape[2:]))


def time_training_step(
    spec: Mapping[str, Any],
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    batch_size: int,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    steps: int = 3,
) -> float:
    """Median wall time (seconds) of ``steps`` real training steps, after one warm-up step.

    A step is what the trainer does per iteration: forward under autocast (``precision`` ``"bf16"`` or
    ``"fp16"``), Dice + cross-entropy loss, backward, AdamW update.
    """
    import torch
    from monai.losses import DiceCELoss

    gen = torch.Generator().manual_seed(0)
    shape = (batch_size, in_channels, *[int(p) for p in patch_size])
    x = torch.randn(shape, generator=gen)
    y = torch.randint(0, out_channels, (batch_size, 1, *shape[2:]), generator=gen)
    return median_step_seconds(
        lambda: _build(spec, spatial_dims, in_channels, out_channels),
        x, y, DiceCELoss(to_onehot_y=True, softmax=True),
        device=device, precision=precision, threads=threads, steps=steps,
    )  # fmt: skip


def median_step_seconds(
    build: Any,
    x: Any,
    y: Any,
    loss_fn: Any,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    steps: int = 3,
) -> float:
    """Median wall time of ``steps`` training steps of ``build()`` on ``(x, y)`` after one warm-up step: forward
    under autocast (``precision`` ``"bf16"``/``"fp16"``), ``loss_fn`` in fp32, backward, AdamW; with
    ``threads`` torch threads (restored afterwards). Every task's planner times its steps with this."""
    import torch

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        model = build().to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x, y = x.to(dev), y.to(dev)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            loss = loss_fn(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        times = sorted(times[1:])
        return float(times[len(times) // 2])
    finally:
        torch.set_num_threads(old_threads)


def available_memory(device: str) -> float:
    """Bytes of memory free for training on ``device`` (RAM via psutil on CPU; free GPU memory on CUDA)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)
