"""Classification planner rules on handwritten fingerprints (FLOP model only: no step is timed)."""

from __future__ import annotations

from typing import Any

import pytest

from medlens.errors import PlanError
from medlens.plan import Plan, make_plan
from medlens.plan.plan import thaw


def cls_fingerprint(
    counts: list[int],
    *,
    ctype: str = "multiclass",
    shape: tuple[int, ...] = (28, 28),
    modality: str = "OT",
    channels: int = 1,
    intensity: tuple[float, float] = (0.0, 255.0),
) -> dict[str, Any]:
    """A classification fingerprint in the schema of medlens.data.fingerprint, written by hand."""
    n = sum(counts) if ctype != "multilabel" else 1000
    st = {"mean": 100.0, "std": 40.0, "median": 90.0, "p00_5": intensity[0] + 1, "p99_5": intensity[1] - 1,
          "min": intensity[0], "max": intensity[1]}  # fmt: skip
    return {
        "medlens_fingerprint": 1,
        "dataset": "handwritten",
        "task": "classification",
        "classification_type": ctype,
        "ndim": len(shape),
        "num_cases": n,
        "num_channels": channels,
        "modalities": {str(c): modality for c in range(channels)},
        "spacing": {k: [1.0] * len(shape) for k in ("median", "min", "max", "p10", "p90")},
        "shape": {"median": list(shape), "min": list(shape), "max": list(shape)},
        "intensity": {str(c): dict(st) for c in range(channels)},
        "classes": {
            "names": {str(k): f"c{k}" for k in range(len(counts))},
            "counts": {str(k): c for k, c in enumerate(counts)},
        },
    }


def plan_for(fp: dict[str, Any], budget: str = "10m", **overrides: Any) -> Plan:
    return make_plan(
        fp, task="classification", budget=budget, device="cpu", measure=False,
        overrides={"threads": 1, "memory_gb": 8, **overrides},
    )  # fmt: skip


def config(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = thaw(plan.configuration())
    return out


def test_balanced_classes_get_a_plain_loss() -> None:
    p = plan_for(cls_fingerprint([100, 120, 110]))
    c = config(p)
    assert c["loss"]["name"] == "ce" and "class_weights" not in c["loss"]
    assert c["sampling"] == {"balanced": False}
    assert any("plain loss" in r for r in p.reasons)


def test_moderate_imbalance_weights_the_loss_by_inverse_frequency() -> None:
    p = plan_for(cls_fingerprint([300, 100], ctype="binary"))
    c = config(p)
    # n / (K n_k): 400 / (2 * 300), 400 / (2 * 100)
    assert c["loss"]["class_weights"] == [pytest.approx(0.6667, abs=1e-4), pytest.approx(2.0)]
    assert c["sampling"]["balanced"] is False
    assert any("ratio 3.0" in r and "class-weighted" in r for r in p.reasons)


def test_strong_imbalance_balances_the_batches_instead() -> None:
    p = plan_for(cls_fingerprint([2000, 100, 50]))
    c = config(p)
    assert c["sampling"]["balanced"] is True and "class_weights" not in c["loss"]
    assert any("ratio 40.0" in r and "class-balanced" in r for r in p.reasons)


def test_multilabel_uses_bce_without_weights_and_ordinal_the_cumulative_head() -> None:
    ml = config(plan_for(cls_fingerprint([500, 3, 40], ctype="multilabel")))
    assert (
        ml["loss"]["name"] == "bce"
        and "class_weights" not in ml["loss"]
        and ml["sampling"]["balanced"] is False
    )
    od = plan_for(cls_fingerprint([50, 40, 30, 20, 10], ctype="ordinal"))
    assert config(od)["loss"]["name"] == "coral"
    assert any("median of that distribution" in r for r in od.reasons)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((28, 28), [28, 28]),
        ((16, 16), [16, 16]),
        ((64, 60), [64, 64]),
        ((512, 480), [224, 224]),
        ((30, 30, 30), [32] * 3),
    ],
)
def test_input_size_is_the_smallest_standard_size_covering_the_images(shape: tuple, expected: list) -> None:
    c = config(plan_for(cls_fingerprint([50, 50], shape=shape, ctype="binary")))
    assert c["patch_size"] == expected
    assert c["spatial_dims"] == len(shape)


