"""Coded concepts of segment names: SNOMED CT codes for common labels, a stated fallback, run overrides.

DICOM-SEG segment descriptions and TID 1500 findings need a segmented property *category* and *type* (and
optionally the anatomy). Common label names (brain tissues, lesions, tumours, organs: :data:`KNOWN_CODES`)
map to the SNOMED CT codes of pydicom's code dictionary; names are matched lower-cased with every non-letter
removed ("White_matter" -> "whitematter"). Any other name gets the stated fallback: category Tissue
(SCT 85756007) and a type in the local coding scheme ``99MEDLENS`` whose meaning is the label name. A run can
override or add codes in ``run.json`` under ``"segment_codes"``: ``{"blob": {"category": ["49755003", "SCT",
"Morphologically Abnormal Structure"], "type": ["52988006", "SCT", "Lesion"], "anatomy": ["12738006", "SCT",
"Brain"]}}``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medlens.errors import InputError

log = logging.getLogger(__name__)

#: Local coding scheme of label names that have no standard code.
LOCAL_SCHEME = "99MEDLENS"

# (category, type, anatomy) as pydicom ``codes.SCT`` attribute names; matched on the label name lower-cased
# with every non-letter removed ("White_matter" -> "whitematter").
_CATEGORY = {
    "tissue": "Tissue",
    "substance": "BodySubstance",
    "anatomy": "AnatomicalStructure",
    "abnormal": "MorphologicallyAbnormalStructure",
}
#: Known label names -> (category key, SCT type attribute, SCT anatomy attribute or None).
KNOWN_CODES: dict[str, tuple[str, str, str | None]] = {
    "csf": ("substance", "CerebrospinalFluid", "Brain"),
    "cerebrospinalfluid": ("substance", "CerebrospinalFluid", "Brain"),
    "gm": ("tissue", "GrayMatter", "Brain"),
    "greymatter": ("tissue", "GrayMatter", "Brain"),
    "graymatter": ("tissue", "GrayMatter", "Brain"),
    "wm": ("tissue", "WhiteMatter", "Brain"),
    "whitematter": ("tissue", "WhiteMatter", "Brain"),
    "bone": ("tissue", "Bone", None),
    "fat": ("tissue", "Fat", None),
    "muscle": ("tissue", "Muscle", None),
    "blood": ("substance", "Blood", None),
    "lesion": ("abnormal", "Lesion", None),
    "lesions": ("abnormal", "Lesion", None),
    "tumour": ("abnormal", "Neoplasm", None),
    "tumor": ("abnormal", "Neoplasm", None),
    "neoplasm": ("abnormal", "Neoplasm", None),
    "mass": ("abnormal", "Mass", None),
    "nodule": ("abnormal", "Nodule", None),
    "cyst": ("abnormal", "Cyst", None),
    "edema": ("abnormal", "Edema", None),
    "oedema": ("abnormal", "Edema", None),
    "necrosis": ("abnormal", "Necrosis", None),
    "hemorrhage": ("abnormal", "Hemorrhage", None),
    "haemorrhage": ("abnormal", "Hemorrhage", None),
    "thrombus": ("abnormal", "Thrombus", None),
    "pleuraleffusion": ("abnormal", "PleuralEffusion", "Lung"),
    "pneumothorax": ("abnormal", "Pneumothorax", "Lung"),
    "brain": ("anatomy", "Brain", None),
    "brainstem": ("anatomy", "BrainStem", "Brain"),
    "cerebellum": ("anatomy", "Cerebellum", "Brain"),
    "hippocampus": ("anatomy", "Hippocampus", "Brain"),
    "thalamus": ("anatomy", "Thalamus", "Brain"),
    "ventricle": ("anatomy", "LateralVentricle", "Brain"),
    "ventricles": ("anatomy", "LateralVentricle", "Brain"),
    "lateralventricle": ("anatomy", "LateralVentricle", "Brain"),
    "liver": ("anatomy", "Liver", None),
    "kidney": ("anatomy", "Kidney", None),
    "kidneys": ("anatomy", "Kidney", None),
    "spleen": ("anatomy", "Spleen", None),
    "pancreas": ("anatomy", "Pancreas", None),
    "lung": ("anatomy", "Lung", None),
    "lungs": ("anatomy", "Lung", None),
    "heart": ("anatomy", "Heart", None),
    "prostate": ("anatomy", "Prostate", None),
    "bladder": ("anatomy", "Bladder", None),
    "stomach": ("anatomy", "Stomach", None),
    "gallbladder": ("anatomy", "Gallbladder", None),
    "esophagus": ("anatomy", "Esophagus", None),
    "oesophagus": ("anatomy", "Esophagus", None),
    "aorta": ("anatomy", "Aorta", None),
    "colon": ("anatomy", "Colon", None),
    "duodenum": ("anatomy", "Duodenum", None),
    "rectum": ("anatomy", "Rectum", None),
    "uterus": ("anatomy", "Uterus", None),
    "adrenalgland": ("anatomy", "AdrenalGland", None),
    "trachea": ("anatomy", "Trachea", None),
    "femur": ("anatomy", "Femur", None),
    "skull": ("anatomy", "Skull", None),
    "vertebra": ("anatomy", "Vertebra", None),
    "spinalcord": ("anatomy", "SpinalCord", None),
    "breast": ("anatomy", "Breast", None),
    "thyroid": ("anatomy", "Thyroid", None),
    "mandible": ("anatomy", "Mandible", None),
    "eye": ("anatomy", "Eye", None),
    "opticnerve": ("anatomy", "OpticNerve", None),
}


@dataclass(frozen=True)
class SegmentCodes:
    """The coded concepts of one segment (highdicom ``CodedConcept`` objects) and where they came from."""

    category: Any
    type: Any
    anatomy: Any | None
    source: str  # "run.json", "known name" or "fallback"


_TOLD: set[str] = set()  # label names whose fallback was already logged


def _key(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def _coded(value: Any, where: str) -> Any:
    from highdicom.sr import CodedConcept

    if (
        isinstance(value, list | tuple)
        and len(value) == 3
        and all(isinstance(v, str) and v.strip() for v in value)
    ):
        return CodedConcept(value=value[0], scheme_designator=value[1], meaning=value[2])
    raise InputError(
        f"{where}: {value!r} is not a code; write [code value, coding scheme, meaning], "
        'e.g. ["52988006", "SCT", "Lesion"]'
    )


def segment_codes(name: str, overrides: Mapping[str, Any] | None = None) -> SegmentCodes:
    """Category, type and anatomy codes for a label name (see the module docstring for the rules).

    Args:
        name: the label name from the run's ``dataset.labels``.
        overrides: ``run.json["segment_codes"]``: label name -> ``{"category", "type", "anatomy"}``, each
            ``[code value, coding scheme designator, code meaning]``.

    Raises:
        InputError: an override that is not a ``[value, scheme, meaning]`` triple.
    """
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    entry = (overrides or {}).get(name)
    if entry is not None:
        where = f"run.json segment_codes[{name!r}]"
        if not isinstance(entry, Mapping) or "category" not in entry or "type" not in entry:
            raise InputError(f"{where}: needs 'category' and 'type' (and optionally 'anatomy') codes")
        anatomy = _coded(entry["anatomy"], f"{where}.anatomy") if entry.get("anatomy") else None
        return SegmentCodes(
            _coded(entry["category"], f"{where}.category"),
            _coded(entry["type"], f"{where}.type"),
            anatomy,
            "run.json",
        )
    known = KNOWN_CODES.get(_key(name))
    if known is not None:
        cat, typ, anat = known
        return SegmentCodes(
            getattr(codes.SCT, _CATEGORY[cat]),
            getattr(codes.SCT, typ),
            getattr(codes.SCT, anat) if anat else None,
            "known name",
        )
    value = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:16] or "label"
    if name not in _TOLD:
        _TOLD.add(name)
        log.info(
            "label %r has no standard code: category Tissue, type %s:%s (run.json segment_codes can set one)",
            name,
            LOCAL_SCHEME,
            value,
        )
    return SegmentCodes(
        codes.SCT.Tissue,
        CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=name[:64]),
        None,
        "fallback",
    )


def local_scheme_item() -> Any:
    """The CodingSchemeIdentificationSequence item that declares the local ``99MEDLENS`` scheme."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "medlens label and result names"
    item.CodingSchemeResponsibleOrganization = "medlens"
    return item
