"""``medlens train --init``: resolving the source, loading what fits, fine-tuning policies, run.json record."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from medlens.data.fingerprint import compute_fingerprint
from medlens.data.importers import import_dataset
from medlens.engine import TrainConfig, save_weights, seed_everything
from medlens.engine.optim import build_optimizer
from medlens.errors import InputError, RunError
from medlens.models import create_model
from medlens.plan import Plan
from medlens.plan.planner import make_plan
from medlens.tasks.medmnist_synthetic import synthetic_medmnist
from medlens.tasks.run import train
from medlens.tasks.transfer import backbone_prefixes, finetune_groups, initialise, resolve_init

TINY = {"name": "test_classifier", "width": 8}
OVERRIDES = {"threads": 1, "precision": "fp32", "memory_gb": 4, "batch_size": 16, "network": TINY}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _scrambled(out_channels: int, seed: int) -> nn.Module:
    """A tiny classifier whose every tensor holds recognisable random values."""
    model = create_model(dict(TINY), spatial_dims=2, in_channels=1, out_channels=out_channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A learnable binary dataset, a tiny plan, and 3-class weights (a head that does not fit)."""
    root = tmp_path_factory.mktemp("init")
    npz = synthetic_medmnist(
        root / "b.npz", classification_type="binary", num_classes=2, size=16, n_train=64, n_val=16, n_test=8
    )
    ds = import_dataset("medmnist", npz, root / "data")
    plan = make_plan(
        compute_fingerprint(ds), task="classification", budget="1m", device="cpu", measure=False,
        overrides={**OVERRIDES, "iterations": 12},
    )  # fmt: skip
    data = plan.to_dict()
    data["configurations"][plan.default_configuration]["training"].update(val_every=6, checkpoint_every=12)
    Plan.from_dict(data).save(root / "plan.json")
    weights = save_weights(_scrambled(3, seed=1), root / "three_class.safetensors")
    return {"root": root, "data": root / "data", "plan": root / "plan.json", "weights": weights}


def test_initialise_loads_matching_tensors_and_names_the_reinitialised_head(
    binary: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    saved = load_file(str(binary["weights"]))
    model = create_model(dict(TINY), spatial_dims=2, in_channels=1, out_channels=2)
    fresh_fc = model.fc.weight.detach().clone()
    with caplog.at_level(logging.INFO):
        report = initialise(model, binary["weights"])
    state = model.state_dict()
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert sorted(report.loaded) == sorted(backbone)
    for k in backbone:
        assert torch.equal(state[k], saved[k]), k
    assert set(report.mismatched) == {"fc.weight", "fc.bias"}
    assert torch.equal(model.fc.weight, fresh_fc)  # the head kept its fresh initialisation
    lines = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "fc.weight" in lines[0] and "fc.bias" in lines[0] and "[3, 16]->[2, 16]" in lines[0]
    assert not [r for r in caplog.records if "partially loaded" in r.getMessage()]


def test_initialise_refuses_weights_of_another_network(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Linear(4, 3))
    path = save_weights(other, tmp_path / "other.safetensors")
    model = create_model(dict(TINY), spatial_dims=2, in_channels=1, out_channels=2)
    with pytest.raises(InputError, match="none of its tensors fits"):
        initialise(model, path)


def test_resolve_init_sources(binary: dict[str, Path], tmp_path: Path) -> None:
    src = resolve_init(binary["weights"])
    assert src.path == binary["weights"]
    assert src.sha256 == hashlib.sha256(binary["weights"].read_bytes()).hexdigest()
    fold = tmp_path / "fold_3"
    fold.mkdir()
    (fold / "model.safetensors").write_bytes(binary["weights"].read_bytes())
    assert resolve_init(fold).path == fold / "model.safetensors"
    with pytest.raises(InputError, match="no such file"):
        resolve_init(tmp_path / "missing")
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(InputError, match=r"not a \.safetensors"):
        resolve_init(tmp_path / "w.pt")
    with pytest.raises(InputError, match="neither a medlens run"):
        resolve_init(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"medlens_run": 1, "folds": []}))
    with pytest.raises(RunError, match="no trained fold"):
        resolve_init(tmp_path)


def test_lr_multipliers_put_the_backbone_at_a_tenth() -> None:
    model = create_model(dict(TINY), spatial_dims=2, in_channels=1, out_channels=2)
    groups = finetune_groups(model, "full", 0.1)
    config = TrainConfig.from_dict(
        {"iterations": 10, "optimizer": {"name": "adamw", "lr": 1e-3}, "param_groups": groups}
    )
    opt = build_optimizer(model, config)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(opt.param_groups) == 5  # conv1, norm1, conv2, norm2 at x0.1, and the head
    for name, p in model.named_parameters():
        want = 1e-3 if name.startswith("fc.") else 1e-4
        assert lr_of[id(p)] == pytest.approx(want), name
    assert finetune_groups(model, "full", 1.0)["lr_multipliers"] == {}
    with pytest.raises(InputError, match="--finetune 'probe'"):
        finetune_groups(model, "probe", 0.1)
    with pytest.raises(InputError, match="--backbone-lr"):
        finetune_groups(model, "full", 0.0)


