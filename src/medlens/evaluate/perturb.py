"""Input-space perturbations at stated strengths: Gaussian noise, Gaussian blur, contrast (gamma), bias field.

Each perturbation acts on a :class:`~medlens.io.image.Image` as it came from the scanner (before any
preprocessing), so a robustness curve asks "what if the acquisition had been noisier, blurrier, ...". Every
strength has a unit a reader can check, strength 0 is exactly the identity (the input is returned unchanged,
same dtype), and random perturbations take a seed (same seed, same image). Channels are perturbed one at a
time, each with its own statistics.

=============  ===============================================================================================
kind           strength (unit)
=============  ===============================================================================================
noise          sigma of additive Gaussian noise as a fraction of the *foreground intensity std* of the channel.
               Foreground: the voxels strictly above the channel's 5th intensity percentile (for an image with
               a zero background this is its nonzero voxels; for CT it leaves out most of the air). 1.0 adds
               noise as strong as the intensity variation of the anatomy itself. (A flat foreground falls back
               to the whole channel's std.)
blur           sigma of a Gaussian blur in **mm**, the same in every world direction: the kernel's sigma along
               index axis d is ``strength / spacing[d]`` voxels, so anisotropic voxels are blurred by the same
               physical amount (``scipy.ndimage.gaussian_filter``, ``mode="nearest"``, truncated at 4 sigma).
               Assumes orthogonal voxel axes (true of every scanner grid; a sheared affine is not corrected).
contrast       ``log2(gamma)``: intensities are rescaled to [0, 1] with the channel's min and max, raised to the
               power ``gamma = 2 ** strength`` and mapped back to the original range. 1.0 is gamma 2 (mid-tones
               darker), -1.0 gamma 0.5 (brighter); the minimum and maximum stay where they were.
bias_field     amplitude ``a`` of a smooth multiplicative field ``exp(a * p(x))`` (MR intensity
               non-uniformity), where ``p`` is a random polynomial of degree 2 in the world coordinates (mm,
               centred on the image, scaled by the largest half-extent so the field is isotropic in mm), made
               zero-mean and scaled so that ``max |p| = 1`` over the image: every voxel is multiplied by a
               factor within ``[exp(-a), exp(a)]`` and one voxel reaches a bound. 0.2 means about +-20 %.
=============  ===============================================================================================

A masked image (skull-stripped MR: at least 5% of a channel's voxels exactly 0) keeps its zero background under
every perturbation: noise and blur act on the acquisition, before the mask was applied. Otherwise the measured
drop would be the preprocessing's crop-to-nonzero and normalisation meeting a background that never occurs (a
0.5 mm blur of a skull-stripped brain cost 0.25 Dice that way), not the model's robustness.

MONAI's ``RandGaussianNoise``, ``GaussianSmooth`` and ``RandBiasField`` were considered: their strengths are an
absolute std, a sigma in voxels and a range of random polynomial coefficients (the field's amplitude is not
controlled), so none gives the stated units above; the few lines here do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medlens.errors import InputError, unknown_name
from medlens.io.image import Image

#: Percentile above which a voxel counts as foreground for the noise strength (see the module docstring).
FOREGROUND_PERCENTILE = 5.0
#: An image with at least this fraction of voxels exactly 0 is a masked one (skull-stripped MR): noise stays inside.
MASKED_ZERO_FRACTION = 0.05
#: Degree of the bias-field polynomial.
BIAS_DEGREE = 2


@dataclass(frozen=True)
class Perturbation:
    """A perturbation kind: its unit, what it does, and its default strength ladder (0 = unperturbed)."""

    name: str
    label: str
    unit: str
    description: str
    strengths: tuple[float, ...]
    signed: bool = False  # negative strengths allowed (contrast: gamma < 1)


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation(
            "noise",
            "Gaussian noise",
            "sigma / foreground std",
            "additive Gaussian noise; sigma as a fraction of the std of the voxels above the 5th percentile",
            (0.0, 0.1, 0.25, 0.5, 1.0),
        ),
        Perturbation(
            "blur",
            "Gaussian blur",
            "sigma (mm)",
            "Gaussian blur, isotropic in mm (per-axis sigma in voxels = sigma_mm / spacing)",
            (0.0, 0.5, 1.0, 2.0, 3.0),
        ),
        Perturbation(
            "contrast",
            "Contrast (gamma)",
            "log2(gamma)",
            "gamma on intensities rescaled to [0, 1] by the channel's min/max, then mapped back",
            (0.0, 0.5, 1.0, 1.5, 2.0),
            signed=True,
        ),
        Perturbation(
            "bias_field",
            "Bias field",
            "amplitude a (field in [e^-a, e^a])",
            "multiplicative exp(a * p(x)), p a random degree-2 polynomial in mm with max |p| = 1",
            (0.0, 0.1, 0.2, 0.4, 0.6),
        ),
    )
}


def perturbation_kind(kind: str) -> Perturbation:
    """The :class:`Perturbation` named ``kind``.

    Raises:
        InputError: an unknown name (with the closest valid name).
    """
    if not isinstance(kind, str) or kind not in PERTURBATIONS:
        raise unknown_name("perturbation kind", str(kind), tuple(PERTURBATIONS))
    return PERTURBATIONS[kind]


def check_strength(kind: str, strength: Any, *, signed: bool = False) -> float:
    """``strength`` as a float, checked (finite; non-negative unless the kind is signed).

    Raises:
        InputError: not a number, not finite, or negative where a negative strength has no meaning.
    """
    if isinstance(strength, bool) or not isinstance(strength, int | float | np.integer | np.floating):
        raise InputError(
            f"{kind} strength {strength!r} must be a number (e.g. {_example(kind)}), not {type(strength).__name__}"
        )
    s = float(strength)
    if not math.isfinite(s):
        raise InputError(f"{kind} strength {strength!r} must be finite")
    if s < 0 and not signed:
        raise InputError(f"{kind} strength {s} must be >= 0 (0 leaves the image unchanged)")
    return s


def perturb(image: Image, kind: str, strength: float, seed: int = 0) -> Image:
    """Perturb ``image`` in input space by ``kind`` at ``strength`` (units in the module docstring).

    Args:
        image: the image as read (any dtype; channel-first, 2D or 3D).
        kind: ``noise``, ``blur``, ``contrast`` or ``bias_field`` (see :data:`PERTURBATIONS`).
        strength: in the kind's unit; 0 returns an unchanged copy.
        seed: seed of the random parts (noise values, bias-field polynomial); same seed, same result.

    Returns:
        A new image with the same geometry and modality, float32 voxels (the input's dtype at strength 0;
        an integer input is clipped to its type's range, e.g. 0..255 for uint8, as a detector saturates),
        and ``meta["perturbation"] = {kind, strength, unit, seed}``.

    Raises:
        InputError: an unknown kind or a bad strength.
    """
    spec = perturbation_kind(kind)
    s = check_strength(kind, strength, signed=spec.signed)
    record = {"kind": kind, "strength": s, "unit": spec.unit, "seed": int(seed)}
    if s == 0.0:
        return image.with_array(image.array.copy(), perturbation=record)
    x = np.asarray(image.array, dtype=np.float32)
    if kind == "noise":
        out = _noise(x, s, seed)
    elif kind == "blur":
        out = _blur(x, s, image.spacing)
    elif kind == "contrast":
        out = _gamma(x, 2.0**s)
    else:
        out = x * bias_field(image, s, seed)[None]
    for c in range(x.shape[0]):  # a masked image keeps its zero background (module docstring)
        zero = x[c] == 0
        if zero.mean() >= MASKED_ZERO_FRACTION:
            out[c][zero] = 0.0
    if np.issubdtype(image.array.dtype, np.integer):  # a stored integer image saturates at its type's range
        info = np.iinfo(image.array.dtype)
        out = np.clip(out, info.min, info.max)
    return image.with_array(out.astype(np.float32, copy=False), perturbation=record)


def foreground_std(channel: np.ndarray) -> float:
    """Std of the voxels strictly above the channel's 5th percentile; the whole channel's std when that
    foreground is empty or flat (a synthetic two-level image)."""
    v = np.asarray(channel, dtype=np.float64).ravel()
    fg = v[v > np.percentile(v, FOREGROUND_PERCENTILE)]
    std = float(fg.std()) if fg.size > 1 else 0.0
    return std if std > 0 else float(v.std())


def bias_field(image: Image, amplitude: float, seed: int = 0) -> np.ndarray:
    """The multiplicative field ``exp(a * p(x))`` over ``image``'s spatial grid (module docstring)."""
    shape, nd = image.spatial_shape, image.ndim
    spacing = np.asarray(image.spacing)
    centre = (np.asarray(shape, float) - 1.0) / 2.0
    half = max(float(((np.asarray(shape) - 1) * spacing).max()) / 2.0, 1e-6)
    axes = [((np.arange(n) - c) * sp / half) for n, c, sp in zip(shape, centre, spacing, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    exponents = [e for e in np.ndindex(*(BIAS_DEGREE + 1,) * nd) if 0 < sum(e) <= BIAS_DEGREE]
    rng = np.random.default_rng([int(seed), 7919])  # its own stream, apart from the noise of the same seed
    coeffs = rng.standard_normal(len(exponents))
    p = np.zeros(shape)
    for c, e in zip(coeffs, exponents, strict=True):
        term = np.ones(shape)
        for g, k in zip(grid, e, strict=True):
            if k:
                term = term * g**k
        p += c * term
    p -= p.mean()  # no overall brightness change beyond the field's shape
    peak = float(np.abs(p).max())
    if peak > 0:
        p /= peak
    return np.exp(amplitude * p).astype(np.float32)


# ---- the perturbations -----------------------------------------------------------------------------------------
def _noise(x: np.ndarray, s: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(int(seed))
    z = rng.standard_normal(x.shape, dtype=np.float32)
    out = x.copy()
    for c in range(x.shape[0]):
        out[c] += np.float32(s * foreground_std(x[c])) * z[c]
    return out


def _blur(x: np.ndarray, sigma_mm: float, spacing: Sequence[float]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma_vox = [sigma_mm / float(sp) for sp in spacing]
    out = np.empty_like(x)
    for c in range(x.shape[0]):
        out[c] = gaussian_filter(x[c], sigma=sigma_vox, mode="nearest", truncate=4.0)
    return out


def _gamma(x: np.ndarray, gamma: float) -> np.ndarray:
    out = x.copy()
    for c in range(x.shape[0]):
        lo, hi = float(x[c].min()), float(x[c].max())
        if hi > lo:
            u = (x[c] - lo) / (hi - lo)
            out[c] = lo + (hi - lo) * np.power(np.clip(u, 0.0, 1.0), gamma)
    return out


def _example(kind: str) -> str:
    spec = PERTURBATIONS.get(kind)
    return str(spec.strengths[2]) if spec else "0.1"
