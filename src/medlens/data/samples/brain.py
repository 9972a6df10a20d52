"""Simulated subjects and scanners: the template, deformed per subject, then "acquired" at a site.

A subject is the template (:mod:`medlens.data.samples.template`) moved by a random affine transform (small
rotation, per-axis scaling within +-8%; men's heads 2% larger and women's 2% smaller than the template on
average) composed with a smooth, low-frequency elastic displacement (a cubic-spline interpolated grid of
random control-point displacements). The T1, the tissue probabilities and the brain mask are all sampled
through the same transform, so labels stay exact.

Acquisition at a site applies, in physical order:

1. tissue contrast: a per-site additive shift of the CSF/GM/WM intensity and a gamma curve;
2. resolution: an in-plane blur and/or thick axial slices (blurred, sampled every ``f`` slices, and linearly
   interpolated back, so the noise added at the thick-slice grid is correlated across slices as on a scanner);
3. a smooth multiplicative bias field;
4. Rician noise (magnitude of complex Gaussian noise);
5. the scanner's intensity scale, quantised to int16, and skull stripping (zero outside the brain mask).

Every random draw comes from a generator seeded with ``(seed, subject index, stream)``, so subject 7 is the
same whatever the number of subjects, and the anatomy of a subject does not depend on its lesions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medlens.data.samples.template import Template

#: Random streams of one subject (the third entry of its seed sequence).
STREAM_DEMOGRAPHICS, STREAM_ANATOMY, STREAM_LESIONS, STREAM_ACQUISITION = 0, 1, 2, 3


@dataclass(frozen=True)
class Site:
    """How one simulated scanner differs from the others.

    Attributes:
        name: site name written to the case metadata.
        gamma: exponent of the intensity curve (1 = the template's contrast).
        tissue_shift: additive change of the CSF, GM and WM intensity (template intensities are in [0, 1]).
        noise: Rician noise sigma relative to the [0, 1] intensity scale.
        blur_mm: in-plane Gaussian blur sigma in mm (0 = none).
        slice_mm: axial slice thickness in mm; above the voxel size the volume is acquired in thick slices.
        bias: standard deviation of the log bias field at its control points.
        scale: scanner intensity units of intensity 1.0.
    """

    name: str
    gamma: float
    tissue_shift: tuple[float, float, float]
    noise: float
    blur_mm: float
    slice_mm: float
    bias: float
    scale: float


#: The three simulated scanners; subjects are assigned round-robin.
SITES: tuple[Site, ...] = (
    Site("site-A", gamma=1.0, tissue_shift=(0.0, 0.0, 0.0), noise=0.015, blur_mm=0.0, slice_mm=0.0,
         bias=0.06, scale=1000.0),
    Site("site-B", gamma=0.8, tissue_shift=(0.06, 0.0, -0.02), noise=0.03, blur_mm=1.0, slice_mm=0.0,
         bias=0.10, scale=600.0),
    Site("site-C", gamma=1.3, tissue_shift=(-0.03, -0.02, 0.02), noise=0.045, blur_mm=0.0, slice_mm=4.0,
         bias=0.14, scale=1500.0),
)  # fmt: skip


@dataclass
class Anatomy:
    """One simulated subject's anatomy on the template's output grid.

    Attributes:
        t1: noise-free T1 intensity in [0, 1] (the template's contrast), float32 ``(X, Y, Z)``.
        probs: CSF, GM and WM probabilities, float32 ``(3, X, Y, Z)``.
        mask: brain mask, bool ``(X, Y, Z)``.
    """

    t1: np.ndarray
    probs: np.ndarray
    mask: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """Tissue labels, uint8: 0 background, 1 CSF, 2 GM, 3 WM (argmax of the probabilities in the mask)."""
        lab = (np.argmax(self.probs, axis=0) + 1).astype(np.uint8)
        lab[~self.mask] = 0
        return lab


@dataclass(frozen=True)
class Demographics:
    """Who a simulated subject is (written to the case metadata)."""

    subject_id: str
    site: Site
    sex: str
    age: int


def subject_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random generator of one stream of one subject."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(stream)]))


def demographics(seed: int, index: int) -> Demographics:
    """Sex (F/M, fair coin) and age (20..85, uniform) of subject ``index``; sites go round-robin."""
    rng = subject_rng(seed, index, STREAM_DEMOGRAPHICS)
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(rng.integers(20, 86))
    return Demographics(f"sub-{index + 1:03d}", SITES[index % len(SITES)], sex, age)


def spline_field(rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: int, std: float) -> np.ndarray:
    """A smooth random field: ``n_ctrl``^3 Gaussian control values, cubic-spline interpolated to ``shape``."""
    from scipy.interpolate import CubicSpline

    field = rng.normal(0.0, std, size=(n_ctrl,) * len(shape))
    for axis, n in enumerate(shape):
        weights = CubicSpline(np.arange(n_ctrl), np.eye(n_ctrl), bc_type="natural")(
            np.linspace(0, n_ctrl - 1, n)
        )  # (n, n_ctrl): interpolation weights of each control point
        field = np.moveaxis(np.tensordot(weights, np.moveaxis(field, axis, 0), axes=(1, 0)), 0, axis)
    return field.astype(np.float32)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def simulate_anatomy(template: Template, seed: int, index: int) -> Anatomy:
    """Deform the template into subject ``index``'s anatomy (deterministic per ``seed`` and ``index``)."""
    from scipy import ndimage as ndi

    demo = demographics(seed, index)
    rng = subject_rng(seed, index, STREAM_ANATOMY)

    angles = np.clip(rng.normal(0.0, 3.0, 3), -6.0, 6.0)
    scale = np.exp(rng.normal(0.0, 0.035, 3)) * (1.02 if demo.sex == "M" else 0.98)
    scale = np.clip(scale, 0.92, 1.08)
    forward = _rotation(angles) @ np.diag(scale)  # template -> subject, about the brain centre
    inverse = np.linalg.inv(forward)

    shape = template.grid_shape
    disp = np.stack([spline_field(rng, shape, 6, 2.0) for _ in range(3)])  # mm, in template space
    x, y, z = template.grid_world()
    rel = (x[:, None, None] - template.centre[0], y[None, :, None] - template.centre[1],
           z[None, None, :] - template.centre[2])  # fmt: skip
    coords = np.empty((3, *shape), dtype=np.float64)
    for a in range(3):
        coords[a] = inverse[a, 0] * rel[0] + inverse[a, 1] * rel[1] + inverse[a, 2] * rel[2]
        coords[a] += template.centre[a] + disp[a] - template.origin[a]  # world mm -> 1 mm template index

    def sample(arr: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(arr, coords, order=1, mode="constant", cval=0.0, output=np.float32)

    soft_mask = sample(template.mask)
    mask = soft_mask > 0.5
    t1 = np.where(mask, sample(template.t1), np.float32(0.0))
    gm, wm = sample(template.gm), sample(template.wm)
    # CSF = what the brain mask holds beyond GM and WM; the same as sampling the 1 mm CSF map up to
    # partial-volume effects at the brain's edge, and one interpolation less.
    csf = np.clip(soft_mask - gm - wm, 0.0, 1.0)
    probs = np.stack([csf, gm, wm])
    probs *= mask
    return Anatomy(t1=t1.astype(np.float32), probs=probs, mask=mask)


def site_contrast(anatomy: Anatomy, site: Site) -> np.ndarray:
    """The noise-free image a site would see: tissue-dependent shift plus gamma, in [0, 1] (float32)."""
    img = anatomy.t1.copy()
    for c, shift in enumerate(site.tissue_shift):
        if shift:
            img += np.float32(shift) * anatomy.probs[c]
    np.clip(img, 0.0, 1.0, out=img)
    if site.gamma != 1.0:
        np.power(img, np.float32(site.gamma), out=img)
    img[~anatomy.mask] = 0.0
    return img


def acquire(
    image: np.ndarray, mask: np.ndarray, site: Site, resolution: float, rng: np.random.Generator
) -> np.ndarray:
    """Blur/thick slices, bias field, Rician noise, scanner scale and skull stripping: the stored int16 image.

    Args:
        image: noise-free intensity in [0, 1] (e.g. from :func:`site_contrast`, lesions included).
        mask: brain mask; voxels outside are zero in the result.
        site: the scanner.
        resolution: voxel size in mm (isotropic).
        rng: the subject's acquisition generator.
    """
    from scipy import ndimage as ndi

    img = image.astype(np.float32, copy=True)
    if site.blur_mm > 0:
        sigma = site.blur_mm / resolution
        img = ndi.gaussian_filter(img, (sigma, sigma, 0.0), mode="nearest")
    img *= np.exp(spline_field(rng, img.shape, 3, site.bias))

    factor = max(int(np.floor(site.slice_mm / resolution + 0.5)), 1)
    nz = img.shape[2]
    if factor > 1:
        offset = factor // 2
        thick = ndi.gaussian_filter1d(img, factor / 2.3548, axis=2, mode="nearest")[:, :, offset::factor]
        img = thick
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    sigma_n = np.float32(site.noise)
    img = np.sqrt((img + sigma_n * n1) ** 2 + (sigma_n * n2) ** 2)
    if factor > 1:
        img = _upsample_slices(img, nz, factor // 2, factor)

    img *= np.float32(site.scale * float(np.exp(rng.normal(0.0, 0.05))))
    out = np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)
    out[~mask] = 0
    return out


def _upsample_slices(thick: np.ndarray, nz: int, offset: int, factor: int) -> np.ndarray:
    """Linear interpolation along axis 2 from slices at ``offset + factor * m`` back to ``nz`` slices."""
    pos = np.clip((np.arange(nz) - offset) / factor, 0, thick.shape[2] - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, thick.shape[2] - 1)
    w = (pos - lo).astype(np.float32)
    return thick[:, :, lo] * (1 - w) + thick[:, :, hi] * w
