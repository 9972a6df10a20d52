"""Sample datasets built on the spot from real anatomy that ships with installed packages (no download).

``build_sample("brain-tissue", "data/brain-tissue")`` writes a ready-to-train dataset folder: simulated T1
brains made from the MNI ICBM152 template bundled with nilearn (see :mod:`.template`, :mod:`.brain`,
:mod:`.lesions`; the assembly is in :mod:`.build`). The same seed gives byte-identical images.

=================  ================================================================  ===========================
name               what                                                              tasks (default dim)
=================  ================================================================  ===========================
``brain-tissue``   CSF / grey matter / white matter segmentation, 3 scanner sites    segmentation (3D)
``brain-lesion``   white-matter lesions, 0-3 per subject, subtle to obvious          classification (2D),
                                                                                     segmentation (3D),
                                                                                     detection (3D)
=================  ================================================================  ===========================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medlens.errors import InputError, unknown_name

if TYPE_CHECKING:
    from medlens.data.dataset import Dataset
    from medlens.data.samples.build import ProgressFn

__all__ = ["SAMPLES", "SampleInfo", "build_sample"]


@dataclass(frozen=True)
class SampleInfo:
    """What a sample dataset is and how it is built by default.

    Attributes:
        name: the name ``build_sample`` and ``medlens sample`` take.
        description: one line for listings.
        tasks: the tasks it can be built for; the first is the default.
        default_dim: default number of spatial dimensions per task.
        default_subjects: number of simulated subjects by default (one in four is held out as test).
        resolution: default voxel size in mm.
    """

    name: str
    description: str
    tasks: tuple[str, ...]
    default_dim: dict[str, int]
    default_subjects: int
    resolution: float = 2.0

    @property
    def default_task(self) -> str:
        return self.tasks[0]


#: Every sample dataset, by name.
SAMPLES: dict[str, SampleInfo] = {
    "brain-tissue": SampleInfo(
        name="brain-tissue",
        description="T1 brain tissue segmentation (CSF, GM, WM), 24 simulated subjects from 3 scanner sites",
        tasks=("segmentation",),
        default_dim={"segmentation": 3},
        default_subjects=24,
    ),
    "brain-lesion": SampleInfo(
        name="brain-lesion",
        description="T1 white-matter lesions (0-3 per subject, subtle to obvious): classification of ~400 "
        "axial slices, or 3D segmentation / detection",
        tasks=("classification", "segmentation", "detection"),
        default_dim={"classification": 2, "segmentation": 3, "detection": 3},
        default_subjects=40,
    ),
}

_MAX_SUBJECTS = 10_000
_RESOLUTION_RANGE = (1.0, 8.0)


def build_sample(
    name: str,
    out: str | Path,
    *,
    subjects: int | None = None,
    seed: int = 0,
    task: str | None = None,
    dim: int | None = None,
    resolution: float = 2.0,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> Dataset:
    """Build the sample dataset ``name`` into the folder ``out`` (created atomically).

    Args:
        name: a key of :data:`SAMPLES` (``"brain-tissue"`` or ``"brain-lesion"``).
        out: the dataset folder to create; an existing non-empty folder needs ``overwrite=True``.
        subjects: number of simulated subjects (default: the sample's; subjects 4, 8, ... are the test set).
        seed: random seed; the same seed gives byte-identical images, another seed other subjects.
        task: one of the sample's tasks (default: its first).
        dim: 2 for axial slices, 3 for volumes (default: the task's default).
        resolution: isotropic voxel size in mm, 1 to 8.
        overwrite: replace an existing ``out``.
        progress: called as ``progress(done, total)`` after each simulated subject.

    Returns:
        The written dataset (``dataset.json`` saved, ``root`` = ``out``).

    Raises:
        InputError: unknown name or task, or a value out of range (the message says what is accepted).
    """
    info = SAMPLES.get(name)
    if info is None:
        raise unknown_name("sample dataset", name, list(SAMPLES))
    task = info.default_task if task is None else task
    if task not in info.tasks:
        raise unknown_name(f"{name} task", str(task), list(info.tasks))
    dim = info.default_dim[task] if dim is None else dim
    if isinstance(dim, bool) or dim not in (2, 3):
        raise InputError(f"dim={dim!r}: use 2 (axial slices) or 3 (volumes)")
    subjects = info.default_subjects if subjects is None else subjects
    if isinstance(subjects, bool) or not isinstance(subjects, int) or not 1 <= subjects <= _MAX_SUBJECTS:
        raise InputError(f"subjects={subjects!r}: give a whole number of subjects from 1 to {_MAX_SUBJECTS}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed={seed!r}: give a whole number >= 0")
    lo, hi = _RESOLUTION_RANGE
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int | float)
        or not (math.isfinite(resolution) and lo <= resolution <= hi)
    ):
        raise InputError(f"resolution={resolution!r}: give a voxel size in mm from {lo:g} to {hi:g}")

    from medlens.data.samples.build import build_brain_lesion, build_brain_tissue

    out = Path(out)
    if name == "brain-tissue":
        return build_brain_tissue(out, subjects=subjects, seed=seed, dim=dim, resolution=float(resolution),
                                  overwrite=overwrite, progress=progress)  # fmt: skip
    return build_brain_lesion(out, subjects=subjects, seed=seed, task=task, dim=dim,
                              resolution=float(resolution), overwrite=overwrite, progress=progress)  # fmt: skip
