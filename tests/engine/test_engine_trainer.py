"""The fit loop: learns tiny tasks, resumes exactly, stops early keeping the best, fails clearly."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_tiny_tasks import BlobsTask, SquaresTask
from safetensors.torch import load_file
from torch import nn

from medlens.engine import Hook, Trainer, TrainResult, load_weights, read_metadata, seed_everything
from medlens.errors import RunError, TrainingError
from medlens.models import create_model

FAST = {"threads": 1, "precision": "fp32", "checkpoint_seconds": None, "optimizer": {"lr": 0.01}}


def unet(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return create_model(
        {"name": "test_unet", "dropout": dropout}, spatial_dims=2, in_channels=1, out_channels=2
    )


def classifier(seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return create_model({"name": "test_classifier"}, spatial_dims=2, in_channels=1, out_channels=2)


def test_segmentation_beats_chance_and_writes_the_run_dir(tmp_path: Path) -> None:
    task = SquaresTask()
    truth = task.val_labels
    p = float(truth.float().mean())
    chance = 2 * p / (1 + p)  # Dice of calling everything foreground
    cfg = {**FAST, "precision": "auto", "iterations": 60, "val_every": 20, "log_every": 20}
    result = Trainer(unet(), task, cfg, tmp_path, progress=True).fit()

    assert result.iterations == 60 and not result.stopped_early
    assert result.best_score is not None and result.best_score > max(0.75, chance + 0.4)
    assert [v["iteration"] for v in result.history["val"]] == [20, 40, 60]
    assert [t["iteration"] for t in result.history["train"]] == [20, 40, 60]
    assert result.history["train"][-1]["loss"] < result.history["train"][0]["loss"]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "last.safetensors", "optimizer.safetensors", "trainer_state.json"} <= names
    assert {"config.json", "versions.json", "history.json", "tb"} <= names
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["precision"] in ("bf16", "fp32") and config["threads"] == 1
    versions = json.loads((tmp_path / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["device"] == "cpu"
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["iteration"] == 60 and len(state["rng"]) == 1 and len(state["rng"][0]["torch"]) > 100
    assert json.loads((tmp_path / "history.json").read_text()) == result.history
    meta = read_metadata(result.weights)
    assert meta["iteration"] == result.best_iteration and meta["score"] == pytest.approx(result.best_score)


def test_classification_beats_chance(tmp_path: Path) -> None:
    cfg = {**FAST, "iterations": 60, "val_every": 20}
    result = Trainer(classifier(), BlobsTask(), cfg, tmp_path, progress=False).fit()
    assert result.best_score is not None and result.best_score >= 0.9  # chance is 0.5


class StopAt(Hook):
    """Simulates a crash right after the checkpoint at ``iteration``."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_checkpoint(self, trainer: Trainer, iteration: int) -> None:
        if iteration == self.iteration:
            raise KeyboardInterrupt(f"killed after checkpoint {iteration}")


