"""Saliency maps: they land on the object, match hand computations, and leave the model as it was."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medlens.errors import InputError
from medlens.explain.saliency import (
    METHODS,
    TargetScore,
    explain,
    find_target_layer,
    occlusion_window,
    saliency,
)


def test_every_method_concentrates_on_the_blob_of_a_trained_classifier(
    blob_classifier: dict[str, Any],
) -> None:
    assert blob_classifier["accuracy"] >= 0.9  # the model has learned the blob
    model, x, mask = blob_classifier["model"], blob_classifier["x"], blob_classifier["mask"]
    for method in METHODS:
        s = saliency(model, x, method, target=1, task="classification", ctype="binary")
        assert s.shape == (16, 16) and s.dtype == np.float32
        assert s.min() >= 0.0 and s.max() == pytest.approx(1.0)
        assert s[mask].mean() > 4 * s[~mask].mean(), method


def test_gradcam_matches_a_hand_computation(blob_classifier: dict[str, Any]) -> None:
    """Grad-CAM by hand: ReLU(sum_k mean(dS/dA_k) A_k) on the last ReLU, S = z1 - z0, upsampled bilinearly."""
    model, x = blob_classifier["model"], blob_classifier["x"]
    assert find_target_layer(model, x, "classification") == "3"  # the last ReLU before global pooling
    e = explain(model, x, "gradcam", target=1, task="classification", ctype="binary")
    assert e.info["layer"] == "3" and e.info["layer_shape"] == [8, 8]

    feats = nn.Sequential(*list(model)[:4])
    head = nn.Sequential(*list(model)[4:])
    a = feats(x).detach().requires_grad_(True)
    z = head(a)
    (g,) = torch.autograd.grad(z[0, 1] - z[0, 0], a)
    cam = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    expected = (cam / cam.max()).detach().numpy()
    np.testing.assert_allclose(e.map, expected, atol=1e-5)


class PixelProbe(nn.Module):
    """Two logits: 0 and ``weight * x[0, 5, 7]`` (only one pixel matters); a conv keeps captum's layer hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight * x[:, 0, 5, 7]
        return torch.stack([torch.zeros_like(v), v], dim=1)


def test_occlusion_and_integrated_gradients_on_a_one_pixel_model() -> None:
    x = torch.ones(1, 1, 16, 16)
    probe = PixelProbe()
    # IG of a linear function from a zero baseline is exactly x * grad: all relevance on the one pixel.
    ig = saliency(probe, x, "integrated_gradients", target=1, task="classification")
    expected = np.zeros((16, 16), np.float32)
    expected[5, 7] = 1.0
    np.testing.assert_allclose(ig, expected, atol=1e-6)
    # Occlusion: 4x4 windows at stride 2; the pixel (5, 7) lies in windows starting at rows 2, 4 and
    # columns 4, 6, so exactly rows 2..7 x columns 4..9 are relevant, the overlap of all four the most.
    e = explain(probe, x, "occlusion", target=1, task="classification")
    assert e.info["window"] == [4, 4] and e.info["stride"] == [2, 2]
    nonzero = np.argwhere(e.map > 0)
    assert nonzero.min(0).tolist() == [2, 4] and nonzero.max(0).tolist() == [7, 9]
    assert e.map[4:6, 6:8].min() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("shape", "window", "stride"),
    [((16, 16), (4, 4), (2, 2)), ((16, 16, 12), (4, 4, 3), (3, 3, 3)), ((28, 28), (7, 7), (3, 3))],
)
def test_occlusion_window_is_stated_and_tiles_the_input(
    shape: tuple[int, ...], window: tuple[int, ...], stride: tuple[int, ...]
) -> None:
    assert occlusion_window(shape) == (window, stride)


