"""The one image type of medlens.

World convention (documented once, used everywhere)
---------------------------------------------------
* ``array`` is channel-first: ``(C, i, j)`` for 2D and ``(C, i, j, k)`` for 3D images.
* Spatial axes follow the NIfTI/ITK index order: ``i`` runs along image *columns* (left to right on screen),
  ``j`` along image *rows* (top to bottom), ``k`` across slices. A PNG of H rows and W columns therefore has
  ``array.shape == (C, W, H)``; this is the order MONAI, nibabel and SimpleITK use, so a 2D image converted
  to NIfTI shows upright in every viewer.
* ``affine`` maps a voxel index ``(i, j, k, 1)`` to world coordinates in millimetres in **RAS+**, the
  NIfTI/nibabel/MONAI convention: +x = patient Right, +y = Anterior, +z = Superior. DICOM and ITK use LPS+
  (+x = Left, +y = Posterior, +z = Superior); converting is a sign flip of x and y (:func:`lps_to_ras`).
* 2D images have a 3x3 affine over the image plane (``(i, j) -> (x, y)`` in mm), usually just the pixel
  spacing.

``spacing``, ``origin`` and ``direction`` are derived from the affine, so they can never disagree with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

#: Sign flip between DICOM/ITK LPS+ and NIfTI RAS+ world coordinates (its own inverse).
LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Modality codes medlens understands (DICOM Modality values plus a few for non-DICOM sources).
MODALITIES = ("CT", "MR", "PT", "NM", "US", "XR", "CR", "DX", "MG", "OCT", "OP", "SM", "RTDOSE", "OT")


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Convert a 4x4 LPS+ affine (DICOM, ITK) to RAS+ (NIfTI), or back: the flip is its own inverse."""
    return LPS_RAS_FLIP @ np.asarray(affine, dtype=np.float64)


@dataclass(eq=False)
class Image:
    """Voxels plus the geometry and provenance needed to put them back where they came from.

    Attributes:
        array: voxel values, channel-first ``(C, *spatial)`` with 2 or 3 spatial axes (see module docstring).
        affine: ``(ndim+1, ndim+1)`` float64 index-to-world matrix in mm (RAS+ for 3D).
        modality: a DICOM-style modality code (``"CT"``, ``"MR"``, ...; ``"OT"`` when unknown).
        meta: provenance: ``source`` (path), ``format``, and format specific keys such as
            ``SeriesInstanceUID``, ``channel_names`` or ``StudyInstanceUID``. JSON-friendly values only.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = "OT"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim not in (3, 4):
            raise ValueError(
                f"Image.array must be channel-first with 2 or 3 spatial axes, got shape {arr.shape}"
            )
        aff = np.asarray(self.affine, dtype=np.float64)
        nd = arr.ndim - 1
        if aff.shape != (nd + 1, nd + 1):
            raise ValueError(f"Image.affine must be {nd + 1}x{nd + 1} for a {nd}D image, got {aff.shape}")
        if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:nd, :nd])) < 1e-12:
            raise ValueError(f"Image.affine is singular or not finite: {aff.tolist()}")
        self.array = arr
        self.affine = aff

    # ---- shape -------------------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.array.ndim - 1

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[1:])

    # ---- geometry (all derived from the affine) ------------------------------------------------------------
    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis (column norms of the affine)."""
        nd = self.ndim
        return tuple(float(s) for s in np.linalg.norm(self.affine[:nd, :nd], axis=0))

    @property
    def origin(self) -> tuple[float, ...]:
        """World position (mm) of the centre of voxel 0."""
        nd = self.ndim
        return tuple(float(v) for v in self.affine[:nd, nd])

    @property
    def direction(self) -> np.ndarray:
        """Unit direction cosines, one column per spatial axis."""
        nd = self.ndim
        return self.affine[:nd, :nd] / np.asarray(self.spacing)[None, :]

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Map voxel indices ``(..., ndim)`` to world coordinates ``(..., ndim)`` in mm."""
        idx = np.asarray(index, dtype=np.float64)
        nd = self.ndim
        return idx @ self.affine[:nd, :nd].T + self.affine[:nd, nd]

    def world_to_index(self, world: np.ndarray) -> np.ndarray:
        """Map world coordinates ``(..., ndim)`` in mm to (fractional) voxel indices."""
        inv = np.linalg.inv(self.affine)
        nd = self.ndim
        w = np.asarray(world, dtype=np.float64)
        return w @ inv[:nd, :nd].T + inv[:nd, nd]

    def same_geometry(self, other: Image, atol: float = 1e-3) -> bool:
        """True when both images have the same spatial shape and index-to-world mapping (within ``atol`` mm)."""
        return self.spatial_shape == other.spatial_shape and bool(
            np.allclose(self.affine, other.affine, atol=atol)
        )

    # ---- construction helpers ------------------------------------------------------------------------------
    def with_array(self, array: np.ndarray, **meta: Any) -> Image:
        """A new image with the same geometry and modality and a different array (e.g. a label map)."""
        return replace(self, array=np.asarray(array), meta={**self.meta, **meta})

    @classmethod
    def from_spacing(
        cls,
        array: np.ndarray,
        spacing: tuple[float, ...] | None = None,
        origin: tuple[float, ...] | None = None,
        modality: str = "OT",
        meta: dict[str, Any] | None = None,
    ) -> Image:
        """Build an axis-aligned image from a channel-first array, spacing (mm) and origin (mm)."""
        arr = np.asarray(array)
        nd = arr.ndim - 1
        sp = np.ones(nd) if spacing is None else np.asarray(spacing, dtype=np.float64)
        org = np.zeros(nd) if origin is None else np.asarray(origin, dtype=np.float64)
        if sp.shape != (nd,) or org.shape != (nd,):
            raise ValueError(f"spacing/origin must have {nd} values for a {nd}D image")
        aff = np.eye(nd + 1)
        aff[:nd, :nd] = np.diag(sp)
        aff[:nd, nd] = org
        return cls(array=arr, affine=aff, modality=modality, meta=dict(meta or {}))

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Image({self.modality}, channels={self.num_channels}, shape={self.spatial_shape}, "
            f"spacing=({sp}) mm, dtype={self.array.dtype}, source={self.meta.get('source', '?')})"
        )
