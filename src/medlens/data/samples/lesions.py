"""Simulated white-matter lesions: irregular blobs, exact masks, and their bounding boxes.

A lesion is an irregular blob: a randomly oriented ellipsoid (radius 2-10 mm, uniform, each axis
0.7-1.3 times that) whose border is roughened by smoothed noise, restricted to white matter and kept as one
connected piece. It is hypointense on T1 (as chronic demyelinating lesions are): the intensity inside is
multiplied by ``1 - contrast * w``, with ``w`` between 0.6 at the border and 1 in the core. Most lesions are
plainly visible "black holes" (contrast 0.5-0.75: as dark as CSF), 15% are subtle, down to the visibility
limit (0.1-0.5: within the noise of the noisier sites for small lesions); with small lesions and the thin
edge sections of large ones, a classifier cannot be perfect. Nothing here depends on sex, age or site.

Masks are exact by construction: the mask is the set of voxels whose intensity was changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Lesion radius range (mm), drawn uniformly.
RADIUS_MM = (2.0, 10.0)
#: Contrast (fraction of the local intensity removed at the core), log-uniform in one of two ranges: most
#: lesions are plainly visible, :data:`SUBTLE_FRACTION` of them are close to the visibility limit.
CONTRAST_VISIBLE = (0.5, 0.75)
CONTRAST_SUBTLE = (0.1, 0.5)
SUBTLE_FRACTION = 0.15


@dataclass(frozen=True)
class Lesion:
    """One simulated lesion (for the record: radius, contrast and size; the mask holds the voxels)."""

    centre: tuple[int, ...]
    radius_mm: float
    contrast: float
    voxels: int


def lesion_count(rng: np.random.Generator, p_lesion: float) -> int:
    """0 lesions with probability ``1 - p_lesion``, else 1, 2 or 3 with equal probability."""
    has = rng.random() < p_lesion
    n = int(rng.integers(1, 4))
    return n if has else 0


def add_lesions(
    image: np.ndarray,
    wm: np.ndarray,
    mask: np.ndarray,
    resolution: float,
    count: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Insert ``count`` lesions into a noise-free image.

    Args:
        image: noise-free intensity (float32, any scale), ``(X, Y, Z)``.
        wm: white-matter probability on the same grid.
        mask: brain mask.
        resolution: voxel size in mm.
        count: number of lesions to place.
        rng: the subject's lesion generator.

    Returns:
        The image with lesions, the lesion mask (uint8, 0/1) and one :class:`Lesion` per lesion.
    """
    from scipy import ndimage as ndi

    out = image.astype(np.float32, copy=True)
    lesion_mask = np.zeros(image.shape, dtype=np.uint8)
    lesions: list[Lesion] = []
    if count <= 0:
        return out, lesion_mask, lesions
    white = (wm > 0.5) & mask
    depth_mm = ndi.distance_transform_edt(white) * resolution
    for _ in range(count):
        radius = float(rng.uniform(*RADIUS_MM))
        lo, hi = CONTRAST_SUBTLE if rng.random() < SUBTLE_FRACTION else CONTRAST_VISIBLE
        contrast = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        need = min(0.6 * radius, 0.6 * float(depth_mm.max()))
        candidates = np.argwhere(depth_mm >= max(need, resolution * 0.99))
        if len(candidates) == 0:
            candidates = np.argwhere(white)
        if len(candidates) == 0:
            break
        centre = tuple(int(v) for v in candidates[rng.integers(len(candidates))])
        blob, weight, box = _blob(rng, centre, radius, resolution, image.shape)
        blob &= (wm[box] > 0.3) & mask[box]
        blob[tuple(c - b.start for c, b in zip(centre, box, strict=True))] = True
        blob = _component_at(blob, tuple(c - b.start for c, b in zip(centre, box, strict=True)))
        out[box] *= np.where(blob, 1.0 - contrast * weight, 1.0).astype(np.float32)
        lesion_mask[box][blob] = 1
        lesions.append(Lesion(centre, round(radius, 2), round(contrast, 3), int(blob.sum())))
    return out, lesion_mask, lesions


def _blob(
    rng: np.random.Generator,
    centre: tuple[int, ...],
    radius: float,
    resolution: float,
    shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    """An irregular ellipsoidal blob around ``centre``: (boolean blob, weight in [0.6, 1], box in the volume)."""
    from scipy import ndimage as ndi

    half = int(np.ceil(1.6 * radius / resolution)) + 1
    box = tuple(slice(max(c - half, 0), min(c + half + 1, n)) for c, n in zip(centre, shape, strict=True))
    axes = [(np.arange(b.start, b.stop) - c) * resolution for b, c in zip(box, centre, strict=True)]
    pos = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # mm from the centre
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # a random orientation
    radii = radius * rng.uniform(0.7, 1.3, 3)
    d2 = np.sum(((pos @ q) / radii) ** 2, axis=-1)
    noise = ndi.gaussian_filter(rng.normal(size=d2.shape), max(0.35 * radius / resolution, 0.6))
    noise /= noise.std() + 1e-6
    field = 1.0 - d2 + 0.35 * noise
    blob = field > 0.2
    weight = np.clip(0.6 + 0.4 * field, 0.6, 1.0).astype(np.float32)
    return blob, weight, box


def _component_at(blob: np.ndarray, seed: tuple[int, ...]) -> np.ndarray:
    """The connected component (full connectivity) of ``blob`` that contains ``seed``."""
    from scipy import ndimage as ndi

    labels, _ = ndi.label(blob, structure=np.ones((3,) * blob.ndim, dtype=bool))
    return labels == labels[seed]


def lesion_boxes(mask: np.ndarray) -> list[list[int]]:
    """Bounding boxes of the connected lesions of a 2D or 3D mask (full connectivity).

    Returns:
        One box per connected component, ``[i0, j0, (k0,) i1, j1, (k1)]`` in voxel indices, min inclusive and
        max exclusive, ordered by their first voxel.
    """
    from scipy import ndimage as ndi

    labels, _ = ndi.label(mask > 0, structure=np.ones((3,) * mask.ndim, dtype=bool))
    boxes = []
    for sl in ndi.find_objects(labels):
        if sl is not None:
            boxes.append([int(s.start) for s in sl] + [int(s.stop) for s in sl])
    return sorted(boxes)
