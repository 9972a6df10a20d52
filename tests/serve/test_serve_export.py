"""Export to ONNX and TorchScript: the files compute PyTorch's logits, batch (and spatial) axes are dynamic,
a bad export is caught, and ``medlens export`` writes verified files atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medlens.errors import InputError, MedlensError
from medlens.models import create_model
from medlens.serve import export as ex
from medlens.serve import run_export
from medlens.serve.backends import OnnxBackend

SHAPE = (2, 1, 16, 16, 8)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model({"name": "test_unet"}, spatial_dims=3, in_channels=1, out_channels=3).eval()


def structured_input(shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """A smooth image-like input (a bright ball), unlike the random inputs verify_export adds itself."""
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape[2:]], indexing="ij"))
    ball = (grid**2).sum(0) < 0.4
    return (ball.float() * 2.0 - 1.0).expand(shape).clone()


def test_onnx_export_matches_pytorch_within_the_stated_tolerance(tmp_path: Path) -> None:
    model = tiny_unet()
    path = ex.export_onnx(model, SHAPE, tmp_path / "m.onnx")
    check = ex.verify_export(model, path, SHAPE, real_inputs=[structured_input()[0]])
    assert ex.DEFAULT_TOLERANCE <= 1e-3 and check.tolerance == ex.DEFAULT_TOLERANCE
    assert check.passed and check.max_abs_diff < 1e-4, check.summary()
    assert [c.shape[0] for c in check.inputs] == [
        1,
        SHAPE[0] + 1,
        1,
    ]  # batch 3 ran: the batch axis is dynamic
    assert all(c.argmax_agreement == 1.0 for c in check.inputs)
    assert check.real_inputs == 1
    meta = ex.onnx_metadata(path)
    assert json.loads(meta["example_shape"]) == list(SHAPE) and json.loads(meta["dynamic_spatial"]) is True
    assert not model.training  # the caller's model is not changed (export works on a copy)


def test_onnx_spatial_axes_are_dynamic_for_a_unet(tmp_path: Path) -> None:
    model = tiny_unet()
    path = ex.export_onnx(model, SHAPE, tmp_path / "m.onnx")
    x = torch.randn(3, 1, 24, 8, 12)  # another batch and another (stride-compatible) spatial size
    with torch.no_grad():
        ref = model(x)
    got = OnnxBackend(path, threads=1)(x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-4


class _SizeBound(nn.Module):
    """A network tied to its input size: a linear layer over all voxels (like a fixed-size attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.mix = nn.Linear(16 * 16 * 8, 16 * 16 * 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.mix(y.flatten(2)).reshape(y.shape)


def test_spatial_axes_stay_fixed_where_the_network_does_not_allow_them(tmp_path: Path) -> None:
    model = _SizeBound().eval()
    path = ex.export_onnx(model, SHAPE, tmp_path / "m.onnx")
    assert json.loads(ex.onnx_metadata(path)["dynamic_spatial"]) is False
    check = ex.verify_export(model, path, SHAPE)
    assert check.passed, check.summary()  # batch stays dynamic
    with pytest.raises(InputError, match=r"input of shape \[1, 1, 32, 16, 8\].*Got: 32 Expected: 16"):
        OnnxBackend(path, threads=1)(torch.randn(1, 1, 32, 16, 8))


def test_torchscript_export_matches_pytorch_with_dynamic_batch(tmp_path: Path) -> None:
    model = tiny_unet()
    path = ex.export_torchscript(model, SHAPE, tmp_path / "m.ts")
    check = ex.verify_export(model, path, SHAPE, real_inputs=[structured_input()])
    assert check.format == "torchscript"
    assert check.passed and check.max_abs_diff <= 1e-5, check.summary()
    extra = {"medlens.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["medlens.json"])["example_shape"] == list(SHAPE)


def test_verify_export_catches_a_file_from_other_weights(tmp_path: Path) -> None:
    path = ex.export_onnx(tiny_unet(seed=0), SHAPE, tmp_path / "m.onnx")
    check = ex.verify_export(tiny_unet(seed=1), path, SHAPE)
    assert not check.passed
    assert check.max_abs_diff > 100 * check.tolerance
    assert "DOES NOT match" in check.summary()


def test_bad_opset_and_shape_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="opset 7 is not supported"):
        ex.export_onnx(tiny_unet(), SHAPE, tmp_path / "m.onnx", opset=7)
    with pytest.raises(InputError, match=r"example shape \[1, 16, 16\]"):
        ex.export_onnx(tiny_unet(), (1, 16, 16), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ---- runs and the command line -------------------------------------------------------------------------------------
def test_export_run_writes_verified_files_atomically(tiny_run: Path, tmp_path: Path) -> None:
    results = run_export.export_run(tiny_run, "torchscript", out_dir=tmp_path / "out")
    assert [r.path.name for r in results] == ["fold_0.ts"]
    check = results[0].check
    assert check.passed and check.real_inputs >= 1  # real patches come from the run's preprocessed cache
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fold_0.ts"]  # no temporary left


def test_export_run_leaves_no_file_when_the_check_fails(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "fold_0.onnx").write_bytes(b"the previous good export")
    real_verify = ex.verify_export

    def failing(*args: object, **kwargs: object) -> ex.ExportCheck:
        check = real_verify(*args, **kwargs)  # type: ignore[arg-type]
        check.inputs[0].max_abs_diff = 1.0
        return check

    monkeypatch.setattr(run_export, "verify_export", failing)
    with pytest.raises(MedlensError, match="does not match PyTorch"):
        run_export.export_run(tiny_run, "onnx", out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["fold_0.onnx"]
    assert (out / "fold_0.onnx").read_bytes() == b"the previous good export"


def test_cli_export_writes_the_file_and_a_bad_format_suggests(tiny_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medlens.cli import app

    result = CliRunner().invoke(app, ["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "matches PyTorch" in result.output and (tmp_path / "fold_0.onnx").is_file()
    probs = OnnxBackend(tmp_path / "fold_0.onnx", threads=1)(torch.zeros(1, 1, 16, 16, 12)).softmax(1)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)

    bad = subprocess.run(
        [sys.executable, "-m", "medlens.cli", "export", str(tiny_run), "--format", "onx"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Did you mean 'onnx'?" in lines[0] and "torchscript" in lines[0], bad.stderr
