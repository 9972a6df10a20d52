"""The model-randomisation sanity check (Adebayo et al. 2018): real methods change, weight-blind ones fail."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medlens.explain import saliency as saliency_module
from medlens.explain.saliency import METHODS, SaliencyContext, register_method
from medlens.explain.sanity import THRESHOLD, randomisation_check, randomise_weights


def edge_map(ctx: SaliencyContext) -> np.ndarray:
    """An image-gradient magnitude (an edge detector): depends on the input only, never on the weights."""
    img = ctx.x[0].detach().cpu().numpy().sum(0)
    return np.sqrt(sum(g**2 for g in np.gradient(img)))


def input_map(ctx: SaliencyContext) -> torch.Tensor:
    """The input itself (``input * 1``)."""
    return ctx.x[0].abs()


@pytest.fixture
def weight_blind_methods(monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    monkeypatch.setattr(saliency_module, "_METHODS", dict(saliency_module._METHODS))
    register_method("edges", edge_map)
    register_method("input", input_map)
    return ("edges", "input")


def test_methods_that_ignore_the_weights_fail(
    weight_blind_methods: tuple[str, ...], blob_classifier: dict[str, Any], seg_case: dict[str, Any]
) -> None:
    cases = [
        (blob_classifier["model"], blob_classifier["x"], "classification"),
        (seg_case["model"], seg_case["x"], "segmentation"),
    ]
    for model, x, task in cases:
        for method in weight_blind_methods:
            r = randomisation_check(model, x, method, target=1, task=task, repeats=2)
            assert r["spearman"] == pytest.approx(1.0) and r["spearman_each"] == pytest.approx([1.0, 1.0])
            assert r["passed"] is False and r["note"].startswith("FAILED")
            assert r["method"] == method and r["threshold"] == THRESHOLD and r["mode"] == "full"


def test_classifier_maps_change_when_the_weights_are_randomised(blob_classifier: dict[str, Any]) -> None:
    model, x = blob_classifier["model"], blob_classifier["x"]
    results = {
        m: randomisation_check(model, x, m, target=1, task="classification", ctype="binary") for m in METHODS
    }
    for method, r in results.items():
        assert len(r["spearman_each"]) == 3 and r["repeats"] == 3
        assert abs(r["spearman"]) < 0.8, method  # far from the weight-blind methods' rho = 1
    assert results["gradcam"]["passed"] and results["occlusion"]["passed"]
    # Integrated gradients multiply by the input and keep more of the image (as Adebayo et al. found).
    assert np.mean(np.abs(results["integrated_gradients"]["spearman_each"])) > np.mean(
        np.abs(results["gradcam"]["spearman_each"])
    )


def test_segmentation_maps_change_when_the_weights_are_randomised(seg_case: dict[str, Any]) -> None:
    model, x = seg_case["model"], seg_case["x"]
    r = {m: randomisation_check(model, x, m, target=1, task="segmentation", repeats=2) for m in METHODS}
    for method, res in r.items():
        assert abs(res["spearman"]) < 0.8, method
        assert "region" in res["note"]  # the segmentation caveat is stated
    assert r["occlusion"]["passed"]


def test_original_model_is_untouched_and_randomisation_is_seeded(blob_classifier: dict[str, Any]) -> None:
    model, x = blob_classifier["model"], blob_classifier["x"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = randomisation_check(model, x, "gradcam", target=1, task="classification", repeats=1, return_maps=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert r["maps"]["original"].shape == (16, 16)
    again = randomisation_check(model, x, "gradcam", target=1, task="classification", repeats=1)
    assert again["spearman"] == r["spearman"]

    a, b, c = (randomise_weights(nn.Conv2d(2, 3, 3), seed=s) for s in (1, 1, 2))
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


def test_randomise_weights_reinitialises_every_parameter(blob_classifier: dict[str, Any]) -> None:
    import copy

    model = blob_classifier["model"]
    rnd = randomise_weights(copy.deepcopy(model), seed=0)
    for (name, p), q in zip(model.named_parameters(), rnd.parameters(), strict=True):
        assert not torch.allclose(p, q), name

    class Custom(nn.Module):  # a parameter no module resets: drawn from a normal with its own std
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.linspace(0, 1, 50))

    c = randomise_weights(Custom(), seed=0)
    assert not torch.allclose(c.scale, torch.linspace(0, 1, 50))
    assert 0.1 < float(c.scale.detach().std()) < 0.6


def test_cascading_randomisation_goes_from_the_output_down(blob_classifier: dict[str, Any]) -> None:
    model, x = blob_classifier["model"], blob_classifier["x"]
    r = randomisation_check(model, x, "occlusion", target=1, task="classification", repeats=1, cascading=True)
    stages = r["cascade"]
    assert 1 <= len(stages) <= 3  # three parameterised layers: linear, conv 2, conv 1
    assert stages[0]["layers"].startswith("6 ..") and stages[-1]["layers"].endswith("(3 of 3)")
    assert all(isinstance(s["spearman"], float) for s in stages)


def test_a_constant_map_cannot_be_checked(
    monkeypatch: pytest.MonkeyPatch, blob_classifier: dict[str, Any]
) -> None:
    monkeypatch.setattr(saliency_module, "_METHODS", dict(saliency_module._METHODS))
    register_method("flat", lambda ctx: torch.ones(ctx.x.shape[2:]))
    r = randomisation_check(
        blob_classifier["model"], blob_classifier["x"], "flat", target=1, task="classification"
    )
    assert r["spearman"] is None and r["passed"] is False and "cannot be checked" in r["note"]


def test_a_masked_images_background_is_left_out_of_the_comparison() -> None:
    from medlens.explain.sanity import compared_voxels

    x = torch.zeros(1, 2, 10, 12)
    x[0, 0, 2:8, 3:9] = 1.0  # a skull-stripped image: the rest is exactly 0 in every channel
    x[0, 1, 2:4, 3:5] = 1.0
    inside = compared_voxels(x)
    assert inside.shape == (10, 12) and inside.sum() == 36 and inside[2:8, 3:9].all()
    assert compared_voxels(x + 0.5).all()  # no exact-zero background: every voxel counts
