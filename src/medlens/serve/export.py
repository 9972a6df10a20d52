"""Export a network to ONNX or TorchScript, and prove the exported file computes what PyTorch computes.

``export_onnx`` writes an ONNX graph with a dynamic batch axis and, where the network allows it, dynamic spatial
axes; ``export_torchscript`` writes a traced TorchScript module. ``verify_export`` runs the file and the PyTorch
model side by side on random inputs (two batch sizes: the batch axis must really be dynamic) and on real
preprocessed patches, and reports the largest absolute logit difference against a stated tolerance.
:mod:`medlens.serve.run_export` does all of this for the folds of a run (``medlens export RUN --format onnx``).

ONNX is made with PyTorch's TorchScript-based exporter (``dynamo=False``): it needs no extra package, exports a
U-Net in about half a second (the ``torch.export``-based exporter took 15 s and needs ``onnxscript``) and gives
the same ONNX Runtime speed. Both exporters are deprecated or changing upstream, which is why every file is
verified.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medlens._fs import atomic_path
from medlens.errors import InputError, MedlensError, RunError, unknown_name

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
#: File name of each format inside a fold directory.
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}
DEFAULT_OPSET = 17
OPSET_RANGE = (13, 21)
#: Largest absolute difference of logits (fp32 vs fp32) accepted by :func:`verify_export`. Measured
#: differences on the U-Nets here are 1e-6 to 1e-5; a real export bug shows up as O(0.1) or more.
DEFAULT_TOLERANCE = 1e-3
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


# ---- export ------------------------------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module,
    example_shape: Sequence[int],
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    *,
    dynamic_spatial: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` (fp32, on the CPU, eval mode; the model itself is not changed) to an ONNX file.

    Args:
        model: maps ``(B, C, *spatial)`` to ``(B, K, *spatial)`` logits.
        example_shape: ``(B, C, *spatial)`` of a typical input (the sliding-window batch).
        path: the ``.onnx`` file to write (atomically).
        opset: ONNX opset version.
        dynamic_spatial: make the spatial axes dynamic too. None (default) = where the network allows it:
            the dynamic export is probed on an input twice as long along the first spatial axis and, if the
            result differs from PyTorch's, exported again with fixed spatial axes. The batch axis is always
            dynamic (the last sliding-window batch is smaller).
        metadata: extra string-able values stored in the file's ``metadata_props`` (``medlens.<key>``).

    Returns:
        ``path``.

    Raises:
        InputError: bad ``example_shape`` or ``opset``.
        MedlensError: the exporter cannot convert this network.
    """
    import torch

    shape = _check_shape(example_shape)
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise InputError(
            f"ONNX opset {opset!r} is not supported; use an integer from {OPSET_RANGE[0]} to {OPSET_RANGE[1]} "
            f"(default {DEFAULT_OPSET})"
        )
    net = _cpu_copy(model)
    example = _random(shape, seed=0)
    path = Path(path)
    with atomic_path(path) as tmp:
        spatial = True if dynamic_spatial is None else bool(dynamic_spatial)
        _torch_to_onnx(net, example, tmp, opset, spatial)
        if dynamic_spatial is None and not _spatial_probe_ok(net, tmp, shape):
            log.info("%s: spatial axes fixed to %s (the network is not shape-generic)", path.name, shape[2:])
            spatial = False
            _torch_to_onnx(net, example, tmp, opset, spatial)
        props = {
            "format": "medlens-onnx",
            "example_shape": json.dumps(list(shape)),
            "dynamic_spatial": json.dumps(spatial),
            "torch_version": torch.__version__,
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()},
        }
        _set_onnx_metadata(tmp, props)
    log.info("exported %s (opset %d, dynamic batch%s)", path, opset, " and spatial axes" if spatial else "")
    return path


