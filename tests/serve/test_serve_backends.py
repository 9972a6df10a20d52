"""Inference backends: ONNX Runtime inside sliding-window inference gives PyTorch's labels; training records which
backend is faster and the predictor follows that record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from medlens.errors import InputError
from medlens.models import create_model
from medlens.serve import export as ex
from medlens.serve import run_export
from medlens.serve.backends import OnnxBackend, TorchBackend, choose_backend, measure_backends
from medlens.tasks.inference import sliding_window_logits


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model({"name": "test_unet"}, spatial_dims=3, in_channels=1, out_channels=3).eval()


def volume(shape: tuple[int, ...] = (22, 19, 13)) -> torch.Tensor:
    """A (1, *shape) volume larger than the window in every axis, with structure (two balls) and noise."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    centre = torch.tensor([s / 2 for s in shape]).view(-1, 1, 1, 1)
    d = ((grid - centre) ** 2).sum(0).sqrt()
    return ((d < 5).float() - (d > 8).float() + 0.2 * torch.randn(shape, generator=gen))[None]


def test_onnx_backend_in_sliding_window_gives_pytorchs_labels(tmp_path: Path) -> None:
    model = tiny_unet()
    path = ex.export_onnx(model, (3, 1, 8, 8, 8), tmp_path / "m.onnx")
    data = volume()
    kwargs = {"overlap": 0.5, "sw_batch_size": 3}  # many windows, and a smaller last batch
    ref = sliding_window_logits(model, data, [8, 8, 8], **kwargs)  # type: ignore[arg-type]
    got = sliding_window_logits(OnnxBackend(path, threads=1), data, [8, 8, 8], **kwargs)  # type: ignore[arg-type]
    assert got.shape == ref.shape == (3, *data.shape[1:])
    assert float((got - ref).abs().max()) < 1e-5
    assert torch.equal(got.argmax(0), ref.argmax(0))
    assert len(torch.unique(ref.argmax(0))) > 1  # the comparison is not between two constant maps
    mirrored = sliding_window_logits(OnnxBackend(path, threads=1), data, [8, 8, 8], mirror_axes=[0, 2])
    assert (
        float((mirrored - sliding_window_logits(model, data, [8, 8, 8], mirror_axes=[0, 2])).abs().max())
        < 1e-5
    )


def test_onnx_session_uses_all_cores_and_full_graph_optimisation(tmp_path: Path) -> None:
    from medlens.engine.runtime import available_cores

    path = ex.export_onnx(tiny_unet(), (1, 1, 8, 8, 8), tmp_path / "m.onnx")
    backend = OnnxBackend(path)
    options = backend.session.get_session_options()
    assert backend.threads == options.intra_op_num_threads == available_cores()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert backend.provider == "CPUExecutionProvider" and backend.device.type == "cpu"
    assert OnnxBackend(path, threads=1, allow_spinning=False).threads == 1
    with pytest.raises(InputError, match="threads must be a positive integer"):
        OnnxBackend(path, threads=0)


def test_torch_backend_fp32_is_the_model_and_bf16_is_close() -> None:
    model = tiny_unet()
    x = volume((16, 16, 8))[None]
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(TorchBackend(model, "fp32")(x), ref)
    bf16 = TorchBackend(model, "bf16")(x)
    assert bf16.dtype == torch.float32 and float((bf16 - ref).abs().max()) < 0.1
    with pytest.raises(InputError, match="Did you mean 'bf16'"):
        TorchBackend(model, "bf61")


def test_measure_backends_times_each_variant_and_compares_outputs(tmp_path: Path) -> None:
    model = tiny_unet()
    path = ex.export_onnx(model, (2, 1, 8, 8, 8), tmp_path / "m.onnx")
    m = measure_backends(
        model,
        volume(),
        [8, 8, 8],
        onnx_path=path,
        precision="bf16",
        repeats=2,
        min_seconds=0.0,
        onnx_threads=(None, 1),
    )
    assert set(m.seconds) == {"torch_fp32", "torch_bf16", "onnx_fp32", "onnx_fp32_1t"}
    assert all(len(v) == 2 and min(v) > 0 for v in m.runs.values())
    assert m.max_abs_diff < 1e-5 and m.argmax_agreement == 1.0 and m.dice == 1.0
    assert m.choice in ("onnx", "torch") and m.reason
    record = m.to_json()
    assert record["seconds"].keys() == m.seconds.keys() and record["rounds"] == 2


