"""Budgets, network topology and step costing."""

from __future__ import annotations

import math

import pytest

from medlens.errors import InputError
from medlens.plan import parse_budget
from medlens.plan.budget import format_seconds, time_training_step, trace_cost
from medlens.plan.topology import features_per_stage, pool_topology, unet_spec


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2.5h", 9000),
        ("45 min", 2700),
        ("600", 600),
        (30, 30),
    ],
)
def test_parse_budget(text: str | int, seconds: float) -> None:
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("bad", ["10x", "", "-5m", "0s", "m10", "1h 30q", True])
def test_parse_budget_rejects(bad: object) -> None:
    with pytest.raises(InputError, match="budget"):
        parse_budget(bad)  # type: ignore[arg-type]


def test_format_seconds() -> None:
    assert format_seconds(42) == "42 s" and format_seconds(600) == "10 min" and format_seconds(7200) == "2 h"


def test_topology_isotropic_and_anisotropic() -> None:
    iso = pool_topology([1.0, 1.0, 1.0], [128, 128, 128])
    assert iso.num_pools == 5 and iso.divisor == (32, 32, 32) and iso.patch_size == (128, 128, 128)
    # pooling stops when the feature map would go below 2 x min_edge: 99 -> 49 -> 24 -> 12 -> 6
    odd = pool_topology([2.0, 2.0, 2.0], [99, 117, 95])
    assert odd.divisor == (16, 16, 16) and odd.patch_size == (96, 112, 80)
    # 0.7 x 0.7 x 3 mm: z is pooled only once the in-plane spacing has caught up (nnU-Net)
    aniso = pool_topology([0.7, 0.7, 3.0], [160, 128, 32])
    assert aniso.strides[:2] == ((2, 2, 1), (2, 2, 1)) and aniso.strides[2] == (2, 2, 2)
    assert all(p % d == 0 for p, d in zip(aniso.patch_size, aniso.divisor, strict=True))
    tiny = pool_topology([1.0, 1.0], [6, 6])
    assert tiny.num_pools == 0 and unet_spec(tiny, 8, 16, 0)["strides"] == [1]
    assert features_per_stage(6, 32, 320) == [32, 64, 128, 256, 320, 320]
    spec = unet_spec(aniso, 16, 320, 0)
    assert (
        spec["strides"][0] == [2, 2, 1]
        and spec["strides"][2] == 2
        and len(spec["channels"]) == aniso.num_pools + 1
    )


def test_trace_cost_scales_exactly_with_voxels() -> None:
    spec = unet_spec(pool_topology([1.0, 1.0, 1.0], [32, 32, 32]), 8, 64, 0)
    kw = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3}
    small = trace_cost(spec, patch_size=[32, 32, 32], **kw)
    big = trace_cost(spec, patch_size=[64, 32, 48], **kw)
    scaled = small.scaled([64, 32, 48])
    assert big.flops == pytest.approx(scaled.flops, rel=1e-3)
    assert big.activation_bytes == pytest.approx(scaled.activation_bytes, rel=1e-3)
    assert big.param_bytes == small.param_bytes > 0
    # a residual unit per level costs more than twice the FLOPs (FACTS: ~4x the time on CPU)
    res = trace_cost({**spec, "num_res_units": 2}, patch_size=[32, 32, 32], **kw)
    assert res.flops > 2 * small.flops
    assert small.memory_bytes(4) > small.memory_bytes(2) > 4 * small.param_bytes


def test_time_training_step_is_real() -> None:
    spec = unet_spec(pool_topology([1.0, 1.0], [32, 32]), 4, 16, 0)
    seconds = time_training_step(
        spec,
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        patch_size=[32, 32],
        batch_size=2,
        threads=1,
        steps=2,
    )
    assert 0 < seconds < 5 and math.isfinite(seconds)


def test_tracing_a_classifier_on_a_tiny_image_works() -> None:
    """A ResNet's bottleneck on 16x16 is 1x1: batch norm needs more than one value, so tracing uses batch 2."""
    from medlens.plan.budget import trace_cost

    small = trace_cost(
        {"name": "resnet18"}, spatial_dims=2, in_channels=1, out_channels=2, patch_size=[16, 16]
    )
    large = trace_cost(
        {"name": "resnet18"}, spatial_dims=2, in_channels=1, out_channels=2, patch_size=[32, 32]
    )
    assert small.flops > 0 and 1.5 < large.flops / small.flops < 5.0  # 4x the pixels: more work, at most 4x
