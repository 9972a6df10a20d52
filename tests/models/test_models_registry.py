"""Model registry: every network builds for its dimensions with the right output shape; bad specs fail early."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medlens.errors import InputError
from medlens.models import (
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
    resolve_spec,
)

#: Small enough to build and run in milliseconds; every registered model must appear here.
TINY: dict[str, dict] = {
    "unet": {"channels": [4, 8, 16], "strides": [2, 2]},
    "basicunet": {"features": [4, 4, 8, 8, 16, 4]},
    "dynunet": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": [4, 8, 16]},
    "segresnet": {"init_filters": 4, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
    "test_unet": {},
    "resnet18": {"widen_factor": 0.125},
    "resnet34": {"widen_factor": 0.125},
    "resnet50": {"widen_factor": 0.0625},
    "densenet121": {"init_features": 4, "growth_rate": 4},
    "efficientnet-b0": {},
    "test_classifier": {},
}
CASES = [(name, dims) for name in sorted(TINY) for dims in (2, 3)]


def test_tiny_specs_cover_the_registry() -> None:
    assert sorted(TINY) == list_models()
    assert set(list_models("segmentation")) == {"unet", "basicunet", "dynunet", "segresnet", "test_unet"}
    assert all(model_info(n).task == "classification" for n in list_models("classification"))


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_model_builds_and_has_the_right_output_shape(name: str, dims: int) -> None:
    info = model_info(name)
    assert dims in info.spatial_dims
    model = create_model({"name": name, **TINY[name]}, spatial_dims=dims, in_channels=2, out_channels=3)
    x = torch.randn(2, 2, *([32] * dims))
    with torch.no_grad():
        y = model.eval()(x)
    expected = (2, 3, *x.shape[2:]) if info.task == "segmentation" else (2, 3)
    assert tuple(y.shape) == expected
    assert torch.isfinite(y).all()
    # the declared head names real parameters, and holds only a small part of the network
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if any(n == h or n.startswith(h + ".") for h in model.medlens_head)]
    assert head and len(head) < len(names)
    # the attached spec rebuilds the same architecture
    spec = dict(model.medlens_spec)
    kw = {k: spec.pop(k) for k in ("spatial_dims", "in_channels", "out_channels")}
    assert count_parameters(create_model(spec, **kw)) == count_parameters(model)


@pytest.mark.parametrize(
    ("name", "dims"), [("test_unet", 2), ("unet", 3), ("resnet18", 2), ("efficientnet-b0", 2)]
)
def test_dropout_is_active_in_train_mode_only(name: str, dims: int) -> None:
    torch.manual_seed(0)
    model = create_model(
        {"name": name, **TINY[name], "dropout": 0.5}, spatial_dims=dims, in_channels=1, out_channels=2
    )
    x = torch.randn(2, 1, *([32 if dims == 2 else 16] * dims))
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))
        model.eval()
        torch.testing.assert_close(model(x), model(x))


def test_resnet_dropout_keeps_plain_linear_parameter_names() -> None:
    plain = create_model(
        {"name": "resnet18", "widen_factor": 0.125}, spatial_dims=2, in_channels=1, out_channels=2
    )
    drop = create_model(
        {"name": "resnet18", "widen_factor": 0.125, "dropout": 0.3},
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
    )
    assert plain.state_dict().keys() == drop.state_dict().keys()


def test_unknown_model_name_suggests_the_closest() -> None:
    with pytest.raises(InputError, match=r"unknown model 'unte'\. Did you mean 'unet'\?"):
        create_model({"name": "unte"}, spatial_dims=2, in_channels=1, out_channels=2)


def test_unknown_spec_key_suggests_the_closest() -> None:
    with pytest.raises(
        InputError, match=r"unknown key 'chanels' in the 'unet' network spec\. Did you mean 'channels'"
    ):
        create_model({"name": "unet", "chanels": [4, 8]}, spatial_dims=2, in_channels=1, out_channels=2)


@pytest.mark.parametrize(
    ("spec", "dims", "message"),
    [
        (
            {"name": "unet", "channels": [4, 8, 16], "strides": [2]},
            2,
            "strides needs len\\(channels\\) - 1 = 2",
        ),
        ({"name": "unet", "norm": "instnce"}, 2, "unknown norm 'instnce'.*Did you mean 'instance'"),
        ({"name": "unet", "kernel_size": 4}, 2, "kernel sizes must be odd, got kernel_size=4"),
        ({"name": "unet", "dropout": 1.5}, 2, "dropout must be a number in \\[0.0, 1.0\\]"),
        ({"name": "unet", "channels": [4, "8"]}, 2, "channels must be a list of integers"),
        (
            {"name": "unet", "strides": [[2, 2], [2, 2, 2], 2]},
            2,
            "strides\\[1\\] must be a list of 2 integers",
        ),
        ({"name": "basicunet", "features": [4, 4, 8]}, 2, "features must be a list of 6 integers"),
        ({"name": "dynunet", "kernel_size": [3, 3], "strides": [1, 2, 2]}, 3, "one entry per level"),
        ({"name": "unet"}, 4, "supports spatial_dims 2 or 3, got 4"),
        ({"channels": [4, 8]}, 2, "no model 'name'"),
    ],
)
def test_bad_spec_values_raise_input_errors(spec: dict, dims: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        create_model(spec, spatial_dims=dims, in_channels=1, out_channels=2)


def test_resolve_spec_fills_defaults() -> None:
    spec = resolve_spec({"name": "unet", "channels": [8, 16]})
    assert spec["channels"] == [8, 16]
    assert spec["strides"] == [2, 2, 2] and spec["num_res_units"] == 0 and spec["dropout"] == 0.0


def test_count_parameters_counts_shared_and_trainable() -> None:
    lin = nn.Linear(3, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # the same layer twice
    assert count_parameters(model) == 3 * 4 + 4
    lin.bias.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 12


def test_register_model_rejects_kwargs_builders() -> None:
    with pytest.raises(TypeError, match="keyword-only"):

        @register_model("bad_model", task="segmentation")
        def bad(*, spatial_dims: int, in_channels: int, out_channels: int, **extra: object) -> nn.Module:
            return nn.Identity()

    assert "bad_model" not in list_models()
