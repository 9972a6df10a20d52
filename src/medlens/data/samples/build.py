"""Assemble the sample datasets: simulate subjects, cut slices, write NIfTI files and ``dataset.json``.

Layout (nnU-Net-like, so the folder also works with nnU-Net v2 and MSD tools)::

    dataset.json
    imagesTr/<case>_0000.nii.gz   imagesTs/<case>_0000.nii.gz     int16 T1, skull-stripped
    labelsTr/<case>.nii.gz        labelsTs/<case>.nii.gz          uint8 label maps (segmentation)
    lesion_masks/<case>.nii.gz                                    brain-lesion classification/detection:
                                                                  the exact lesion masks, for explanations

Subjects with ``index % 4 == 3`` form the held-out ``test`` list (one in four, every site represented);
slices of one subject share its ``patient_id``, so patient-level splits keep them together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from medlens._fs import atomic_dir
from medlens.data.dataset import Case, Dataset
from medlens.data.samples import brain, lesions
from medlens.data.samples.template import TEMPLATE_FILES, Template, load_template
from medlens.io import Image, write_image

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

#: Axial slices per subject in the 2D variant of brain-tissue.
TISSUE_SLICES = 6
#: At most this many lesion slices per subject in the 2D variant of brain-lesion (as many negatives are added).
LESION_POSITIVE_SLICES = 8
#: A slice is a candidate when the brain covers at least this fraction of the subject's largest axial section.
MIN_SECTION = 0.3

TEMPLATE_REFERENCE = {
    "name": "MNI ICBM152 2009a nonlinear symmetric (skull-stripped T1, GM and WM probability maps)",
    "files": sorted(TEMPLATE_FILES.values()),
    "shipped_with": "nilearn (nilearn/datasets/data)",
    "references": [
        "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average age-appropriate "
        "brain templates from birth to adulthood. NeuroImage 2009;47(Suppl 1):S102.",
        "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average age-appropriate "
        "atlases for pediatric studies. NeuroImage 2011;54(1):313-327.",
    ],
    "copyright": "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University.",
}

_SIMULATION_TEXT = (
    "SIMULATED data, not real patients: each subject is the MNI ICBM152 2009 brain template (shipped with "
    "nilearn) under a random affine (rotation, +-8% scaling) and smooth elastic deformation, imaged as a "
    "skull-stripped T1 by one of three simulated scanner sites (site-A, site-B, site-C) that differ in "
    "tissue contrast, noise level, resolution and intensity scale, with a smooth bias field and Rician noise. "
    "Sex and age are random; sex changes only the head size (men 4% larger on average), age nothing."
)


@dataclass
class Subject:
    """One simulated, acquired subject."""

    demo: brain.Demographics
    test: bool
    image: np.ndarray  # int16 (X, Y, Z)
    tissue: np.ndarray  # uint8 (X, Y, Z): 0 background, 1 CSF, 2 GM, 3 WM
    lesion_mask: np.ndarray | None = None  # uint8 (X, Y, Z)
    lesions: list[lesions.Lesion] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        d = self.demo
        return {
            "patient_id": d.subject_id,
            "site": d.site.name,
            "sex": d.sex,
            "age": d.age,
            "simulated": True,
        }


def simulate_subject(template: Template, seed: int, index: int, p_lesion: float | None = None) -> Subject:
    """Simulate and acquire subject ``index``; with ``p_lesion`` it may carry white-matter lesions.

    Args:
        template: the prepared template (fixes the voxel size and grid).
        seed: the dataset seed.
        index: subject index (0-based); fixes its site and its random streams.
        p_lesion: probability that the subject has lesions (1-3); ``None`` for no lesion simulation.
    """
    demo = brain.demographics(seed, index)
    anatomy = brain.simulate_anatomy(template, seed, index)
    clean = brain.site_contrast(anatomy, demo.site)
    lesion_mask = None
    found: list[lesions.Lesion] = []
    if p_lesion is not None:
        rng = brain.subject_rng(seed, index, brain.STREAM_LESIONS)
        count = lesions.lesion_count(rng, p_lesion)
        clean, lesion_mask, found = lesions.add_lesions(
            clean, anatomy.probs[2], anatomy.mask, template.resolution, count, rng
        )
    rng = brain.subject_rng(seed, index, brain.STREAM_ACQUISITION)
    image = brain.acquire(clean, anatomy.mask, demo.site, template.resolution, rng)
    return Subject(demo, index % 4 == 3, image, anatomy.labels, lesion_mask, found)


def candidate_slices(tissue: np.ndarray) -> np.ndarray:
    """Axial slice indices where the brain section is at least :data:`MIN_SECTION` of the largest one."""
    area = (tissue > 0).sum(axis=(0, 1))
    return np.flatnonzero(area >= MIN_SECTION * area.max())


def evenly(items: np.ndarray, n: int) -> np.ndarray:
    """``n`` items evenly spaced through ``items`` (all of them when there are at most ``n``)."""
    if len(items) <= n:
        return np.asarray(items)
    return np.asarray(items)[np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))]


class _Writer:
    """Writes a dataset's NIfTI files (and builds its cases) into the temporary folder."""

    def __init__(self, root: Path, template: Template) -> None:
        self.root = root
        self.affine3 = template.grid_affine
        self.affine2 = np.eye(3)
        self.affine2[:2, :2] = template.grid_affine[:2, :2]
        self.affine2[:2, 2] = template.grid_affine[:2, 3]

    def write(self, rel: str, array: np.ndarray, modality: str = "MR") -> str:
        affine = self.affine3 if array.ndim == 3 else self.affine2
        write_image(Image(array[None], affine, modality=modality), self.root / rel)
        return rel

    def image(self, case_id: str, test: bool, array: np.ndarray) -> str:
        return self.write(f"images{'Ts' if test else 'Tr'}/{case_id}_0000.nii.gz", array)

    def label(self, case_id: str, test: bool, array: np.ndarray) -> str:
        return self.write(f"labels{'Ts' if test else 'Tr'}/{case_id}.nii.gz", array.astype(np.uint8), "OT")


