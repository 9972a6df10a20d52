"""Robustness: input-space perturbations at stated strengths, FGSM/PGD, and the curves on two trained runs."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

from medlens.errors import InputError
from medlens.evaluate.perturb import PERTURBATIONS, perturb
from medlens.evaluate.robustness import KINDS, adversarial, robustness_curves
from medlens.io.image import Image

torch.set_num_threads(1)


def _mr_like(shape: tuple[int, ...] = (24, 20, 16), spacing: tuple[float, ...] = (1.0, 1.0, 2.0)) -> Image:
    """A zero background (about 60 %) around a textured 'anatomy' of mean 100, std 10."""
    rng = np.random.default_rng(1)
    arr = np.zeros(shape, np.float32)
    inner = tuple(slice(s // 5, s - s // 5) for s in shape)
    arr[inner] = rng.normal(100.0, 10.0, arr[inner].shape)
    return Image.from_spacing(arr[None], spacing, modality="MR")


# ---- input-space perturbations -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PERTURBATIONS))
def test_strength_zero_is_identity(kind: str) -> None:
    image = _mr_like()
    image.array = image.array.astype(np.int16)  # the input dtype is kept too
    out = perturb(image, kind, 0.0, seed=3)
    assert out.array.dtype == np.int16
    np.testing.assert_array_equal(out.array, image.array)
    assert out.same_geometry(image) and out.modality == "MR"
    assert out.array is not image.array
    # and every non-zero default strength does change the image
    moved = perturb(image, kind, PERTURBATIONS[kind].strengths[-1], seed=3)
    assert np.abs(moved.array - image.array).max() > 0.5


def test_noise_sigma_is_the_stated_fraction_of_foreground_std() -> None:
    image = _mr_like()
    x = image.array[0].astype(np.float64)
    fg = x[x > np.percentile(x, 5)]  # the zero background is left out: std ~10, not the image's ~45
    assert 9.0 < fg.std() < 11.0 and x.std() > 30
    inside = x != 0
    assert (~inside).mean() > 0.05  # a masked image: its zero background stays zero (module docstring)
    for s in (0.25, 1.0):
        diff = perturb(image, "noise", s, seed=0).array[0] - x
        assert diff[inside].std() == pytest.approx(s * fg.std(), rel=0.03)
        assert abs(diff[inside].mean()) < 0.05 * s * fg.std()
        assert np.all(diff[~inside] == 0)
    full = image.with_array(image.array + 1.0)  # no exact zeros: noise everywhere
    diff = perturb(full, "noise", 0.5, seed=0).array[0] - full.array[0]
    assert np.all(diff != 0) and diff.std() == pytest.approx(0.5 * fg.std(), rel=0.03)
    a, b = perturb(image, "noise", 0.5, seed=7), perturb(image, "noise", 0.5, seed=7)
    np.testing.assert_array_equal(a.array, b.array)
    assert not np.array_equal(a.array, perturb(image, "noise", 0.5, seed=8).array)


def test_blur_sigma_is_in_mm_along_every_axis() -> None:
    spacing = (0.5, 1.0, 2.0)
    arr = np.full((41, 25, 15), 10.0, np.float32)  # a background that is not a mask's exact zeros
    arr[20, 12, 7] += 1000.0
    image = Image.from_spacing(arr[None], spacing)
    out = perturb(image, "blur", 2.0).array[0] - 10.0
    assert out.sum() == pytest.approx(1000.0, rel=1e-4)
    centre = (20, 12, 7)
    for axis, sp in enumerate(spacing):
        profile = out.sum(axis=tuple(a for a in range(3) if a != axis))
        mm = (np.arange(profile.size) - centre[axis]) * sp
        sigma_mm = np.sqrt((profile * mm**2).sum() / profile.sum())
        # same width in mm on each axis although the voxel widths are 4, 2 and 1 voxels
        assert sigma_mm == pytest.approx(2.0, rel=0.05), (axis, sigma_mm)


def test_a_masked_images_zero_background_stays_zero() -> None:
    image = _mr_like()
    x = image.array[0]
    background = x == 0
    assert background.mean() > 0.05
    for kind in ("noise", "blur", "contrast", "bias_field"):
        out = perturb(image, kind, 1.0, seed=0).array[0]
        assert np.all(out[background] == 0), kind
        assert not np.allclose(out[~background], x[~background]), kind


def test_contrast_is_gamma_on_the_rescaled_range() -> None:
    image = _mr_like()
    x = image.array[0].astype(np.float64)
    lo, hi = x.min(), x.max()
    out = perturb(image, "contrast", 1.0).array[0]  # log2(gamma) = 1: gamma 2
    np.testing.assert_allclose(out, lo + (hi - lo) * ((x - lo) / (hi - lo)) ** 2, rtol=1e-5, atol=1e-3)
    brighter = perturb(image, "contrast", -1.0).array[0]  # gamma 0.5
    inside = (x > lo) & (x < hi)
    assert np.all(brighter[inside] > x[inside]) and np.all(out[inside] < x[inside])


def test_bias_field_amplitude_bounds_the_multiplicative_factor() -> None:
    image = _mr_like()
    x = image.array[0]
    fg = x > 0
    for a in (0.1, 0.4):
        ratio = perturb(image, "bias_field", a, seed=2).array[0][fg] / x[fg]
        log_ratio = np.log(ratio)
        assert np.abs(log_ratio).max() <= a + 1e-5
    # the bound is reached (at the image's edge or centre)
    full = perturb(image.with_array(np.ones_like(image.array)), "bias_field", 0.3, seed=2).array[0]
    assert np.abs(np.log(full)).max() == pytest.approx(0.3, rel=1e-4)
    # smooth: neighbouring voxels differ by far less than the field's range
    assert np.abs(np.diff(np.log(full), axis=0)).max() < 0.1 * 0.6
    other = perturb(image.with_array(np.ones_like(image.array)), "bias_field", 0.3, seed=3).array[0]
    assert not np.allclose(full, other)


def test_integer_images_saturate_at_their_type_range() -> None:
    arr = np.full((1, 16, 16), 250, np.uint8)
    arr[0, :8] = 3
    out = perturb(Image.from_spacing(arr), "noise", 2.0, seed=0).array
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 255.0
    assert np.any(out == 255.0) and np.any(out == 0.0)


def test_segmentation_attack_patch_is_cropped_around_the_foreground_and_padded() -> None:
    from medlens.evaluate.robustness import _fit_patch

    x = torch.randn(1, 1, 30, 10, 12)
    y = torch.zeros(1, 30, 10, 12, dtype=torch.int64)
    y[0, 24:28, 2:5, 3:6] = 1  # near the end of axis 0
    xp, yp = _fit_patch(x, y, [16, 16, 12])
    assert xp.shape == (1, 1, 16, 16, 12) and yp.shape == (1, 16, 16, 12)
    assert int((yp == 1).sum()) == int((y == 1).sum())  # the whole foreground is inside the crop
    assert bool((yp[:, :, 10:] == -100).all()) and bool((xp[:, :, :, 10:] == 0).all())  # padding, ignored
    assert bool((yp[:, :, :10] != -100).all())
    assert torch.equal(xp[0, 0, :, :10], x[0, 0, 14:30])  # centred on the centroid, clipped to the end


def test_bad_names_and_strengths_are_input_errors() -> None:
    image = _mr_like()
    with pytest.raises(InputError, match="Did you mean 'noise'"):
        perturb(image, "noize", 0.1)
    with pytest.raises(InputError, match=">= 0"):
        perturb(image, "blur", -1.0)
    with pytest.raises(InputError, match="must be a number"):
        perturb(image, "noise", "high")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="Did you mean 'fgsm'"):
        adversarial(
            torch.nn.Linear(2, 2),
            torch.zeros(1, 2),
            torch.zeros(1),
            kind="fgms",
            epsilon=0.1,
            task="classification",
        )
    with pytest.raises(InputError, match="backend='torch'"):
        adversarial(object(), torch.zeros(1, 2), torch.zeros(1), epsilon=0.1, task="classification")


def test_curves_reject_bad_kind_and_strength_names(cls_run: Any) -> None:
    from medlens.serve import load_predictor

    _, run_dir = cls_run
    pred = load_predictor(run_dir, device="cpu", backend="torch")
    image = Image.from_spacing(np.zeros((1, 16, 16), np.float32))
    with pytest.raises(InputError, match="Did you mean 'pgd'"):
        robustness_curves(pred, [image], [0], task="classification", strengths={"pgdd": [0.1]})
    with pytest.raises(InputError, match="Did you mean 'blur'"):
        robustness_curves(pred, [image], [0], task="classification", kinds=["blurr"])
    with pytest.raises(InputError, match="Did you mean 'classification'"):
        robustness_curves(pred, [image], [0], task="clasification")
    with pytest.raises(InputError, match="must be a number"):
        robustness_curves(pred, [image], [0], task="classification", strengths={"noise": ["x"]})
    pred.models = [lambda x: x]  # what an ONNX Runtime backend looks like: no gradients
    with pytest.raises(InputError, match="backend='torch'"):
        robustness_curves(pred, [image], [0], task="classification", kinds=["noise", "pgd"])


# ---- attacks and curves on the trained runs --------------------------------------------------------------------
def _seg_cases(seg_run: Any) -> tuple[Any, list[Image], list[Image]]:
    from medlens.data.dataset import read_case_image
    from medlens.io import read_image
    from medlens.serve import load_predictor

    ds, run_dir = seg_run
    pred = load_predictor(run_dir, device="cpu", backend="torch")
    return pred, [read_case_image(ds, c) for c in ds.test], [read_image(ds.path(c.label)) for c in ds.test]


def _cls_cases(cls_run: Any, n: int = 16) -> tuple[Any, list[Image], np.ndarray]:
    from medlens.data.dataset import read_case_image
    from medlens.serve import load_predictor
    from medlens.tasks.classify import targets

    ds, run_dir = cls_run
    cases = ds.test[:n]
    pred = load_predictor(run_dir, device="cpu", backend="torch")
    return pred, [read_case_image(ds, c) for c in cases], targets(ds, cases)


def test_fgsm_and_pgd_stay_within_epsilon(cls_run: Any) -> None:
    from medlens.tasks.classify_data import prepare_image

    pred, images, y = _cls_cases(cls_run, 8)
    x = torch.from_numpy(np.stack([prepare_image(im, pred.config) for im in images]))
    before = [p.detach().clone() for p in pred.models[0].parameters()]
    for kind, eps in (("fgsm", 0.05), ("pgd", 0.05), ("pgd", 0.2)):
        xa = adversarial(
            pred.models,
            x,
            torch.from_numpy(y),
            kind=kind,
            epsilon=eps,
            task="classification",
            ctype=pred.ctype,
        )
        d = (xa - x).abs()
        assert float(d.max()) <= eps + 1e-6
        if kind == "fgsm":  # a signed step: every pixel with a gradient moves by exactly epsilon
            assert float((d > eps - 1e-6).float().mean()) > 0.9
    # the attack changes inputs, never the model
    assert all(torch.equal(a, b) for a, b in zip(before, pred.models[0].parameters(), strict=True))
    assert not any(m.training for m in pred.models)


@pytest.mark.parametrize(
    ("ctype", "loss", "outputs"),
    [("binary", "ce", 2), ("multiclass", "ce", 4), ("multilabel", "bce", 4), ("ordinal", "coral", 3)],
)
def test_attacks_raise_the_task_loss(ctype: str, loss: str, outputs: int) -> None:
    from medlens.tasks.classify import ClassificationLoss

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, outputs))  # one model, not a list
    x = torch.randn(32, 1, 4, 4, generator=gen)
    k = outputs + 1 if loss == "coral" else outputs
    y = (
        torch.randint(0, 2, (32, k), generator=gen)
        if ctype == "multilabel"
        else torch.randint(0, k, (32,), generator=gen)
    )
    fn = ClassificationLoss({"name": loss}, ctype, k)
    with torch.no_grad():
        clean = float(fn(model(x), y))
        fgsm = float(
            fn(
                model(
                    adversarial(
                        model, x, y, kind="fgsm", epsilon=0.3, task="classification", ctype=ctype, loss=loss
                    )
                ),
                y,
            )
        )
        pgd = float(
            fn(
                model(
                    adversarial(
                        model, x, y, kind="pgd", epsilon=0.3, task="classification", ctype=ctype, loss=loss
                    )
                ),
                y,
            )
        )
    assert clean < fgsm <= pgd + 1e-4, (clean, fgsm, pgd)


def test_segmentation_attack_leaves_masked_voxels_alone() -> None:
    model = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(1, 1, 6, 6, 4)
    y = torch.randint(0, 3, (1, 6, 6, 4))
    y[:, 4:] = -100
    xa = adversarial(
        [model, model], x, y, kind="pgd", epsilon=0.1, task="segmentation", mask=(y != -100)[:, None]
    )
    d = (xa - x).abs()[0, 0]
    assert float(d[4:].max()) == 0.0 and 0.0 < float(d[:4].max()) <= 0.1 + 1e-6


def _non_increasing(values: list[float], tol: float) -> bool:
    return all(b <= a + tol for a, b in itertools.pairwise(values))


def test_segmentation_curves(seg_run: Any) -> None:
    from medlens.evaluate.segmentation import segmentation_metrics

    pred, images, refs = _seg_cases(seg_run)
    eps = [0.1, 0.2, 0.4]
    curves = robustness_curves(
        pred, images, refs, task="segmentation", kinds=["noise", "blur", "fgsm", "pgd"], max_cases=6,
        strengths={"noise": [2.0, 4.0, 8.0], "blur": [1.0], "fgsm": eps, "pgd": eps}, n_resamples=200,
    )  # fmt: skip
    assert list(curves) == ["noise", "blur", "fgsm", "pgd"]
    noise = curves["noise"]
    assert noise["strengths"] == [0.0, 2.0, 4.0, 8.0] and noise["unit"] == PERTURBATIONS["noise"].unit
    assert noise["n_cases"] == 6 and len(noise["ci"]) == 4
    # the clean point against an independent computation (evaluate.segmentation's Dice on predictor output)
    dice = [
        segmentation_metrics(pred.predict(im).label.array[0], ref.array[0], None, pred.labels)["blob"]["dice"]
        for im, ref in zip(images, refs, strict=True)
    ]
    assert noise["metric"][0] == pytest.approx(np.mean(dice), abs=1e-6)
    assert curves["blur"]["metric"][0] == noise["metric"][0]
    for kind in ("noise", "fgsm", "pgd"):
        m = curves[kind]["metric"]
        assert _non_increasing(m, tol=0.02), (kind, m)
        assert m[-1] < m[0] - 0.1, (kind, m)
        for (lo, hi), est in zip(curves[kind]["ci"], m, strict=True):
            assert lo <= est + 1e-9 and est <= hi + 1e-9
    for f, p in zip(curves["fgsm"]["metric"], curves["pgd"]["metric"], strict=True):
        assert p <= f + 0.01


def test_classification_curves(cls_run: Any) -> None:
    from sklearn.metrics import roc_auc_score

    from medlens.tasks.classify_data import prepare_image

    pred, images, y = _cls_cases(cls_run, 16)
    eps = [0.1, 0.2, 0.4]
    curves = robustness_curves(
        pred, images, y, task="classification", kinds=["noise", "contrast", "fgsm", "pgd"],
        strengths={"noise": [2.0, 4.0, 8.0], "contrast": [1.0], "fgsm": eps, "pgd": eps}, seed=0, n_resamples=200,
    )  # fmt: skip
    assert curves["noise"]["metric_name"] == "AUC" and curves["pgd"]["n_cases"] == 16
    clean = roc_auc_score(
        y, pred.probabilities(np.stack([prepare_image(im, pred.config) for im in images]))[:, 1]
    )
    assert all(curves[k]["metric"][0] == pytest.approx(clean) for k in curves)
    for kind in ("noise", "fgsm", "pgd"):
        m = curves[kind]["metric"]
        assert _non_increasing(m, tol=0.03), (kind, m)
        assert m[-1] < m[0] - 0.2, (kind, m)
    for f, p in zip(curves["fgsm"]["metric"], curves["pgd"]["metric"], strict=True):
        assert p <= f + 0.01
    again = robustness_curves(
        pred,
        images,
        y,
        task="classification",
        kinds=["noise"],
        strengths={"noise": [2.0]},
        seed=0,
        n_resamples=200,
    )
    assert again["noise"]["metric"] == curves["noise"]["metric"][:2]  # seeded: same numbers


def test_default_ladders_cover_every_kind(cls_run: Any) -> None:
    pred, images, y = _cls_cases(cls_run, 8)
    curves = robustness_curves(pred, images, y, task="classification", n_resamples=50)
    assert list(curves) == list(KINDS)
    for curve in curves.values():
        assert curve["strengths"][0] == 0.0 and len(curve["strengths"]) >= 4
        assert len(curve["metric"]) == len(curve["ci"]) == len(curve["strengths"])
        assert curve["unit"] and curve["label"]