def test_measurement_refuses_onnx_that_disagrees(tmp_path: Path) -> None:
    path = ex.export_onnx(tiny_unet(seed=1), (2, 1, 8, 8, 8), tmp_path / "other.onnx")  # other weights
    m = measure_backends(tiny_unet(seed=0), volume(), [8, 8, 8], onnx_path=path, repeats=1, min_seconds=0.0)
    assert m.argmax_agreement < 0.999 and m.choice == "torch" and "disagrees" in m.reason


def test_choice_rule_needs_onnx_faster_and_in_agreement() -> None:
    fast = {"torch_bf16": 2.0, "torch_fp32": 3.0, "onnx_fp32": 1.0}
    assert choose_backend(fast, "bf16", 1.0, 1.0)[0] == "onnx"
    assert "2.00x faster" in choose_backend(fast, "bf16", 1.0, 1.0)[1]
    assert choose_backend(fast, "bf16", 0.9989, 1.0)[0] == "torch"  # agreement below 0.999
    assert choose_backend(fast, "bf16", 1.0, 0.998)[0] == "torch"  # Dice below 0.999
    slow = {"torch_bf16": 0.5, "torch_fp32": 3.0, "onnx_fp32": 1.0}
    assert choose_backend(slow, "bf16", 1.0, 1.0)[0] == "torch"  # slower than the precision torch would use


# ---- the run and the predictor -------------------------------------------------------------------------------------
def test_training_records_the_measured_backend_and_exports_the_fold(tiny_run: Path) -> None:
    info = json.loads((tiny_run / "run.json").read_text())
    record = info["inference_backend"]
    assert record["choice"] in ("onnx", "torch")
    assert {"torch_fp32", "onnx_fp32"} <= set(record["seconds"])
    assert record["argmax_agreement"] >= 0.999 and record["max_abs_diff"] < 1e-4
    assert record["case"] in info["fold_results"]["0"]["val_cases"]
    onnx_file = tiny_run / record["onnx_file"]
    assert ex.onnx_metadata(onnx_file)["weights_sha256"] == ex.file_sha256(
        tiny_run / "fold_0" / "model.safetensors"
    )


def test_predictor_follows_the_recorded_choice_and_backends_agree(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    from medlens.io import read_image
    from medlens.serve import load_predictor
    from medlens.serve.predictor import Predictor

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("cache"))
    info = json.loads((run / "run.json").read_text())
    for choice in ("onnx", "torch"):
        info["inference_backend"]["choice"] = choice
        (run / "run.json").write_text(json.dumps(info))
        assert Predictor.from_run(run).backend == choice
    info["inference_backend"].update(choice="onnx", device="cuda:0")  # measured on another kind of device
    (run / "run.json").write_text(json.dumps(info))
    assert Predictor.from_run(run).backend == "torch"

    image = read_image(Path(info["dataset"]["root"]) / "imagesTr" / "case00.nii.gz")
    by_torch = Predictor.from_run(run, backend="torch").predict(image, probabilities=True)
    onnx = Predictor.from_run(run, backend="onnx")
    assert isinstance(onnx.models[0], OnnxBackend) and onnx.precision == "fp32"
    by_onnx = onnx.predict(image, probabilities=True)
    assert np.array_equal(by_onnx.label.array, by_torch.label.array)
    assert by_onnx.probabilities is not None and by_torch.probabilities is not None
    assert np.abs(by_onnx.probabilities.array - by_torch.probabilities.array).max() < 1e-4
    with pytest.raises(InputError, match="Did you mean 'onnx'"):
        load_predictor(run, backend="onx")


def test_a_stale_onnx_file_is_exported_again(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    from medlens.engine import save_weights

    fold = tmp_path / "fold_0"
    shutil.copytree(tiny_run / "fold_0", fold)
    model = run_export.fold_model(json.loads((tiny_run / "run.json").read_text()), _config(tiny_run), fold)
    shape = (1, 1, 16, 16, 12)
    before = ex.onnx_metadata(run_export.onnx_for_fold(fold, model, shape))["weights_sha256"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    save_weights(model, fold / "model.safetensors")  # the fold was trained further
    path = run_export.onnx_for_fold(fold, model, shape)
    assert ex.onnx_metadata(path)["weights_sha256"] == ex.file_sha256(fold / "model.safetensors") != before
    x = volume((16, 16, 12))[None]
    with torch.no_grad():
        assert float((OnnxBackend(path, threads=1)(x) - model(x)).abs().max()) < 1e-4


def _config(run: Path) -> dict[str, object]:
    from medlens.plan.plan import Plan

    info = json.loads((run / "run.json").read_text())
    return dict(Plan.load(run / "plan.json").configuration(info["configuration"]))