def _provenance(name: str, seed: int, subjects: int, resolution: float, dim: int) -> dict[str, Any]:
    return {
        "file_ending": ".nii.gz",
        "simulated": True,
        "sample": {"name": name, "seed": seed, "subjects": subjects, "resolution_mm": resolution, "dim": dim,
                   "sites": [s.name for s in brain.SITES]},
        "template": TEMPLATE_REFERENCE,
    }  # fmt: skip


def _subjects(
    template: Template, seed: int, subjects: int, p_lesion: float | None, progress: ProgressFn | None
) -> Iterator[Subject]:
    for index in range(subjects):
        yield simulate_subject(template, seed, index, p_lesion)
        if progress is not None:
            progress(index + 1, subjects)


def build_brain_tissue(
    out: Path, *, subjects: int, seed: int, dim: int, resolution: float, overwrite: bool,
    progress: ProgressFn | None = None,
) -> Dataset:  # fmt: skip
    """Build ``brain-tissue``: CSF/GM/WM segmentation of simulated T1 brains (3D, or axial slices)."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        template = load_template(resolution)
        writer = _Writer(tmp, template)
        training: list[Case] = []
        test: list[Case] = []
        for subj in _subjects(template, seed, subjects, None, progress):
            sid = subj.demo.subject_id
            if dim == 3:
                items = [(sid, subj.image, subj.tissue)]
            else:
                items = [(f"{sid}_z{k:03d}", subj.image[:, :, k], subj.tissue[:, :, k])
                         for k in evenly(candidate_slices(subj.tissue), TISSUE_SLICES)]  # fmt: skip
            for cid, img, lab in items:
                case = Case(cid, [writer.image(cid, subj.test, img)], writer.label(cid, subj.test, lab),
                            meta=subj.meta())  # fmt: skip
                (test if subj.test else training).append(case)
        what = "volumes" if dim == 3 else f"axial slices ({TISSUE_SLICES} per subject)"
        ds = Dataset(
            root=tmp, name="brain-tissue", task="segmentation",
            labels={"background": 0, "CSF": 1, "GM": 2, "WM": 3}, channels={0: "T1"}, modalities={0: "MR"},
            training=training, test=test, ndim=dim,
            description=f"Brain tissue segmentation (CSF, grey matter, white matter) of T1 {what} at "
            f"{resolution:g} mm, {subjects} subjects. {_SIMULATION_TEXT} Labels are the argmax of the deformed "
            "template tissue probabilities (CSF = brain mask minus GM and WM).",
            extra=_provenance("brain-tissue", seed, subjects, resolution, dim),
        )  # fmt: skip
        ds.save()
    ds.root = Path(out)
    logger.info("built brain-tissue in %s: %d training, %d test cases", out, len(training), len(test))
    return ds


def build_brain_lesion(
    out: Path, *, subjects: int, seed: int, task: str, dim: int, resolution: float, overwrite: bool,
    progress: ProgressFn | None = None,
) -> Dataset:  # fmt: skip
    """Build ``brain-lesion``: white-matter lesions for classification, segmentation or detection (2D or 3D)."""
    # Subject-level classification is balanced by construction; elsewhere most subjects carry lesions.
    p_lesion = 0.5 if (task == "classification" and dim == 3) else 0.75
    with atomic_dir(out, overwrite=overwrite) as tmp:
        template = load_template(resolution)
        writer = _Writer(tmp, template)
        training: list[Case] = []
        test: list[Case] = []
        sims = list(_subjects(template, seed, subjects, p_lesion, progress))
        if dim == 3:
            items = [(s, s.demo.subject_id, s.image, s.lesion_mask) for s in sims]
        else:
            items = [(s, f"{s.demo.subject_id}_z{k:03d}", s.image[:, :, k], s.lesion_mask[:, :, k])  # type: ignore[index]
                     for s, k in balanced_slices(sims, seed)]  # fmt: skip
        for subj, cid, img, mask in items:
            assert mask is not None
            case = Case(cid, [writer.image(cid, subj.test, img)], meta=subj.meta())
            if task == "segmentation":
                case.label = writer.label(cid, subj.test, mask)
            else:
                writer.write(f"lesion_masks/{cid}.nii.gz", mask.astype(np.uint8), "OT")
                if task == "classification":
                    case.label = int(mask.any())
                else:
                    boxes = lesions.lesion_boxes(mask)
                    case.boxes = cast("list[list[float]]", boxes)  # integer voxel indices
                    case.box_labels = [1] * len(boxes)
            (test if subj.test else training).append(case)
        labels = {"no lesion": 0, "lesion": 1} if task == "classification" else {"background": 0, "lesion": 1}
        unit = (
            "subject volumes" if dim == 3 else "axial slices (as many lesion as lesion-free slices per site)"
        )
        target = {
            "classification": "Label: 1 if the image contains any lesion voxel, else 0.",
            "segmentation": "Labels: exact lesion masks.",
            "detection": "Boxes: one per connected lesion, voxel indices [i0, j0, (k0,) i1, j1, (k1)], min "
            "inclusive, max exclusive; box_labels 1 = lesion.",
        }[task]
        extra = _provenance("brain-lesion", seed, subjects, resolution, dim)
        if task != "segmentation":
            extra["lesion_masks"] = "lesion_masks/{id}.nii.gz"
        ds = Dataset(
            root=tmp, name="brain-lesion", task=task, labels=labels, channels={0: "T1"}, modalities={0: "MR"},
            training=training, test=test, ndim=dim,
            classification_type="binary" if task == "classification" else None,
            description=f"White-matter lesion {task} on T1 {unit} at {resolution:g} mm, {subjects} subjects. "
            f"{_SIMULATION_TEXT} Lesions: 0-3 irregular hypointense white-matter blobs of radius 2-10 mm whose "
            "contrast ranges from obvious to near the visibility limit; their number and contrast do not depend "
            f"on sex, age or site. {target}",
            extra=extra,
        )  # fmt: skip
        ds.save()
    ds.root = Path(out)
    logger.info(
        "built brain-lesion (%s) in %s: %d training, %d test cases", task, out, len(training), len(test)
    )
    return ds


def balanced_slices(subjects: list[Subject], seed: int) -> list[tuple[Subject, int]]:
    """Pick lesion and lesion-free axial slices, as many of each, at matching heights in the head.

    Each lesion-bearing subject gives up to :data:`LESION_POSITIVE_SLICES` lesion slices (those with the
    largest lesion sections). For each of them a lesion-free slice is drawn at the nearest slice height from
    a subject of the same site and the same split (training or test), so neither the slice position nor the
    site gives the label away and both splits stay balanced. Output is ordered by subject.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
    positives: list[tuple[int, int]] = []
    pool: list[tuple[int, int]] = []
    for s, subj in enumerate(subjects):
        assert subj.lesion_mask is not None
        cand = candidate_slices(subj.tissue)
        area = subj.lesion_mask[:, :, cand].sum(axis=(0, 1))
        has = area > 0
        # The largest lesion sections first (ties: lowest slice), so most positives show a lesion's body.
        order = np.lexsort((cand[has], -area[has]))[:LESION_POSITIVE_SLICES]
        positives += [(s, int(k)) for k in sorted(cand[has][order])]
        pool += [(s, int(k)) for k in cand[~has]]
    pool_k = np.array([k for _, k in pool], dtype=float)
    pool_site = np.array([subjects[s].demo.site.name for s, _ in pool])
    pool_test = np.array([subjects[s].test for s, _ in pool], dtype=bool)
    free = np.ones(len(pool), dtype=bool)
    chosen = list(positives)
    for s, k in positives:
        same_split = free & (pool_test == subjects[s].test)
        for allowed in (same_split & (pool_site == subjects[s].demo.site.name), same_split, free):
            if allowed.any():
                dist = np.where(allowed, np.abs(pool_k - k), np.inf)
                nearest = np.flatnonzero(dist == dist.min())
                pick = int(nearest[rng.integers(len(nearest))])
                free[pick] = False
                chosen.append(pool[pick])
                break
    chosen.sort()
    return [(subjects[s], k) for s, k in chosen]