@pytest.mark.parametrize("shape", [(16, 16), (512, 512), (16, 16, 12), (160, 192, 160), (7, 300, 5)])
def test_occlusion_stays_cheap_and_covers_every_voxel(shape: tuple[int, ...]) -> None:
    window, stride = occlusion_window(shape)
    positions = [(n - w) // s + 1 for n, w, s in zip(shape, window, stride, strict=True)]
    assert math.prod(positions) <= (64 if len(shape) == 2 else 125)
    for n, w, s in zip(shape, window, stride, strict=True):
        assert (n - w) % s == 0 and w >= math.ceil(n / 4)  # windows end exactly at the border


def test_segmentation_maps_in_3d_land_on_the_predicted_blob(seg_case: dict[str, Any]) -> None:
    model, x, mask = seg_case["model"], seg_case["x"], seg_case["mask"]
    assert x.shape == (1, 1, 16, 16, 12)
    for method in METHODS:
        e = explain(model, x, method, target=1, task="segmentation")
        assert e.map.shape == (16, 16, 12) and e.map.max() == pytest.approx(1.0)
        assert e.map[mask].mean() > 4 * e.map[~mask].mean(), method
        assert e.info["region"] == "predicted class 1" and e.info["region_voxels"] > 0.5 * mask.sum()
    cam = explain(model, x, "gradcam", target=1, task="segmentation").info
    # MONAI UNet: model.1 is the half-resolution skip concatenation of the decoder, upsampled trilinearly.
    assert cam["layer"] == "model.1" and cam["layer_shape"] == [8, 8, 6] and cam["upsampling"] == "trilinear"


def test_segmentation_input_not_divisible_by_the_stride_is_padded(seg_case: dict[str, Any]) -> None:
    model, x, mask = seg_case["model"], seg_case["x"][..., 1:, :15, :11], seg_case["mask"][1:, :15, :11]
    s = saliency(model, x, "gradcam", target=1, task="segmentation")
    assert s.shape == (15, 15, 11)
    assert s[mask].mean() > 4 * s[~mask].mean()


def test_model_is_left_as_it_was_and_results_are_deterministic(blob_classifier: dict[str, Any]) -> None:
    model, x = blob_classifier["model"], blob_classifier["x"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    rng = torch.random.get_rng_state()
    try:
        first = [saliency(model, x, m, target=1, task="classification") for m in METHODS]
        second = [saliency(model, x, m, target=1, task="classification") for m in METHODS]
        assert model.training and all(m.training for m in model.modules())
        assert model[1].inplace and model[3].inplace
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
    finally:
        model.eval()
    assert torch.equal(torch.random.get_rng_state(), rng)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class Fixed(nn.Module):
    """Returns fixed logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], *self.logits.shape[1:])


def test_explained_output_of_each_head() -> None:
    x = torch.zeros(1, 1, 3, 3)
    three = Fixed(torch.tensor([[1.0, 3.0, -2.0]]))
    assert TargetScore(three, 1, "classification")(x).item() == 3.0  # raw logit
    two = Fixed(torch.tensor([[1.0, 3.0]]))
    assert TargetScore(two, 0, "classification", ctype="binary")(x).item() == -2.0  # log-odds z0 - z1
    assert TargetScore(two, 1, "classification", ctype="binary")(x).item() == 2.0
    coral = TargetScore(three, 2, "classification", ctype="ordinal", loss="coral")
    assert coral(x).item() == 3.0  # class 2 -> cumulative logit 1 ("grade >= 2")
    assert TargetScore(three, 0, "classification", ctype="ordinal", loss="coral")(x).item() == -1.0
    seg = torch.zeros(1, 2, 3, 3)
    seg[0, 1] = torch.arange(9.0).reshape(3, 3)
    region = torch.zeros(3, 3, dtype=torch.bool)
    region[2] = True
    assert TargetScore(Fixed(seg), 1, "segmentation", region=region)(x).item() == 6 + 7 + 8


def test_binary_log_odds_make_both_targets_explain_the_same_evidence(blob_classifier: dict[str, Any]) -> None:
    model, x = blob_classifier["model"], blob_classifier["x"]
    one = saliency(model, x, "integrated_gradients", target=1, task="classification", ctype="binary")
    zero = saliency(model, x, "integrated_gradients", target=0, task="classification", ctype="binary")
    np.testing.assert_allclose(one, zero, atol=1e-5)  # S0 = -S1: the same absolute attributions


def test_bad_requests_are_named(blob_classifier: dict[str, Any]) -> None:
    model, x = blob_classifier["model"], blob_classifier["x"]
    with pytest.raises(InputError, match="Did you mean 'gradcam'"):
        saliency(model, x, "gradcamm", target=1, task="classification")
    with pytest.raises(InputError, match="target class 2 is out of range"):
        saliency(model, x, "gradcam", target=2, task="classification")
    with pytest.raises(InputError, match=r"shape \(1, C, \*spatial\)"):
        saliency(model, x[0], "gradcam", target=1, task="classification")
    with pytest.raises(InputError, match="task='segmentation' needs logits"):
        saliency(model, x, "gradcam", target=1, task="segmentation")
    with pytest.raises(InputError, match="NaN"):
        saliency(model, x * float("nan"), "gradcam", target=1, task="classification")
    with pytest.raises(InputError, match="unknown layer 'nope'"):
        saliency(model, x, "gradcam", target=1, task="classification", layer="nope")


@pytest.mark.parametrize(
    ("name", "task", "size", "expected"),
    [
        ("resnet18", "classification", 64, "layer4"),  # the last residual stage, before global pooling
        ("densenet121", "classification", 64, "features"),  # the dense features ending in norm5
        (
            "efficientnet-b0",
            "classification",
            64,
            "_bn1",
        ),  # the head convolution's norm (its swish is shared)
        ("test_classifier", "classification", 16, "act2"),
        ("unet", "segmentation", 32, "model.1"),  # decoder skip concatenation at 1/2 resolution
        ("basicunet", "segmentation", 32, "upcat_2"),
        ("segresnet", "segmentation", 32, "up_layers.1"),
    ],
)
def test_gradcam_layer_is_found_in_registry_networks(name: str, task: str, size: int, expected: str) -> None:
    from medlens.models import create_model

    torch.manual_seed(0)
    model = create_model({"name": name}, spatial_dims=2, in_channels=1, out_channels=2)
    x = torch.randn(1, 1, size, size)
    assert find_target_layer(model, x, task) == expected
    s = saliency(model, x, "gradcam", target=1, task=task)
    assert s.shape == (size, size) and s.min() >= 0.0 and s.max() <= 1.0


def test_package_import_stays_light() -> None:
    import subprocess
    import sys

    import medlens.explain

    assert medlens.explain.METHODS == METHODS and medlens.explain.explain is explain  # lazy attribute
    code = "import sys, medlens.explain; print([m for m in ('torch', 'captum', 'monai') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
