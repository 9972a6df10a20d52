"""The anatomy behind the sample datasets: the MNI ICBM152 2009 template that ships with nilearn.

nilearn installs the skull-stripped T1 template and its grey- and white-matter probability maps
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, 197x233x189 at 1 mm,
scaled 0-255). They are read directly with nibabel (importing nilearn itself costs seconds and could try
the network for other files; these three never need it). There is no CSF map, so one is derived:

* brain mask: the template's non-zero voxels with interior holes filled (the ventricles);
* ``p_csf = clip(1 - p_gm - p_wm, 0, 1)`` inside the mask, 0 outside (computed after deformation, from
  the interpolated mask and maps, in :func:`medlens.data.samples.brain.simulate_anatomy`).

For a target voxel size the 1 mm maps are low-pass filtered once (so sampling them on a coarser grid does not
alias) and cached in-process; subjects are then sampled from these 1 mm arrays through their own
deformation (see :mod:`medlens.data.samples.brain`). The output grid is the template brain's bounding box
plus a margin wide enough for the largest simulated head, so every subject of a sample has one shape.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from medlens.errors import MedlensError

logger = logging.getLogger(__name__)

#: File names of the template inside ``nilearn/datasets/data``.
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Largest per-axis scaling a simulated head may have relative to the template (see ``brain.py``).
MAX_SCALE = 1.08
#: Extra margin (mm) around the largest head: rotation and elastic displacement.
GRID_MARGIN_MM = 8.0
#: Padding (mm) kept around the brain in the cropped 1 mm arrays (interpolation support).
_CROP_PAD_MM = 4


@dataclass(frozen=True)
class Template:
    """The template's maps at 1 mm, low-pass filtered for one output voxel size, plus the output grid.

    Attributes:
        t1: T1 intensity in [0, 1], shape ``(X, Y, Z)``, 1 mm voxels, cropped around the brain.
        gm / wm: tissue probabilities in [0, 1], same grid as ``t1``.
        mask: brain mask as float in [0, 1] (interpolated, so smooth at the edge), same grid.
        origin: world position (mm, RAS+) of voxel ``(0, 0, 0)`` of the 1 mm arrays (axes are world axes).
        centre: world position (mm) of the brain's centre of mass.
        resolution: output voxel size in mm.
        grid_shape: shape of the output grid every subject is sampled on.
        grid_affine: 4x4 RAS+ affine of the output grid.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    origin: np.ndarray
    centre: np.ndarray
    resolution: float
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray

    def grid_world(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates (mm) of the output grid's voxel centres along each axis (axis-aligned grid)."""
        axes = []
        for a in range(3):
            n = self.grid_shape[a]
            axes.append(self.grid_affine[a, 3] + self.resolution * np.arange(n, dtype=np.float64))
        return axes[0], axes[1], axes[2]


def template_dir() -> Path:
    """Folder holding nilearn's bundled MNI152 files.

    Raises:
        MedlensError: nilearn is not installed or its bundled template files are missing.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MedlensError(
            "the sample datasets need nilearn's bundled MNI152 template, but nilearn is not installed "
            "(pip install 'nilearn>=0.10')"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise MedlensError(
            f"{folder}: nilearn's bundled template file(s) {', '.join(missing)} are missing "
            "(reinstall nilearn: pip install --force-reinstall 'nilearn>=0.10')"
        )
    return folder


@lru_cache(maxsize=1)
def _raw_maps() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The 1 mm maps cropped around the brain (float32 in [0, 1]) and the crop's world origin."""
    import nibabel as nib
    from scipy import ndimage as ndi

    folder = template_dir()
    raw: dict[str, np.ndarray] = {}
    affine = np.eye(4)
    for key, name in TEMPLATE_FILES.items():
        img = nib.Nifti1Image.from_filename(str(folder / name))
        raw[key] = np.asarray(img.dataobj)  # uint8
        affine = np.asarray(img.affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.eye(3)):
        # The sampling code relies on 1 mm voxels aligned with the RAS+ world axes, as nilearn ships them.
        raise MedlensError(
            f"{folder}: the MNI152 template is not a 1 mm RAS+ grid (affine {affine.tolist()})"
        )

    brain = raw["t1"] > 0
    lo, hi = np.zeros(3, dtype=int), np.zeros(3, dtype=int)
    for axis in range(3):
        present = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        lo[axis] = max(int(present[0]) - _CROP_PAD_MM, 0)
        hi[axis] = min(int(present[-1]) + 1 + _CROP_PAD_MM, brain.shape[axis])
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    out = {key: arr[crop].astype(np.float32) / np.float32(255.0) for key, arr in raw.items()}
    out["mask"] = ndi.binary_fill_holes(brain[crop]).astype(np.float32)
    origin = affine[:3, 3] + lo
    logger.debug("loaded MNI152 template from %s, cropped to %s", folder, out["t1"].shape)
    return out, origin


@lru_cache(maxsize=2)
def load_template(resolution: float) -> Template:
    """The template prepared for sampling at ``resolution`` mm (cached per resolution in-process).

    Args:
        resolution: output voxel size in mm (isotropic).
    """
    from scipy import ndimage as ndi

    maps, origin = _raw_maps()
    # Gaussian whose FWHM widens the 1 mm voxel to the output voxel: the anti-aliasing filter of the resampling.
    sigma = float(np.sqrt(max(resolution**2 - 1.0, 0.0)) / 2.3548)
    filtered = {}
    for key, arr in maps.items():
        filtered[key] = ndi.gaussian_filter(arr, sigma, mode="constant") if sigma > 0.05 else arr.copy()
        filtered[key].setflags(write=False)

    mask = maps["mask"] > 0.5
    coords = np.argwhere(mask)
    centre = origin + coords.mean(axis=0)
    lo_w = centre - (centre - (origin + coords.min(axis=0))) * MAX_SCALE - GRID_MARGIN_MM
    hi_w = centre + (origin + coords.max(axis=0) - centre) * MAX_SCALE + GRID_MARGIN_MM
    shape = tuple(int(np.ceil((h - lo) / resolution)) + 1 for lo, h in zip(lo_w, hi_w, strict=True))
    grid_affine = np.eye(4)
    grid_affine[:3, :3] = np.diag([resolution] * 3)
    grid_affine[:3, 3] = np.round(lo_w, 3)
    return Template(
        t1=filtered["t1"],
        gm=filtered["gm"],
        wm=filtered["wm"],
        mask=filtered["mask"],
        origin=origin,
        centre=centre,
        resolution=float(resolution),
        grid_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        grid_affine=grid_affine,
    )
