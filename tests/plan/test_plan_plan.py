"""plan.json: round trip, inheritance, validation messages with JSON paths and "did you mean"."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from medlens.errors import PlanError
from medlens.plan import Plan


def edited(plan: Plan, tmp_path: Path, edit: Any) -> Path:
    """Save ``plan`` as JSON, apply ``edit(data)`` to the parsed dict, write it back, return the path."""
    data = plan.to_dict()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def test_save_load_round_trip(brain_plan: Plan, tmp_path: Path) -> None:
    path = brain_plan.save(tmp_path / "run" / "plan.json")
    loaded = Plan.load(path)
    assert loaded.to_dict() == brain_plan.to_dict()
    assert Plan.load(tmp_path / "run").default_configuration == brain_plan.default_configuration
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary left behind
    raw = json.loads(path.read_text())
    assert raw["medlens_plan"] == 1 and raw["reasons"] and raw["labels"] == {"background": 0, "class1": 1}


def test_lowres_variant_inherits_fullres(brain_plan: Plan) -> None:
    raw = brain_plan.to_dict()["configurations"]
    assert raw["3d_lowres"]["inherits"] == "3d_fullres"
    assert "network" not in raw["3d_lowres"] or "name" not in raw["3d_lowres"]["network"]
    low, full = brain_plan.configuration("3d_lowres"), brain_plan.configuration("3d_fullres")
    assert "inherits" not in low and set(low) == set(full)
    assert low["loss"] == full["loss"] and low["augmentation"] == full["augmentation"]
    assert low["preprocessing"]["target_spacing"] != full["preprocessing"]["target_spacing"]
    assert low["preprocessing"]["normalization"] == full["preprocessing"]["normalization"]


def test_add_variant_deep_merges_and_survives_save(brain_plan: Plan, tmp_path: Path) -> None:
    v = brain_plan.add_variant(
        "3d_res",
        "3d_fullres",
        {"network": {"num_res_units": 2}, "training": {"iterations": 50}},
        "residual units",
    )
    cfg = v.configuration("3d_res")
    full = brain_plan.configuration("3d_fullres")
    assert cfg["network"]["num_res_units"] == 2 and cfg["network"]["channels"] == full["network"]["channels"]
    assert (
        cfg["training"]["iterations"] == 50 and cfg["training"]["optimizer"] == full["training"]["optimizer"]
    )
    reloaded = Plan.load(v.save(tmp_path / "plan.json"))
    assert reloaded.to_dict()["configurations"]["3d_res"] == {
        "inherits": "3d_fullres",
        "description": "residual units",
        "network": {"num_res_units": 2},
        "training": {"iterations": 50},
    }
    assert "3d_res" not in brain_plan.configuration_names  # the original is unchanged
    with pytest.raises(PlanError, match="already exists"):
        v.add_variant("3d_res", "3d_fullres", {})


def test_resolved_configuration_is_frozen(brain_plan: Plan) -> None:
    cfg = brain_plan.configuration("3d_fullres")
    with pytest.raises(TypeError):
        cfg["batch_size"] = 99  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg["training"]["iterations"] = 1  # type: ignore[index]
    assert json.loads(json.dumps(cfg))["batch_size"] == cfg["batch_size"]
    assert pickle.loads(pickle.dumps(cfg)) == cfg == copy.deepcopy(cfg)  # e.g. sent to worker processes


def test_unknown_configuration_name(brain_plan: Plan) -> None:
    with pytest.raises(PlanError, match=r"no configuration '3d_fulres'.*Did you mean '3d_fullres'"):
        brain_plan.configuration("3d_fulres")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["configurations"]["3d_fullres"].update(pach_size=[1, 2, 3]),
            r"configurations\.3d_fullres\.pach_size: unknown key\. Did you mean 'patch_size'\?",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"].update(patch_size=[96, 96]),
            r"configurations\.3d_fullres\.patch_size: expected 3 positive integers, got \[96, 96\]",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"].update(patch_size=[96, -1, 80]),
            r"configurations\.3d_fullres\.patch_size: expected positive integers",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"]["preprocessing"].update(resample_data="cubc"),
            r"preprocessing\.resample_data: unknown value 'cubc'\. Did you mean 'cubic'\?",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"]["training"].update(iteratons=5),
            r"configurations\.3d_fullres\.training: unknown key 'iteratons'\. Did you mean 'iterations'\?",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"]["network"].update(num_res_unit=1),
            r"configurations\.3d_fullres\.network: unknown key 'num_res_unit'.*Did you mean 'num_res_units'\?",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"]["augmentation"].update(gama={"p": 0.1}),
            r"configurations\.3d_fullres\.augmentation\.gama: unknown transform\. Did you mean 'gamma'\?",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"].update(patch_size=[100, 96, 80]),
            r"patch_size: 100 along axis 0 is not a multiple of the network's total stride 16 \(use 96 or 112\)",
        ),
        (
            lambda d: d["configurations"]["3d_lowres"].update(inherits="3d_fullre"),
            r"3d_lowres\.inherits: no configuration '3d_fullre'\. Did you mean '3d_fullres'\?",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"].update(inherits="3d_lowres"),
            r"inheritance cycle",
        ),
        (lambda d: d.update(default_configuration="3D_fullres"), r"default_configuration: no configuration"),
        (lambda d: d.update(medlens_plan=2), r"medlens_plan: expected an integer in \[1, 1\]"),
        (lambda d: d.pop("labels"), r"plan\.json: missing key 'labels'"),
    ],
)
def test_invalid_plans_name_the_json_path(brain_plan: Plan, tmp_path: Path, edit: Any, message: str) -> None:
    path = edited(brain_plan, tmp_path, edit)
    with pytest.raises(PlanError, match=message) as info:
        Plan.load(path)
    assert str(path) in str(info.value)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="is not valid JSON"):
        Plan.load(bad)
    with pytest.raises(PlanError, match="no such plan file"):
        Plan.load(tmp_path / "missing.json")
