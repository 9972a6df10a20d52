"""Inference backends: the same network run by PyTorch or by ONNX Runtime, behind one call signature.

A backend is a callable ``f(x) -> logits`` on ``(B, C, *patch)`` float tensors, so
:func:`medlens.tasks.inference.sliding_window_logits` (windows, Gaussian blending, mirroring) runs either one:

- :class:`TorchBackend` runs the ``nn.Module`` in fp32 or under bf16/fp16 autocast;
- :class:`OnnxBackend` runs an exported ``model.onnx`` in an ONNX Runtime session (CPU, or CUDA when
  onnxruntime-gpu is installed), with all graph optimisations and as many intra-op threads as the process has
  cores.

Which one is faster depends on the machine and the network, so training measures it
(:func:`measure_fold`): it times sliding-window inference of one validation case with each backend and
records ``inference_backend`` in ``run.json``; ``Predictor.from_run(backend="auto")`` follows that record.
ONNX is chosen only when it is faster *and* its label map agrees with PyTorch's (fp32) on at least 99.9 % of
the voxels with a mean Dice of at least 0.999 between the two.
"""

from __future__ import annotations

import copy
import datetime
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens.errors import InputError, unknown_name

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
#: The agreement (argmax voxels and mean Dice vs PyTorch fp32) ONNX needs before it is chosen.
MIN_AGREEMENT = 0.999


