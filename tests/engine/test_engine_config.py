"""TrainConfig: built from the plan's training section, every bad key or value named."""

from __future__ import annotations

import json

import pytest

from medlens.engine import TrainConfig
from medlens.errors import InputError


def test_defaults_and_json_round_trip() -> None:
    d = {
        "iterations": 250,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5},
        "schedule": {"name": "step", "milestones": [100, 200], "gamma": 0.5, "warmup_iterations": 10},
        "val_every": 50,
        "early_stopping_patience": 3,
        "precision": "fp32",
        "param_groups": {"trainable": "head", "lr_multipliers": {"model.0": 0.1}},
    }
    cfg = TrainConfig.from_dict(d)
    assert cfg.optimizer.name == "sgd" and cfg.schedule.milestones == (100, 200)
    assert cfg.checkpoint_every == TrainConfig().checkpoint_every  # untouched keys keep defaults
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"iteratons": 10}, r"training: unknown key 'iteratons'\. Did you mean 'iterations'\?"),
        ({"optimizer": {"lrr": 0.1}}, r"training\.optimizer: unknown key 'lrr'\. Did you mean 'lr'\?"),
        (
            {"optimizer": {"name": "adamww"}},
            r"training\.optimizer\.name: unknown value 'adamww'\. Did you mean 'adamw'",
        ),
        ({"precision": "bf-16"}, r"training\.precision: unknown value 'bf-16'\. Did you mean 'bf16'"),
        ({"optimizer": {"lr": -1}}, r"training\.optimizer\.lr: expected a number > 0\.0, got -1"),
        ({"iterations": True}, r"training\.iterations: expected an integer >= 1, got True"),
        ({"iterations": 10, "schedule": {"warmup_iterations": 10}}, "warmup_iterations: must be smaller"),
        ({"schedule": {"name": "step"}}, "the 'step' schedule needs at least one milestone"),
        ({"schedule": {"name": "step", "milestones": [20, 10]}}, "milestones: must be increasing"),
        ({"optimizer": {"nesterov": 1}}, r"nesterov: expected true or false, got 1"),
        (
            {"param_groups": {"lr_multipliers": {"encoder": -0.5}}},
            r"lr_multipliers\.encoder: expected a number >= 0",
        ),
        ([1, 2], "training: expected a JSON object"),
    ],
)
def test_bad_config_names_the_key(d: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TrainConfig.from_dict(d)  # type: ignore[arg-type]


def test_where_prefixes_messages() -> None:
    with pytest.raises(InputError, match=r"^plan\.json: configurations\.2d\.training\.val_every: "):
        TrainConfig.from_dict({"val_every": 0}, where="plan.json: configurations.2d.training")


def test_optional_keys_accept_null() -> None:
    cfg = TrainConfig.from_dict({"val_every": None, "early_stopping_patience": None, "grad_clip": None})
    assert cfg.val_every is None and cfg.grad_clip is None