def test_backbone_prefixes_descend_into_a_module_holding_the_head() -> None:
    model = nn.Sequential()
    model.add_module("features", nn.Conv2d(1, 4, 3))
    layers = nn.Sequential()
    layers.add_module("norm", nn.BatchNorm1d(4))
    layers.add_module("relu", nn.ReLU())
    layers.add_module("out", nn.Linear(4, 2))
    model.add_module("class_layers", layers)
    assert backbone_prefixes(model, ("class_layers.out",)) == ["features", "class_layers.norm"]


def _train(binary: dict[str, Path], out: Path, options: dict[str, Any]) -> dict[str, Any]:
    train(binary["data"], binary["plan"], out, progress=False, device="cpu", options=options)
    return dict(json.loads((out / "run.json").read_text()))


def test_head_policy_trains_only_the_head_and_run_json_records_the_source(binary: dict[str, Path]) -> None:
    info = _train(binary, binary["root"] / "head", {"init": str(binary["weights"]), "finetune": "head"})
    init = info["init"]
    assert init["sha256"] == hashlib.sha256(binary["weights"].read_bytes()).hexdigest()
    assert Path(init["weights"]) == binary["weights"].resolve() and init["finetune"] == "head"
    saved = load_file(str(binary["weights"]))
    after = load_file(str(binary["root"] / "head" / "fold_0" / "model.safetensors"))
    for k in saved:
        if not k.startswith("fc."):
            assert torch.equal(after[k], saved[k]), f"{k} changed under --finetune head"
    # the head did train: it is no longer the fresh head the same seed builds
    plan = json.loads(binary["plan"].read_text())
    seed_everything(int(plan["configurations"]["2d"]["training"].get("seed", 0)))
    fresh = create_model(dict(TINY), spatial_dims=2, in_channels=1, out_channels=2).state_dict()
    assert not torch.allclose(after["fc.weight"], fresh["fc.weight"])
    assert info["fold_results"]["0"]["iterations"] == 12


def test_full_policy_from_a_run_changes_the_backbone(binary: dict[str, Path]) -> None:
    first = binary["root"] / "head"
    if not (first / "run.json").is_file():
        _train(binary, first, {"init": str(binary["weights"]), "finetune": "head"})
    src = load_file(str(first / "fold_0" / "model.safetensors"))
    info = _train(
        binary, binary["root"] / "full", {"init": str(first), "finetune": "full", "backbone_lr": 0.5}
    )
    assert Path(info["init"]["weights"]) == (first / "fold_0" / "model.safetensors").resolve()
    after = load_file(str(binary["root"] / "full" / "fold_0" / "model.safetensors"))
    assert set(after) == set(src)
    assert not torch.equal(after["conv1.weight"], src["conv1.weight"])  # the backbone trained too
    # ... but started from the run: it is far closer to it than to a fresh initialisation
    fresh = create_model(dict(TINY), spatial_dims=2, in_channels=1, out_channels=2).state_dict()[
        "conv1.weight"
    ]
    assert (after["conv1.weight"] - src["conv1.weight"]).norm() < (after["conv1.weight"] - fresh).norm()


def test_cli_train_checks_init_before_writing_anything(binary: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from medlens.cli import app

    args = ["train", str(binary["data"]), "--plan", str(binary["plan"]), "--out", str(binary["root"] / "cli")]
    r = CliRunner().invoke(app, [*args, "--init", str(binary["root"] / "nothing"), "--device", "cpu"])
    assert isinstance(r.exception, InputError) and "no such file" in str(r.exception)
    r = CliRunner().invoke(app, [*args, "--init", str(binary["weights"]), "--finetune", "probe"])
    assert isinstance(r.exception, InputError) and "--finetune 'probe'" in str(r.exception)
    assert not (binary["root"] / "cli").exists()  # refused before anything was written


def test_frozen_backbone_keeps_its_batch_norm_statistics() -> None:
    from medlens.tasks.transfer import freeze_norm_statistics

    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(1, 4, 3))
    model.add_module("bn", nn.BatchNorm2d(4))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("fc", nn.Linear(4, 2))
    model.add_module("head_bn", nn.BatchNorm1d(2))
    assert freeze_norm_statistics(model, ("fc", "head_bn")) == 1
    before = model.bn.running_mean.clone()
    x = torch.randn(8, 1, 8, 8) + 3.0
    out = model.train()(x)
    assert torch.equal(model.bn.running_mean, before)
    assert not torch.equal(model.head_bn.running_mean, torch.zeros(2))  # the head's still update
    # the frozen layer normalises with its stored statistics, as at inference: one image's features do not
    # depend on the rest of the batch
    assert not model.bn.training and model.head_bn.training
    feats = model.bn(model.conv(x))
    assert torch.allclose(feats[:1], model.bn(model.conv(x[:1])), atol=1e-6)
    assert out.shape == (8, 2)