def onnx_available() -> bool:
    """Whether ONNX Runtime (and the ``onnx`` package used to export) can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def check_backend(name: str) -> str:
    """``name`` if it is a backend ("auto", "torch" or "onnx"), else an InputError with "did you mean"."""
    if name not in BACKENDS:
        raise unknown_name("backend", name, BACKENDS)
    return name


class TorchBackend:
    """A PyTorch module as a backend: no gradients, optional autocast, logits returned as float32.

    Args:
        model: maps ``(B, C, *patch)`` to ``(B, K, *patch)`` logits (put in eval mode).
        precision: "fp32", "bf16" or "fp16" (autocast; fp16 only on CUDA).
        device: where the model runs (default: where its parameters are).
    """

    name = "torch"

    def __init__(self, model: nn.Module, precision: str = "fp32", device: torch.device | None = None) -> None:
        import torch

        if precision not in ("fp32", "bf16", "fp16"):
            raise unknown_name("precision", precision, ("fp32", "bf16", "fp16"))
        self.model = model.eval()
        params = list(model.parameters())
        self.device = device or (params[0].device if params else torch.device("cpu"))
        self.precision = precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        from medlens.tasks.inference import autocast_for

        with torch.no_grad(), autocast_for(self.device, self.precision):
            return self.model(x.to(self.device)).float()

    def __repr__(self) -> str:
        return f"TorchBackend({type(self.model).__name__}, {self.precision}, {self.device})"


class OnnxBackend:
    """An exported ONNX model run by ONNX Runtime, called like the PyTorch module it came from.

    Args:
        path: the ``.onnx`` file (see :func:`medlens.serve.export.export_onnx`).
        device: "cpu", "cuda"/"cuda:N" or a torch device. CUDA runs on ONNX Runtime's CUDA provider when
            onnxruntime-gpu is installed; otherwise on the CPU (with a warning).
        threads: intra-op threads (default: the cores this process may use).
        allow_spinning: let idle ONNX Runtime threads busy-wait for work (ONNX Runtime's own default). Off
            by default here: with other processes on the cores (the usual case on a shared 2-core machine),
            spinning made a 3D U-Net's sliding-window inference 2-3x slower (bench/RESULTS.md).
    """

    name = "onnx"

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        allow_spinning: bool = False,
    ) -> None:
        import onnxruntime as ort
        import torch

        from medlens.engine.runtime import available_cores
        from medlens.errors import RunError

        self.path = Path(path)
        if not self.path.is_file():
            raise RunError(
                f"{self.path}: no such ONNX file (export it with 'medlens export RUN --format onnx')"
            )
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"ONNX Runtime threads must be a positive integer, got {threads!r}")
        dev = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        providers: list[Any] = ["CPUExecutionProvider"]
        if dev.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev.index or 0}))
            else:
                log.warning(
                    "onnxruntime has no CUDA provider here (install onnxruntime-gpu): running on the CPU"
                )
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise RunError(f"{self.path}: ONNX Runtime cannot load it ({exc}); export it again") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.threads = int(options.intra_op_num_threads)
        self.provider = self.session.get_providers()[0]
        self.device = dev if self.provider == "CUDAExecutionProvider" else torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        # Host round trip: simple and exact; with the CUDA provider, IO binding would save two copies.
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        array = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        try:
            out = self.session.run(None, {self.input_name: array})[0]
        except InvalidArgument as exc:
            detail = " ".join(str(exc).split())
            raise InputError(
                f"{self.path}: cannot run an input of shape {list(x.shape)} ({detail}); export the model for "
                "this shape (its spatial axes are fixed when the network needs them to be)"
            ) from None
        return torch.from_numpy(out).to(x.device)

    def __repr__(self) -> str:
        return f"OnnxBackend({self.path.name}, {self.provider}, {self.threads} threads)"


# ---- measuring which backend is faster ---------------------------------------------------------------------------
@dataclass
class BackendMeasurement:
    """Per-volume sliding-window seconds per backend, ONNX-vs-PyTorch agreement, and the resulting choice.

    Attributes:
        seconds: backend variant (``torch_fp32``, ``torch_bf16``, ``onnx_fp32``, ``onnx_fp32_1t`` ...) ->
            median seconds per volume.
        runs: every timed run per variant.
        max_abs_diff: largest probability difference, ONNX Runtime vs PyTorch fp32.
        argmax_agreement: fraction of voxels with the same label (ONNX vs PyTorch fp32).
        dice: mean foreground Dice between the two label maps.
        torch_precision: the precision PyTorch inference uses for this run (what ONNX would replace).
        choice: "onnx" or "torch".
        reason: why.
    """

    seconds: dict[str, float]
    runs: dict[str, list[float]]
    max_abs_diff: float
    argmax_agreement: float
    dice: float
    torch_precision: str
    device: str
    onnx_threads: int
    onnx_provider: str
    shape: list[int]
    choice: str = "torch"
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``run.json`` record (``inference_backend``)."""
        return {
            "choice": self.choice,
            "reason": self.reason,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "max_abs_diff": self.max_abs_diff,
            "argmax_agreement": self.argmax_agreement,
            "dice": self.dice,
            "torch_precision": self.torch_precision,
            "device": self.device,
            "onnx_threads": self.onnx_threads,
            "onnx_provider": self.onnx_provider,
            "shape": self.shape,
            "rounds": min((len(v) for v in self.runs.values()), default=0),
            "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **self.extra,
        }


def measure_backends(
    model: nn.Module,
    data: torch.Tensor,
    patch_size: Sequence[int],
    *,
    onnx_path: str | Path,
    precision: str = "fp32",
    device: torch.device | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mirror_axes: Sequence[int] = (),
    slice_axis: int | None = None,
    repeats: int = 3,
    min_seconds: float = 0.5,
    onnx_threads: Sequence[int | None] = (None,),
    allow_spinning: bool = False,
    min_agreement: float = MIN_AGREEMENT,
    extra_variants: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> BackendMeasurement:
    """Time sliding-window inference of one case with PyTorch (fp32 and ``precision``) and ONNX Runtime (fp32).

    Every variant runs once untimed (warm-up), then timed rounds interleave the variants, so a change in
    machine load touches all of them alike; the median is reported.

    Args:
        model: the PyTorch network (fp32 weights; the ONNX file must be exported from the same weights).
        data: ``(C, *spatial)`` one preprocessed case.
        patch_size: the sliding window.
        onnx_path: the exported model.
        precision: the PyTorch precision inference would use ("fp32", "bf16" or "fp16").
        device: where to run (default: the model's device).
        overlap, sw_batch_size, mirror_axes, slice_axis: as in :func:`sliding_window_logits`.
        repeats: timed rounds (at least).
        min_seconds: keep adding rounds (at most 50) until every variant has run this long in total, so the
            median of a tiny volume's milliseconds is not noise.
        onnx_threads: ONNX Runtime thread counts to time (None = all cores, the ``onnx_fp32`` variant used
            for the choice; others are reported as ``onnx_fp32_<n>t``).
        allow_spinning: see :class:`OnnxBackend`.
        min_agreement: the argmax agreement and Dice ONNX needs to be chosen.
        extra_variants: more backends to time alongside, by name (reported, never chosen).
    """
    import torch

    from medlens.tasks.inference import dice_per_class, sliding_window_logits

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"repeats must be a positive integer, got {repeats!r}")
    params = list(model.parameters())
    dev = device or (params[0].device if params else torch.device("cpu"))
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "torch_fp32": TorchBackend(model, "fp32", dev)
    }
    if precision != "fp32":
        variants[f"torch_{precision}"] = TorchBackend(model, precision, dev)
    main_onnx: OnnxBackend | None = None
    for n in onnx_threads:
        backend = OnnxBackend(onnx_path, dev, threads=n, allow_spinning=allow_spinning)
        variants["onnx_fp32" if n is None else f"onnx_fp32_{n}t"] = backend
        main_onnx = main_onnx or (backend if n is None else None)
    if main_onnx is None:
        raise InputError("onnx_threads must include None (all cores), the variant the choice is made on")
    variants.update(extra_variants or {})

    def infer(fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return sliding_window_logits(
            fn,
            data,
            patch_size,
            overlap=overlap,
            sw_batch_size=sw_batch_size,
            mirror_axes=mirror_axes,
            precision="fp32",  # the backends do their own autocast
            device=dev,
            slice_axis=slice_axis,
        )

    probs = {name: infer(fn) for name, fn in variants.items()}  # warm-up, and the outputs compared below
    runs: dict[str, list[float]] = {name: [] for name in variants}
    rounds = 0
    # At least `repeats` rounds; tiny volumes get more (up to 50), until every variant has run `min_seconds`.
    while rounds < repeats or (rounds < 50 and min(sum(v) for v in runs.values()) < min_seconds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            infer(fn)
            runs[name].append(time.perf_counter() - t0)
        rounds += 1
    seconds = {name: statistics.median(v) for name, v in runs.items()}

    ref, got = probs["torch_fp32"], probs["onnx_fp32"]
    ref_label, got_label = ref.argmax(0), got.argmax(0)
    dices = [d for d in dice_per_class(got_label, ref_label, ref.shape[0]) if not np.isnan(d)]
    m = BackendMeasurement(
        seconds=seconds,
        runs=runs,
        max_abs_diff=float((got - ref).abs().max()),
        argmax_agreement=float((got_label == ref_label).float().mean()),
        dice=float(np.mean(dices)) if dices else 1.0,
        torch_precision=precision,
        device=str(dev),
        onnx_threads=main_onnx.threads,
        onnx_provider=main_onnx.provider,
        shape=list(data.shape),
    )
    m.choice, m.reason = choose_backend(
        seconds, precision, m.argmax_agreement, m.dice, min_agreement=min_agreement
    )
    log.info("inference backend: %s (%s)", m.choice, m.reason)
    return m


def choose_backend(
    seconds: Mapping[str, float],
    precision: str,
    argmax_agreement: float,
    dice: float,
    *,
    min_agreement: float = MIN_AGREEMENT,
) -> tuple[str, str]:
    """The rule: ONNX Runtime only if faster than PyTorch at ``precision`` AND in agreement with PyTorch.

    Args:
        seconds: median seconds per volume with keys ``torch_<precision>`` and ``onnx_fp32``.
        precision: the precision PyTorch inference would use.
        argmax_agreement: fraction of voxels with the same label, ONNX vs PyTorch fp32.
        dice: mean foreground Dice between the two label maps.
        min_agreement: the agreement and Dice required.

    Returns:
        ``("onnx" | "torch", reason)``.
    """
    torch_s, onnx_s = seconds[f"torch_{precision}"], seconds["onnx_fp32"]
    if not (argmax_agreement >= min_agreement and dice >= min_agreement):
        return "torch", (
            f"ONNX Runtime disagrees with PyTorch (argmax agreement {argmax_agreement:.5f}, Dice {dice:.5f}; "
            f"{min_agreement} needed)"
        )
    if onnx_s < torch_s:
        return "onnx", (
            f"ONNX Runtime {onnx_s:.3f} s vs PyTorch {precision} {torch_s:.3f} s per volume "
            f"({torch_s / onnx_s:.2f}x faster)"
        )
    return "torch", f"PyTorch {precision} {torch_s:.3f} s vs ONNX Runtime {onnx_s:.3f} s per volume"


def measure_fold(
    fold_dir: Path,
    model: nn.Module,
    config: Mapping[str, Any],
    data: np.ndarray,
    *,
    case_id: str,
    device: str | torch.device = "auto",
    repeats: int = 3,
) -> dict[str, Any]:
    """Export ``fold_dir/model.onnx`` from the fold's weights and measure the backends on one case.

    Args:
        fold_dir: the trained fold (holds ``model.safetensors``).
        model: a network of the fold's architecture (copied; the fold's best weights are loaded into the copy).
        config: the resolved plan configuration (its inference settings are the ones timed).
        data: ``(C, *spatial)`` one preprocessed validation case.
        case_id: named in the record.
        device: where inference runs.
        repeats: timed rounds per backend.

    Returns:
        The ``run.json`` ``inference_backend`` record (see :class:`BackendMeasurement`).
    """
    import torch

    from medlens.engine import device_for, load_weights, resolve_precision
    from medlens.engine.checkpoint import unwrap
    from medlens.serve.run_export import example_shape_for, onnx_for_fold

    if not onnx_available():
        return {"choice": "torch", "reason": "onnxruntime is not installed"}
    t0 = time.perf_counter()
    dev = device_for(device)
    net = copy.deepcopy(unwrap(model)).float()
    load_weights(net, fold_dir / "model.safetensors")
    net = net.to(dev).eval()
    shape = example_shape_for(config, int(data.shape[0]))
    onnx_path = onnx_for_fold(fold_dir, net, shape)
    inf = config.get("inference", {})
    slice_axis = config.get("sampling", {}).get("slice_axis") if int(config["spatial_dims"]) == 2 else None
    m = measure_backends(
        net,
        torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
        list(shape[2:]),
        onnx_path=onnx_path,
        precision=resolve_precision(str(config["training"].get("precision", "auto")), dev),
        device=dev,
        overlap=float(inf.get("overlap", 0.25)),
        sw_batch_size=int(inf.get("sw_batch_size", 4)),
        mirror_axes=list(inf.get("mirror_axes", [])),
        slice_axis=slice_axis,
        repeats=repeats,
    )
    m.extra = {
        "case": case_id,
        "onnx_file": f"{fold_dir.name}/{onnx_path.name}",
        "measure_seconds": round(time.perf_counter() - t0, 1),
    }
    return m.to_json()