def test_mixed_sizes_are_resized_and_said_so() -> None:
    fp = cls_fingerprint([50, 50], ctype="binary", shape=(100, 90))
    fp["shape"].update(min=[60, 50], max=[200, 180])
    p = plan_for(fp)
    assert config(p)["patch_size"] == [128, 128]
    assert any("every image is resized" in r for r in p.reasons)


def test_normalisation_follows_the_modality() -> None:
    ct = config(plan_for(cls_fingerprint([50, 50], modality="CT", intensity=(-1024.0, 3000.0))))
    assert ct["preprocessing"]["normalization"]["0"]["scheme"] == "ct"
    mr = config(plan_for(cls_fingerprint([50, 50], modality="MR", intensity=(0.0, 255.0))))
    assert mr["preprocessing"]["normalization"]["0"] == {"scheme": "zscore", "use_nonzero_mask": False}
    rgb = config(plan_for(cls_fingerprint([50, 50], modality="SM", channels=3)))
    assert [rgb["preprocessing"]["normalization"][str(c)]["scheme"] for c in range(3)] == ["rescale"] * 3
    xr = config(plan_for(cls_fingerprint([50, 50], modality="DX", intensity=(0.0, 4095.0))))
    assert xr["preprocessing"]["normalization"]["0"]["scheme"] == "zscore"  # not 8-bit: no fixed scale


def test_augmentation_mirrors_only_where_anatomy_allows() -> None:
    def aug(modality: str, channels: int = 1) -> dict[str, Any]:
        return config(plan_for(cls_fingerprint([50, 50], modality=modality, channels=channels)))[
            "augmentation"
        ]

    assert aug("DX")["mirror"]["p"] == 0.0  # chest films: side markers, the heart's side
    assert aug("CT")["mirror"]["p"] == 0.0  # left and right kidney are different classes
    assert aug("MR")["mirror"] == {"p": 0.5, "axes": [0]}
    pathology = aug("SM", channels=3)
    assert pathology["mirror"] == {"p": 0.5, "axes": [0, 1]} and pathology["rotation"]["degrees"] == 180.0
    assert pathology["gamma"]["p"] == 0.0  # per-channel gamma would shift colours


def test_the_network_grows_with_the_budget() -> None:
    fp = cls_fingerprint([3000, 3000, 3000])
    small = config(plan_for(fp, budget="30s"))["network"]
    large = config(plan_for(fp, budget="5h"))["network"]
    assert small["name"] == "resnet18" and small["widen_factor"] == 0.25
    assert large["widen_factor"] == 1.0
    assert large["conv1_stride"] == 1 and large["no_max_pool"] is True  # 28-pixel images: MedMNIST's stem


def test_plan_round_trips_and_keeps_the_budget_as_a_time_limit(tmp_path: Any) -> None:
    p = plan_for(cls_fingerprint([40, 60], ctype="binary"), budget="90s")
    c = config(p)
    assert c["training"]["time_limit_seconds"] == 90.0
    assert c["training"]["optimizer"]["name"] == "adamw"
    assert c["validation"]["max_cases"] >= 1
    assert p.fingerprint["classification_type"] == "binary"
    again = Plan.load(p.save(tmp_path / "plan.json"))
    assert again.configuration() == p.configuration()
    assert again.labels == {"c0": 0, "c1": 1}


def test_type_missing_from_fingerprint_is_inferred_with_a_reason() -> None:
    fp = cls_fingerprint([40, 60])
    del fp["classification_type"]
    p = plan_for(fp)
    assert config(p)["loss"]["name"] == "ce"
    assert any("inferred from the class count" in r for r in p.reasons)


def test_bad_override_and_bad_fingerprint_are_plan_errors() -> None:
    with pytest.raises(PlanError, match="patch_size"):
        plan_for(cls_fingerprint([40, 60]), patch_size=[28, 28, 28])
    fp = cls_fingerprint([40, 60])
    fp["classification_type"] = "regression"
    with pytest.raises(PlanError, match="regression"):
        plan_for(fp)