def test_resume_gives_exactly_the_uninterrupted_weights(tmp_path: Path) -> None:
    cfg = {**FAST, "iterations": 30, "val_every": 10, "checkpoint_every": 10, "log_every": 5, "seed": 3}
    straight = Trainer(unet(dropout=0.2), SquaresTask(), cfg, tmp_path / "a", progress=False).fit()

    with pytest.raises(KeyboardInterrupt):
        Trainer(
            unet(dropout=0.2), SquaresTask(), cfg, tmp_path / "b", hooks=[StopAt(20)], progress=False
        ).fit()
    assert json.loads((tmp_path / "b" / "trainer_state.json").read_text())["iteration"] == 20
    torch.rand(100)  # disturb the global RNG: resume must restore it
    resumed = Trainer(unet(dropout=0.2, seed=99), SquaresTask(), cfg, tmp_path / "b", progress=False).fit(
        resume=True
    )

    for name in ("last.safetensors", "model.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed.best_score == straight.best_score and resumed.best_iteration == straight.best_iteration
    assert resumed.history["val"] == straight.history["val"]
    losses = [(t["iteration"], t["loss"]) for t in straight.history["train"]]
    assert [(t["iteration"], t["loss"]) for t in resumed.history["train"]] == losses


def test_existing_run_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    cfg = {**FAST, "iterations": 2, "val_every": None}
    Trainer(unet(), SquaresTask(), cfg, tmp_path, progress=False).fit()
    with pytest.raises(RunError, match=r"already holds a training run .*iteration 2"):
        Trainer(unet(), SquaresTask(), cfg, tmp_path, progress=False).fit()
    again = Trainer(unet(), SquaresTask(), cfg, tmp_path, progress=False).fit(resume=True)  # finished: no-op
    assert again.iterations == 2


class ScriptedScores(SquaresTask):
    """Validation scores follow a script, so early stopping has a known answer."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = iter(scores)

    def validate(self, model: nn.Module) -> dict[str, float]:
        return {"dice": next(self.scores)}


class KeepImproved(Hook):
    def __init__(self) -> None:
        self.best: dict[str, torch.Tensor] = {}

    def on_validation_end(
        self, trainer: Trainer, iteration: int, metrics: dict[str, float], improved: bool
    ) -> None:
        if improved:
            self.best = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_early_stopping_stops_and_keeps_the_best(tmp_path: Path) -> None:
    task = ScriptedScores([0.2, 0.5, 0.4, 0.45, 0.3, 0.9, 0.9])
    keep = KeepImproved()
    cfg = {**FAST, "iterations": 35, "val_every": 5, "early_stopping_patience": 3}
    model = unet()
    result = Trainer(model, task, cfg, tmp_path, hooks=[keep], progress=False).fit()

    assert result.stopped_early and result.iterations == 25  # 0.4, 0.45, 0.3: three without improvement
    assert (result.best_score, result.best_iteration) == (0.5, 10)
    for key, value in model.state_dict().items():  # the model holds the best weights again
        torch.testing.assert_close(value, keep.best[key], rtol=0, atol=0)
    restored = unet(seed=5)
    load_weights(restored, result.weights)
    torch.testing.assert_close(restored.state_dict(), keep.best, rtol=0, atol=0)
    last = load_file(tmp_path / "last.safetensors")
    assert any(not torch.equal(last[k], keep.best[k]) for k in last)
    resumed = Trainer(unet(), task, cfg, tmp_path, progress=False).fit(resume=True)
    assert resumed.stopped_early and resumed.iterations == 25


def test_head_only_training_leaves_the_backbone_untouched(tmp_path: Path) -> None:
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {**FAST, "iterations": 5, "val_every": None, "param_groups": {"trainable": "head"}}
    Trainer(model, BlobsTask(), cfg, tmp_path, progress=False).fit()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("fc."))
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


class Broken(SquaresTask):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def batches(self, seed: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        stream = super().batches(seed, start)
        if self.what == "short":
            return (next(stream) for _ in range(3))
        return stream

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().loss(model, batch)
        return loss * math.nan if self.what == "nan" else loss

    def validate(self, model: nn.Module) -> dict[str, Any]:
        return {"accuracy": 1.0} if self.what == "no score" else super().validate(model)


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("nan", "training diverged at iteration 1: the loss is nan"),
        ("short", r"Broken\.batches\(\) ended at iteration 3; it must be an endless stream"),
        ("no score", r"Broken\.validate\(\) returned no 'dice' \(its score_key\); got \['accuracy'\]"),
    ],
)
def test_task_failures_are_training_errors(tmp_path: Path, what: str, message: str) -> None:
    cfg = {**FAST, "iterations": 5, "val_every": 2}
    with pytest.raises(TrainingError, match=message):
        Trainer(unet(), Broken(what), cfg, tmp_path, progress=False).fit()


def test_result_type(tmp_path: Path) -> None:
    result = Trainer(unet(), SquaresTask(), {**FAST, "iterations": 1}, tmp_path, progress=False).fit()
    assert isinstance(result, TrainResult) and result.weights == tmp_path / "model.safetensors"
    assert result.weights.is_file()


class SlowBatches(SquaresTask):
    """Each batch takes 20 ms, so a time limit ends training long before its iteration count."""

    def batches(self, seed: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().batches(seed, start):
            time.sleep(0.02)
            yield batch


def test_time_limit_stops_training_with_validated_best_weights(tmp_path: Path) -> None:
    cfg = {**FAST, "iterations": 10_000, "val_every": 1000, "log_every": 2, "time_limit_seconds": 0.5}
    result = Trainer(unet(), SlowBatches(), cfg, tmp_path, progress=False).fit()
    assert 2 <= result.iterations < 100
    assert result.best_iteration == result.iterations  # the last step was validated before stopping
    # The schedule followed time, not the unreachable 10,000 steps: the learning rate was annealed.
    assert result.history["train"][-1]["lr"] < 0.3 * FAST["optimizer"]["lr"]
    assert (tmp_path / "model.safetensors").is_file()
    again = Trainer(unet(), SlowBatches(), cfg, tmp_path, progress=False).fit(resume=True)
    assert again.iterations == result.iterations  # a run stopped by its time limit is finished
