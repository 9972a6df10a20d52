"""Learning-rate schedules and parameter groups (the fine-tuning hook)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from medlens.engine.config import ParamGroupsConfig, ScheduleConfig, TrainConfig
from medlens.engine.optim import apply_lr, build_optimizer, build_param_groups, lr_factor
from medlens.errors import InputError


def test_warmup_then_poly_decays_to_near_zero() -> None:
    s = ScheduleConfig(name="poly", warmup_iterations=4, power=0.9)
    f = [lr_factor(s, i, 100) for i in range(100)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4] == 1.0
    assert all(a > b for a, b in itertools.pairwise(f[4:]))
    assert 0 < f[-1] < 0.05
    assert f[52] == pytest.approx((1 - 48 / 96) ** 0.9)


def test_cosine_step_constant() -> None:
    cos = ScheduleConfig(name="cosine")
    assert lr_factor(cos, 0, 100) == 1.0
    assert lr_factor(cos, 50, 100) == pytest.approx(0.5)
    step = ScheduleConfig(name="step", milestones=(10, 20), gamma=0.1)
    assert [lr_factor(step, i, 30) for i in (9, 10, 19, 20)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert lr_factor(ScheduleConfig(name="constant"), 77, 100) == 1.0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


def test_lr_multipliers_longest_prefix_wins_and_zero_freezes() -> None:
    net = Net()
    spec = ParamGroupsConfig(lr_multipliers={"encoder": 0.1, "encoder.1": 0.0})
    groups = build_param_groups(net, spec, lr=1.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["encoder"]["lr"] == pytest.approx(0.1)
    assert by_name["default"]["lr"] == 1.0
    assert {id(p) for p in by_name["encoder"]["params"]} == {id(p) for p in net.encoder[0].parameters()}
    assert not any(p.requires_grad for p in net.encoder[1].parameters())


def test_trainable_head_freezes_the_rest() -> None:
    net = Net()
    groups = build_param_groups(net, ParamGroupsConfig(trainable="head"), lr=1e-3, head=("head",))
    assert sum(len(g["params"]) for g in groups) == 2
    assert all(p.requires_grad for p in net.head.parameters())
    assert not any(p.requires_grad for p in net.encoder.parameters())


def test_param_group_errors() -> None:
    with pytest.raises(
        InputError, match=r"'encodr' matches no parameter of the model\. Did you mean 'encoder"
    ):
        build_param_groups(Net(), ParamGroupsConfig(lr_multipliers={"encodr": 0.1}), lr=1.0)
    with pytest.raises(InputError, match="declares no head"):
        build_param_groups(Net(), ParamGroupsConfig(trainable="head"), lr=1.0)


def test_build_optimizer_and_apply_lr() -> None:
    net = Net()
    cfg = TrainConfig.from_dict({"optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True}})
    opt = build_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]
    assert apply_lr(opt, 0.5) == [0.005]
    adam = build_optimizer(net, TrainConfig.from_dict({"optimizer": {"name": "adam", "betas": [0.5, 0.9]}}))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.5, 0.9)
    assert not math.isnan(adam.param_groups[0]["lr"])