def test_measured_plans_keep_the_faster_threads_and_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    import medlens.plan.classification as pc
    import medlens.plan.classification_sizing as sizing

    calls: list[tuple[int, str]] = []

    def fake_step(spec: Any, *, threads: int, precision: str, **kwargs: Any) -> float:
        calls.append((threads, precision))
        # two threads collapse (another process holds a core); bf16 pays off
        return (0.2 if threads == 1 else 2.0) * (1.0 if precision == "bf16" else 1.5)

    monkeypatch.setattr(sizing, "time_classification_step", fake_step)
    monkeypatch.setattr(pc.ClassificationPlanner, "resolve_threads", lambda self: 2)
    monkeypatch.setattr(pc.ClassificationPlanner, "resolve_precision", lambda self: "bf16")
    p = make_plan(cls_fingerprint([500, 500]), task="classification", budget="2m", device="cpu",
                  overrides={"memory_gb": 8})  # fmt: skip
    c = config(p)
    assert (c["training"]["threads"], c["training"]["precision"]) == (1, "bf16")
    assert (1, "bf16") in calls and (2, "fp32") in calls
    assert any(r.startswith("runtime: 1 thread(s) in bf16") for r in p.reasons)
    assert c["estimates"]["measured"] is True


# ---- small datasets (evidence: bench/classification/sweep.py on brain-lesion, RESULTS.md) ----------------------
def brain_lesion_like(n: int = 320) -> dict[str, Any]:
    """2D MR slices of ~107 pixels, two balanced classes: the brain-lesion sample's fingerprint."""
    return cls_fingerprint([n // 2, n // 2], ctype="binary", shape=(107, 107), modality="MR")


def test_many_epochs_of_a_small_dataset_turn_regularisation_on() -> None:
    p = plan_for(brain_lesion_like(), budget="3m")
    c = config(p)
    epochs = c["training"]["iterations"] * c["batch_size"] / 256
    assert epochs >= 25
    assert c["training"]["optimizer"]["weight_decay"] == 1e-4  # measured: no gain on top of mixup
    aug = c["augmentation"]
    assert aug["mixup"] == {"p": 0.5, "alpha": 0.4}
    assert aug["mirror"] == {"p": 0.5, "axes": [0]}  # still only what the modality allows
    assert aug["rotation"]["degrees"] == 15.0
    assert "label_smoothing" not in c["loss"]  # measured: no gain on brain-lesion
    assert any(
        r.startswith("regularisation:") and "mixup" in r and f"{epochs:.0f} epochs" in r for r in p.reasons
    )
    assert any("mixup (p 0.5, alpha 0.4)" in r for r in p.reasons if r.startswith("augmentation:"))


def test_few_epochs_keep_the_standard_recipe() -> None:
    p = plan_for(cls_fingerprint([30000, 30000]), budget="2m")  # a MedMNIST-sized set: few passes
    c = config(p)
    assert c["training"]["iterations"] * c["batch_size"] / 48000 < 25
    assert "label_smoothing" not in c["loss"] and "mixup" not in c["augmentation"]
    assert c["training"]["optimizer"]["weight_decay"] == 1e-4
    assert any(r.startswith("regularisation: standard") for r in p.reasons)


def test_regularisation_keeps_the_modality_augmentation() -> None:
    fp = cls_fingerprint([150, 150], modality="SM", channels=3)  # pathology: any rotation, no gamma
    aug = config(plan_for(fp, budget="3m"))["augmentation"]
    assert aug["rotation"]["degrees"] == 180.0 and aug["rotation"]["p"] == 0.5
    assert aug["gamma"]["p"] == 0.0 and aug["mixup"]["p"] == 0.5


def test_small_datasets_cap_the_network_by_parameters_per_image() -> None:
    small = plan_for(cls_fingerprint([128, 128]), budget="5h")  # the budget alone buys the widest rung ...
    assert config(small)["network"]["widen_factor"] <= 0.25
    assert any(r.startswith("network capacity:") and "204 training images" in r for r in small.reasons)
    large = plan_for(cls_fingerprint([3000, 3000, 3000]), budget="5h")  # ... as it does here
    assert config(large)["network"]["widen_factor"] == 1.0
    assert not any(r.startswith("network capacity:") for r in large.reasons)


def test_small_validation_sets_keep_the_final_weights() -> None:
    small = plan_for(brain_lesion_like(), budget="90s")
    assert config(small)["validation"]["selection"] == "last"
    assert any(
        r.startswith("model selection: the final weights") and "64 validation cases" in r
        for r in small.reasons
    )
    large = plan_for(cls_fingerprint([3000, 3000]), budget="90s")
    assert config(large)["validation"]["selection"] == "best"
    assert any(r.startswith("model selection: the best validation AUC") for r in large.reasons)
