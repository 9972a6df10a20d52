"""``medlens pretrain``: SimCLR lowers the NT-Xent loss on learnable images, and its run is usable as --init."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medlens.data.importers import import_dataset
from medlens.engine import load_weights, seed_everything
from medlens.errors import InputError
from medlens.models import create_model
from medlens.plan import Plan
from medlens.tasks.medmnist_synthetic import synthetic_medmnist
from medlens.tasks.pretrain import SimCLRTask, build_simclr, nt_xent, pretrain
from medlens.tasks.run import train

TINY = {"name": "test_classifier", "width": 8}
OVERRIDES = {"threads": 1, "precision": "fp32", "memory_gb": 4, "batch_size": 16, "network": TINY}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ssl")
    npz = synthetic_medmnist(
        root / "m.npz",
        classification_type="multiclass",
        num_classes=3,
        size=16,
        n_train=80,
        n_val=16,
        n_test=8,
    )
    import_dataset("medmnist", npz, root / "data")
    res = pretrain(
        root / "data", root / "ssl", budget="1m", iterations=30, val_every=10, measure=False, overrides=OVERRIDES,
        progress=False, device="cpu",
    )  # fmt: skip
    return {"root": root, "result": res}


def test_simclr_lowers_the_held_out_ntxent(ssl_run: dict[str, Any]) -> None:
    out = ssl_run["root"] / "ssl"
    plan = Plan.load(out / "plan.json")
    config = plan.configuration(plan.default_configuration)
    images = np.load(next((out / "cache").rglob("images_*.npy")), mmap_mode="r")
    rng = np.random.default_rng(5)
    rows = rng.permutation(len(images))
    task = SimCLRTask(images, rows[:40], rows[40:], batch_size=16, spatial_dims=2)
    seed_everything(int(config["training"].get("seed", 0)))
    model = build_simclr(config, 1).eval()
    with torch.no_grad():
        before = task.validate(model)["ntxent"]
        load_weights(model, out / "simclr" / "model.safetensors")
        after = task.validate(model)["ntxent"]
    assert after < before - 0.1, (before, after)
    history = ssl_run["result"].history["val"]
    assert ssl_run["result"].best_score == pytest.approx(max(v["neg_ntxent"] for v in history))
    assert ssl_run["result"].iterations == 30


def test_encoder_has_the_classifier_backbone_keys(ssl_run: dict[str, Any]) -> None:
    out = ssl_run["root"] / "ssl"
    info = json.loads((out / "run.json").read_text())
    assert info["task"] == "pretrain" and info["method"] == "simclr"
    encoder = load_file(str(out / info["init_weights"]))
    classifier = create_model(dict(TINY), spatial_dims=2, in_channels=1, out_channels=3).state_dict()
    backbone = {k: tuple(v.shape) for k, v in classifier.items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in encoder.items()} == backbone


def test_pretrain_run_is_usable_as_init_end_to_end(ssl_run: dict[str, Any]) -> None:
    root, out = ssl_run["root"], ssl_run["root"] / "ssl"
    data = json.loads((out / "plan.json").read_text())
    cfg = data["configurations"][data["default_configuration"]]
    cfg["training"].update(iterations=8, val_every=4, checkpoint_every=8)
    cfg["training"]["schedule"]["warmup_iterations"] = 0
    Plan.from_dict(data).save(root / "plan.json")
    train(
        root / "data", root / "plan.json", root / "cls", progress=False, device="cpu",
        options={"init": str(out), "finetune": "head"},
    )  # fmt: skip
    info = json.loads((root / "cls" / "run.json").read_text())
    encoder_file = out / "encoder.safetensors"
    assert info["init"]["sha256"] == hashlib.sha256(encoder_file.read_bytes()).hexdigest()
    encoder = load_file(str(encoder_file))
    trained = load_file(str(root / "cls" / "fold_0" / "model.safetensors"))
    for k, v in encoder.items():
        assert torch.equal(trained[k], v), k
    assert "auc" in info["validation_metrics"]["overall"]


def test_pretrain_refuses_an_existing_run(ssl_run: dict[str, Any]) -> None:
    with pytest.raises(InputError, match="already holds a run"):
        pretrain(ssl_run["root"] / "data", ssl_run["root"] / "ssl", iterations=2, measure=False)


def test_nt_xent_matches_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    sim = (z @ z.T).numpy() / 0.3
    n = 6
    terms = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        terms.append(-sim[i, pos] + np.log(np.exp(sim[i, others]).sum()))
    assert float(nt_xent(z1, z2, 0.3)) == pytest.approx(float(np.mean(terms)), rel=1e-5)
    # matching views of distinct images give a lower loss than unrelated ones
    assert float(nt_xent(z1, z1 + 0.01, 0.3)) < float(nt_xent(z1, z2, 0.3))
