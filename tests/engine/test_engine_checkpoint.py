"""Weights and checkpoints: exact round trips, clear mismatch errors, and no corruption on a failed write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from medlens.engine import checkpoint as ckpt
from medlens.engine.checkpoint import (
    load_optimizer,
    load_weights,
    read_metadata,
    save_optimizer,
    save_weights,
)
from medlens.errors import RunError


def net(out: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(out))


def built(out: int = 2, seed: int = 0) -> nn.Module:
    model = net(out, seed)
    model(torch.randn(2, 1, 6, 6))  # materialise the lazy layer, update BN statistics
    return model


def assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_weights_round_trip_exactly_with_metadata(tmp_path: Path) -> None:
    a, b = built(seed=0), built(seed=1)
    save_weights(a, tmp_path / "w.safetensors", metadata={"iteration": 7, "score": 0.5})
    report = load_weights(b, tmp_path / "w.safetensors")
    assert report.exact and len(report.loaded) == len(a.state_dict())
    assert_same(a, b)  # parameters and buffers (BN running stats)
    assert read_metadata(tmp_path / "w.safetensors")["iteration"] == 7
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_strict_mismatch_lists_keys_and_shapes(tmp_path: Path) -> None:
    save_weights(built(out=2), tmp_path / "w.safetensors")
    with pytest.raises(
        RunError,
        match=r"2 with other shapes \(3\.bias \[2\] in file vs \[3\] in model, 3\.weight \[2, 64\] in file",
    ):
        load_weights(built(out=3), tmp_path / "w.safetensors")
    other = nn.Sequential()
    other.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(
        RunError, match=r"2 missing \(extra\.weight, extra\.bias\); 9 unexpected \(.* and 4 more\)"
    ):
        load_weights(other, tmp_path / "w.safetensors")


def test_non_strict_loads_the_matching_tensors(tmp_path: Path) -> None:
    src, dst = built(out=2, seed=0), built(out=3, seed=1)
    save_weights(src, tmp_path / "w.safetensors")
    head_before = dst[3].weight.detach().clone()
    report = load_weights(dst, tmp_path / "w.safetensors", strict=False)
    assert set(report.mismatched) == {"3.weight", "3.bias"}
    torch.testing.assert_close(dst[0].weight, src[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(dst[3].weight, head_before, rtol=0, atol=0)


def test_unreadable_weights_are_run_errors(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no such weights file"):
        load_weights(built(), tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not safetensors")
    with pytest.raises(RunError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_weights(built(), tmp_path / "junk.safetensors")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_state_round_trips(tmp_path: Path, name: str) -> None:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        return torch.optim.AdamW(model.parameters(), lr=0.01)

    def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        model(torch.randn(4, 1, 6, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    a = built()
    opt_a = make(a)
    for s in range(3):
        step(a, opt_a, s)
    save_weights(a, tmp_path / "w.safetensors")
    save_optimizer(opt_a, tmp_path / "o.safetensors")
    b = built(seed=5)
    load_weights(b, tmp_path / "w.safetensors")
    opt_b = make(b)
    load_optimizer(opt_b, tmp_path / "o.safetensors")
    for s in range(3, 6):  # continuing either gives the same weights
        step(a, opt_a, s)
        step(b, opt_b, s)
    assert_same(a, b)


def _commit(run: Path, model: nn.Module, iteration: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.write_checkpoint(run, model, opt, {"iteration": iteration, "note": f"it{iteration}"})


def test_failing_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = built(seed=0)
    _commit(tmp_path, first, 10)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")  # after last.safetensors was written into the staging folder

    monkeypatch.setattr(ckpt, "save_optimizer", broken)
    with pytest.raises(OSError, match="disk full"):
        _commit(tmp_path, built(seed=1), 20)
    monkeypatch.undo()
    assert ckpt.read_checkpoint(tmp_path)["iteration"] == 10
    restored = built(seed=3)
    load_weights(restored, tmp_path / ckpt.LAST_WEIGHTS)
    assert_same(first, restored)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_promotion_is_rolled_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _commit(tmp_path, built(seed=0), 10)
    newer = built(seed=1)
    real_replace = os.replace
    moved: list[str] = []

    def crash_after_first_file(src: str | Path, dst: str | Path) -> None:
        if Path(src).parent.name == ".checkpoint.ready" and moved:
            raise KeyboardInterrupt  # killed while moving the committed files into place
        real_replace(src, dst)
        moved.append(str(dst))

    monkeypatch.setattr(ckpt.os, "replace", crash_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        _commit(tmp_path, newer, 20)
    monkeypatch.undo()
    # one file is new, two are old: reading recovers the committed checkpoint as a whole
    state = ckpt.read_checkpoint(tmp_path)
    assert state is not None and state["iteration"] == 20
    restored = built(seed=3)
    load_weights(restored, tmp_path / ckpt.LAST_WEIGHTS)
    assert_same(newer, restored)


def test_mixed_up_checkpoint_files_are_refused(tmp_path: Path) -> None:
    _commit(tmp_path, built(), 10)
    save_weights(built(), tmp_path / ckpt.LAST_WEIGHTS, metadata={"iteration": 99})
    with pytest.raises(RunError, match=r"belongs to iteration 99, but trainer_state\.json expects 10"):
        ckpt.read_checkpoint(tmp_path)
