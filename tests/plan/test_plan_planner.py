"""The planning rules on handwritten fingerprints (FLOP model; one test times real steps)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from medlens.errors import PlanError
from medlens.plan import Plan, make_plan

Fp = Callable[..., dict[str, Any]]


def plan(fp: dict[str, Any], budget: str = "10m", **overrides: Any) -> Plan:
    overrides.setdefault("memory_gb", 8)
    return make_plan(fp, task="segmentation", budget=budget, device="cpu", measure=False, overrides=overrides)


def total_stride(network: dict[str, Any], nd: int) -> list[int]:
    out = [1] * nd
    for s in network["strides"]:
        per = list(s) if isinstance(s, list | tuple) else [s] * nd
        out = [a * b for a, b in zip(out, per, strict=True)]
    return out


def test_isotropic_mr_gets_zscore_and_3d_fullres(make_fingerprint: Fp) -> None:
    p = plan(make_fingerprint(spacing=(2.0, 2.0, 2.0), shape=(99, 117, 95)), budget="1h")
    assert p.default_configuration == "3d_fullres"
    assert set(p.configuration_names) == {"2d", "3d_fullres"}
    cfg = p.configuration()
    assert cfg["preprocessing"]["normalization"]["0"] == {"scheme": "zscore", "use_nonzero_mask": False}
    assert cfg["preprocessing"]["target_spacing"] == (2.0, 2.0, 2.0)
    patch = cfg["patch_size"]
    assert all(pt <= m for pt, m in zip(patch, (99, 117, 95), strict=True))  # capped at the median shape
    assert all(pt % s == 0 for pt, s in zip(patch, total_stride(cfg["network"], 3), strict=True))
    assert cfg["batch_size"] >= 2
    assert cfg["network"]["num_res_units"] == 0 and cfg["loss"] == {"name": "dice_ce"}
    assert cfg["inference"]["sw_batch_size"] > 1 and cfg["inference"]["mode"] == "gaussian"
    assert cfg["postprocessing"] == {"largest_component": "auto"}
    train = cfg["training"]
    # iterations fill the budget minus the reserve, and never exceed it
    spent = (
        train["iterations"] * cfg["estimates"]["seconds_per_iteration"] + cfg["estimates"]["reserve_seconds"]
    )
    assert 0.8 * 3600 < spent <= 3600
    assert 1 <= train["val_every"] <= train["iterations"]
    assert any(r.startswith("default configuration: 3d_fullres") for r in p.reasons)
    assert any("num_res_units=0" in r and "4x" in r for r in p.reasons)


def test_mr_cropped_to_nonzero_uses_mask(make_fingerprint: Fp) -> None:
    p = plan(make_fingerprint(spacing=(2.0, 2.0, 2.0), shape=(99, 117, 95), crop=(70, 90, 70)))
    assert p.configuration("3d_fullres")["preprocessing"]["normalization"]["0"]["use_nonzero_mask"] is True


def test_ct_gets_clip_and_dataset_zscore(make_fingerprint: Fp) -> None:
    p = plan(make_fingerprint(spacing=(1.5, 1.5, 1.5), shape=(120, 120, 100), modality="CT"))
    norm = p.configuration("3d_fullres")["preprocessing"]["normalization"]["0"]
    assert norm == {"scheme": "ct", "clip": (-100.0, 250.0), "mean": 40.0, "std": 50.0}
    assert any("CT" in r and "clip" in r for r in p.reasons)


def test_anisotropic_spacing_rule_and_2d(make_fingerprint: Fp) -> None:
    fp = make_fingerprint(spacing=(0.7, 0.7, 5.0), shape=(512, 512, 20), p10=(0.7, 0.7, 3.0), modality="CT")
    p = plan(fp, budget="10m")
    full = p.configuration("3d_fullres")
    assert full["preprocessing"]["target_spacing"] == (0.7, 0.7, 3.0)  # 10th percentile, not the 5 mm median
    assert full["network"]["strides"][0] == (2, 2, 1)  # the coarse axis is not pooled first
    two = p.configuration("2d")
    assert two["sampling"]["slice_axis"] == 2 and two["preprocessing"]["target_spacing"] == (0.7, 0.7, None)
    assert two["augmentation"]["rotation"]["planes"] == ((0, 1),)
    assert full["augmentation"]["rotation"]["planes"] == ((0, 1),)  # in-plane only on anisotropic 3D
    assert p.default_configuration == "2d"
    assert any("anisotropic" in r and "10th percentile" in r for r in p.reasons)


def test_tiny_budget_gives_fewer_iterations_and_lower_resolution(make_fingerprint: Fp) -> None:
    fp = make_fingerprint(spacing=(2.0, 2.0, 2.0), shape=(99, 117, 95))
    long, short = plan(fp, budget="1h"), plan(fp, budget="90s")
    lc, sc = long.configuration(), short.configuration()
    assert sc["training"]["iterations"] < lc["training"]["iterations"]
    assert math.prod(sc["patch_size"]) <= math.prod(lc["patch_size"])
    assert short.default_configuration == "3d_lowres"
    assert min(sc["preprocessing"]["target_spacing"]) > 2.0
    low = short.to_dict()["configurations"]["3d_lowres"]
    assert low["inherits"] == "3d_fullres" and "loss" not in low  # a variant stores only what differs


def test_huge_volume_plans_lowres_with_reason(make_fingerprint: Fp) -> None:
    fp = make_fingerprint(spacing=(0.7, 0.7, 0.7), shape=(512, 512, 400), n=100, modality="CT")
    p = plan(fp, budget="10m")
    assert p.default_configuration == "3d_lowres"
    low, full = p.configuration("3d_lowres"), p.configuration("3d_fullres")
    assert low["preprocessing"]["target_spacing"][0] > 2 * full["preprocessing"]["target_spacing"][0]
    assert low["estimates"]["epoch_seconds"] < full["estimates"]["epoch_seconds"]
    reason = next(r for r in p.reasons if r.startswith("default configuration: 3d_lowres"))
    assert "0.7x0.7x0.7 mm 3D would need" in reason and "per epoch" in reason


def test_memory_that_cannot_fit_raises_before_training(make_fingerprint: Fp) -> None:
    fp = make_fingerprint(spacing=(1.0, 1.0, 1.0), shape=(160, 160, 160))
    with pytest.raises(PlanError, match=r"no configuration fits in 0\.001 GB.*smaller network"):
        plan(fp, memory_gb=0.001)


def test_memory_drops_only_the_configurations_that_do_not_fit(make_fingerprint: Fp) -> None:
    fp = make_fingerprint(spacing=(1.0, 1.0, 1.0), shape=(160, 160, 160))
    p = plan(fp, memory_gb=0.05)  # a 32^3 3D patch fits; the 2D network needs > 0.1 GB at 64x64
    assert "2d" not in p.configuration_names and "3d_fullres" in p.configuration_names
    assert any(r.startswith("2d: dropped") for r in p.reasons)
    assert p.configuration("3d_fullres")["estimates"]["memory_gb"] <= 0.05


def test_2d_data_plans_2d_only(make_fingerprint: Fp) -> None:
    p = plan(make_fingerprint(spacing=(0.5, 0.5), shape=(256, 256), n=50), budget="5m")
    assert p.configuration_names == ["2d"] and p.configuration()["spatial_dims"] == 2
    assert p.configuration()["sampling"]["slice_axis"] is None
    assert p.configuration()["augmentation"]["rotation"]["degrees"] == 180.0


def test_overrides_replace_rules_and_unknown_ones_fail(make_fingerprint: Fp) -> None:
    fp = make_fingerprint(spacing=(2.0, 2.0, 2.0), shape=(99, 117, 95))
    p = plan(fp, target_spacing=[3.0, 3.0, 3.0], network={"num_res_units": 1}, iterations=123)
    cfg = p.configuration("3d_fullres")
    assert cfg["preprocessing"]["target_spacing"] == (3.0, 3.0, 3.0)
    assert cfg["network"]["num_res_units"] == 1 and cfg["training"]["iterations"] == 123
    with pytest.raises(PlanError, match="Did you mean 'target_spacing'"):
        plan(fp, target_spacng=[1, 1, 1])
    with pytest.raises(PlanError, match=r"no planner for task 'segmentaton'.*Did you mean 'segmentation'"):
        make_plan(fp, task="segmentaton", budget="1m", measure=False)


def test_measured_timing_calibrates_iterations(make_fingerprint: Fp) -> None:
    fp = make_fingerprint(spacing=(1.0, 1.0), shape=(64, 64), n=4)
    p = make_plan(fp, task="segmentation", budget="60s", device="cpu", measure=True, overrides={"threads": 1})
    cfg = p.configuration()
    est = cfg["estimates"]
    assert est["measured"] is True and est["seconds_per_iteration"] > 0
    assert cfg["training"]["iterations"] * est["seconds_per_iteration"] <= 60
    assert any("(measured)" in r for r in p.reasons)