def export_torchscript(
    model: nn.Module,
    example_shape: Sequence[int],
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Trace ``model`` (fp32, CPU, eval mode; the model itself is not changed) to a TorchScript file.

    Tracing records the operations run on an example input; a convolutional network traced this way accepts
    other batch and (stride-compatible) spatial sizes. Load the file with ``torch.jit.load(path)``.

    Args:
        model: maps ``(B, C, *spatial)`` to ``(B, K, *spatial)`` logits.
        example_shape: ``(B, C, *spatial)`` of a typical input.
        path: the file to write (atomically), by convention ``model.ts``.
        metadata: values stored as ``medlens.json`` inside the file (``torch.jit.load(..., _extra_files=)``).

    Returns:
        ``path``.
    """
    import torch

    shape = _check_shape(example_shape)
    net = _cpu_copy(model)
    extra = {"medlens.json": json.dumps({"example_shape": list(shape), **dict(metadata or {})})}
    with _quiet_exporter(), torch.no_grad():
        try:
            traced = torch.jit.trace(net, _random(shape, seed=0), check_trace=False)
        except Exception as exc:  # the tracer raises many kinds; name the network and the way out
            raise MedlensError(
                f"{type(model).__name__} cannot be traced to TorchScript ({exc}); export it to ONNX instead"
            ) from exc
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files=extra)
    log.info("exported %s (TorchScript, traced on %s)", path, shape)
    return path


def _check_shape(example_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in example_shape)
    except (TypeError, ValueError):
        raise InputError(f"example shape {example_shape!r} must be integers (B, C, *spatial)") from None
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise InputError(
            f"example shape {list(shape)} must be (B, C, *spatial) with 2 or 3 positive spatial sizes"
        )
    return shape


def _cpu_copy(model: nn.Module) -> nn.Module:
    import torch

    from medlens.engine.checkpoint import unwrap

    return copy.deepcopy(unwrap(model)).to(device="cpu", dtype=torch.float32).eval()


def _random(shape: Sequence[int], seed: int) -> torch.Tensor:
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the tracer's shape and deprecation warnings; the export is verified numerically instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _torch_to_onnx(net: nn.Module, example: torch.Tensor, path: Path, opset: int, spatial: bool) -> None:
    import torch

    axes = {0: "batch", **({2 + i: f"spatial_{i}" for i in range(example.ndim - 2)} if spatial else {})}
    with _quiet_exporter(), torch.no_grad():
        try:
            torch.onnx.export(
                net,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many kinds; name the network and the opset
            raise MedlensError(
                f"{type(net).__name__} cannot be exported to ONNX opset {opset} ({exc}); try another "
                "--opset or --format torchscript"
            ) from exc


def _spatial_probe_ok(net: nn.Module, path: Path, shape: tuple[int, ...]) -> bool:
    """Whether the dynamic-spatial export matches PyTorch on a larger input (twice the first spatial size)."""
    import torch

    from medlens.serve.backends import OnnxBackend

    probe = _random((1, shape[1], 2 * shape[2], *shape[3:]), seed=1)
    try:
        got = OnnxBackend(path, threads=1)(probe)
    except Exception as exc:  # ONNX Runtime raises its own error types for shape failures
        log.debug("dynamic spatial probe failed: %s", exc)
        return False
    with torch.no_grad():
        ref = net(probe)
    return tuple(got.shape) == tuple(ref.shape) and float((got - ref).abs().max()) <= DEFAULT_TOLERANCE


def _set_onnx_metadata(path: Path, props: Mapping[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if not p.key.startswith("medlens.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"medlens.{key}", str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``medlens.*`` metadata of an ONNX file written by :func:`export_onnx` (keys without the prefix)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and OSError variants
        raise RunError(
            f"{path}: not a readable ONNX file ({exc}); export it again with 'medlens export'"
        ) from exc
    return {p.key[len("medlens.") :]: p.value for p in proto.metadata_props if p.key.startswith("medlens.")}


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file (weights provenance for exported models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- verification ------------------------------------------------------------------------------------------------
@dataclass
class InputCheck:
    """One input of an export check: the largest logit difference and how often the argmax class agrees."""

    name: str
    shape: list[int]
    max_abs_diff: float
    argmax_agreement: float


@dataclass
class ExportCheck:
    """Outcome of :func:`verify_export`: per input, exported vs PyTorch, against ``tolerance``."""

    path: Path
    format: str
    tolerance: float
    inputs: list[InputCheck] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        """The largest absolute logit difference over all inputs."""
        return max((c.max_abs_diff for c in self.inputs), default=float("nan"))

    @property
    def passed(self) -> bool:
        """Every input within tolerance (NaN never passes)."""
        return bool(self.inputs) and all(c.max_abs_diff <= self.tolerance for c in self.inputs)

    @property
    def real_inputs(self) -> int:
        """How many of the inputs were real (preprocessed image) patches."""
        return sum(not c.name.startswith("random") for c in self.inputs)

    def summary(self) -> str:
        """One line: verdict, max difference vs tolerance, and what was checked."""
        verdict = "matches PyTorch" if self.passed else "DOES NOT match PyTorch"
        agree = min((c.argmax_agreement for c in self.inputs), default=float("nan"))
        return (
            f"{verdict}: max |logit difference| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.0e}), "
            f"argmax agreement {agree:.4%}, on {len(self.inputs) - self.real_inputs} random and "
            f"{self.real_inputs} real input(s)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "tolerance": self.tolerance,
            "max_abs_diff": self.max_abs_diff,
            "passed": self.passed,
            "inputs": [asdict(c) for c in self.inputs],
        }


def load_exported(path: str | Path, fmt: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable ``(B, C, *spatial) -> logits`` running an exported file (format from the suffix if None)."""
    import torch

    fmt = fmt or ("onnx" if str(path).endswith(".onnx") else "torchscript")
    if fmt == "onnx":
        from medlens.serve.backends import OnnxBackend

        return OnnxBackend(path)
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu").eval()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        return run
    raise unknown_name("export format", fmt, FORMATS)


def verify_export(
    model: nn.Module,
    path: str | Path,
    example_shape: Sequence[int],
    *,
    real_inputs: Sequence[torch.Tensor] = (),
    tolerance: float = DEFAULT_TOLERANCE,
    fmt: str | None = None,
    seed: int = 0,
) -> ExportCheck:
    """Run an exported file and the PyTorch model on the same inputs and compare the logits.

    Inputs: two random standard-normal batches, of batch size 1 and ``B + 1`` (so a batch axis that is not
    really dynamic fails), and every real input (``(C, *spatial)`` or ``(B, C, *spatial)``).

    Args:
        model: the PyTorch model (run in fp32 on the CPU; not changed).
        path: the exported file.
        example_shape: ``(B, C, *spatial)`` the file was exported with.
        real_inputs: preprocessed image patches of the example's spatial size.
        tolerance: largest accepted absolute logit difference.
        fmt: "onnx" or "torchscript" (default: from the suffix).
        seed: seed of the random inputs.

    Returns:
        The :class:`ExportCheck`; ``check.passed`` says whether every input was within ``tolerance``.
    """
    import torch

    shape = _check_shape(example_shape)
    if not tolerance > 0:
        raise InputError(f"tolerance must be a positive number, got {tolerance!r}")
    fmt = fmt or ("onnx" if str(path).endswith(".onnx") else "torchscript")
    exported = load_exported(path, fmt)
    net = _cpu_copy(model)
    inputs: list[tuple[str, torch.Tensor]] = [
        ("random, batch 1", _random((1, *shape[1:]), seed)),
        (f"random, batch {shape[0] + 1}", _random((shape[0] + 1, *shape[1:]), seed + 1)),
    ]
    for n, x in enumerate(real_inputs):
        x = torch.as_tensor(x, dtype=torch.float32)
        inputs.append((f"real {n}", x[None] if x.ndim == len(shape) - 1 else x))
    check = ExportCheck(Path(path), fmt, float(tolerance))
    for name, x in inputs:
        with torch.no_grad():
            ref = net(x).float()
        got = exported(x).float()
        if got.shape != ref.shape:
            diff, agree = float("inf"), 0.0
        else:
            diff = float((got - ref).abs().max())
            agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
        check.inputs.append(InputCheck(name, list(x.shape), diff, agree))
    log.info("%s: %s", path, check.summary())
    return check
