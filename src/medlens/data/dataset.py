"""A medlens dataset: a folder with a ``dataset.json`` (schema in ``docs/dataset.md``).

The file is a superset of the Medical Segmentation Decathlon and nnU-Net v2 ``dataset.json``: those load
unchanged, and medlens adds a ``task`` field and per-case metadata. Paths inside are relative to the folder.
Loading validates the *structure* (keys, types, declared classes); ``medlens dataset check`` (``check.py``)
validates the *files*.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medlens._fs import atomic_write_json
from medlens.errors import DatasetError, did_you_mean

if TYPE_CHECKING:
    from medlens.io.image import Image

TASKS = (
    "classification",
    "segmentation",
    "detection",
    "registration",
    "reconstruction",
    "enhancement",
    "synthesis",
)
CLASSIFICATION_TYPES = ("binary", "multiclass", "multilabel", "ordinal")

#: Keys of a case entry that describe its files and targets; every other key is metadata.
STRUCTURAL_KEYS = ("id", "image", "label", "boxes", "box_labels", "target", "fixed", "moving", "split")
#: Metadata keys with a fixed meaning (any other key, e.g. a CSV column, is kept as is).
KNOWN_META = ("patient_id", "site", "sex", "age", "scanner")

SCHEMA_VERSION = 1


@dataclass
class Case:
    """One case (subject, study or image) of a dataset.

    Attributes:
        id: unique case identifier.
        image: image path(s) relative to the dataset root; a list holds one file per channel.
        label: segmentation label map path, or a class index (classification), or a list of 0/1 per label
            (multi-label), or ``None`` for unlabelled cases.
        boxes: detection boxes in voxel indices ``[i0, j0, (k0,) i1, j1, (k1)]``, min inclusive, max exclusive.
        box_labels: class index per box.
        target: path of the target image (reconstruction, enhancement, synthesis).
        fixed / moving: image paths of a registration pair.
        split: a fixed split the source prescribes (``"train"``, ``"val"`` or ``"test"``), else ``None``.
        meta: every other key: ``patient_id``, ``site``, ``sex``, ``age`` and any CSV column.
    """

    id: str
    image: list[str]
    label: str | int | list[int] | None = None
    boxes: list[list[float]] | None = None
    box_labels: list[int] | None = None
    target: str | None = None
    fixed: str | None = None
    moving: str | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def patient_id(self) -> str:
        """The patient this case belongs to (the case id when the dataset does not say)."""
        return str(self.meta.get("patient_id", self.id))

    @property
    def site(self) -> str | None:
        s = self.meta.get("site")
        return None if s is None else str(s)

    def files(self) -> list[str]:
        """Every file this case refers to, relative to the dataset root."""
        out = list(self.image)
        for v in (self.label if isinstance(self.label, str) else None, self.target, self.fixed, self.moving):
            if v:
                out.append(v)
        return out

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "image": self.image[0] if len(self.image) == 1 else self.image}
        for key in ("label", "boxes", "box_labels", "target", "fixed", "moving", "split"):
            v = getattr(self, key)
            if v is not None:
                d[key] = v
        d.update(self.meta)
        return d


@dataclass
class Dataset:
    """A loaded ``dataset.json`` and the folder it lives in.

    Attributes:
        root: the dataset folder.
        name: dataset name.
        task: one of :data:`TASKS`.
        labels: class name -> integer value (segmentation values or class indices).
        channels: channel index -> name (``"T1"``, ``"CT"``...).
        modalities: channel index -> modality code (``"MR"``, ``"CT"``...).
        training / test: the cases.
        classification_type: for classification, one of :data:`CLASSIFICATION_TYPES`.
        ndim: 2 or 3 spatial dimensions of the images, when declared.
        description / extra: free text and any other top-level keys (kept on save).
    """

    root: Path
    name: str
    task: str
    labels: dict[str, int]
    channels: dict[int, str]
    modalities: dict[int, str]
    training: list[Case]
    test: list[Case] = field(default_factory=list)
    classification_type: str | None = None
    ndim: int | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def json_path(self) -> Path:
        return self.root / "dataset.json"

    @property
    def cases(self) -> list[Case]:
        return [*self.training, *self.test]

    @property
    def num_channels(self) -> int:
        return max(len(self.channels), 1)

    @property
    def class_names(self) -> list[str]:
        """Class names ordered by value."""
        return [n for n, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]

    def path(self, rel: str) -> Path:
        """Absolute path of a file referred to in ``dataset.json``."""
        return (self.root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        ids = [c.id for c in self.cases]
        raise DatasetError(f"{self.json_path}: no case {case_id!r}.{did_you_mean(case_id, ids)}")

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "task": self.task,
            "tensorImageSize": f"{self.ndim}D" if self.ndim else None,
            "channel_names": {str(k): v for k, v in sorted(self.channels.items())},
            "modality": {str(k): v for k, v in sorted(self.modalities.items())},
            "labels": dict(sorted(self.labels.items(), key=lambda kv: kv[1])),
            "numTraining": len(self.training),
            "numTest": len(self.test),
        }
        if self.classification_type:
            d["classification_type"] = self.classification_type
        d["medlens_schema"] = SCHEMA_VERSION
        d.update(self.extra)
        d["training"] = [c.to_json() for c in self.training]
        d["test"] = [c.to_json() for c in self.test]
        return {k: v for k, v in d.items() if v is not None}

    def save(self) -> None:
        """Write ``dataset.json`` atomically."""
        atomic_write_json(self.json_path, self.to_json())


def load_dataset(root: str | Path) -> Dataset:
    """Load and structurally validate the dataset in folder ``root`` (or a path to its ``dataset.json``).

    Raises:
        DatasetError: naming the file and the key that is wrong, and what would be accepted.
    """
    root = Path(root)
    jpath = root if root.name == "dataset.json" else root / "dataset.json"
    root = jpath.parent
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    if not jpath.is_file():
        raise DatasetError(
            f"{root}: has no dataset.json (make one with 'medlens dataset import' or 'medlens sample')"
        )
    try:
        raw = json.loads(jpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{jpath}: is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{jpath}: must hold a JSON object at the top level")
    return dataset_from_json(raw, root, where=str(jpath))


def dataset_from_json(raw: dict[str, Any], root: Path, where: str = "dataset.json") -> Dataset:
    """Build a :class:`Dataset` from parsed JSON (see :func:`load_dataset`)."""
    task = raw.get("task", "segmentation")
    if task not in TASKS:
        raise DatasetError(
            f"{where}: task {task!r} is not a medlens task.{did_you_mean(task, TASKS)} Use one of: {', '.join(TASKS)}"
        )
    labels = _parse_labels(raw.get("labels", {}), where)
    channels, modalities = _parse_channels(raw, where)
    ctype = raw.get("classification_type")
    if task == "classification":
        if ctype is None:
            ctype = "binary" if len(labels) <= 2 else "multiclass"
        if ctype not in CLASSIFICATION_TYPES:
            raise DatasetError(
                f"{where}: classification_type {ctype!r} is unknown.{did_you_mean(ctype, CLASSIFICATION_TYPES)}"
                f" Use one of: {', '.join(CLASSIFICATION_TYPES)}"
            )
    ndim = None
    tis = raw.get("tensorImageSize")
    if isinstance(tis, str) and tis[:1] in "234" and tis.endswith("D"):
        ndim = 2 if tis.startswith("2") else 3
    known_top = {
        "name", "description", "task", "tensorImageSize", "channel_names", "modality", "labels",
        "numTraining", "numTest", "classification_type", "medlens_schema", "training", "test", "file_ending",
    }  # fmt: skip
    extra = {k: v for k, v in raw.items() if k not in known_top}
    if "file_ending" in raw:
        extra["file_ending"] = raw["file_ending"]
    training = _parse_cases(raw.get("training", []), "training", where)
    test = _parse_cases(raw.get("test", []), "test", where)
    seen: dict[str, str] = {}
    for c in [*training, *test]:
        if c.id in seen:
            raise DatasetError(f"{where}: case id {c.id!r} appears twice; case ids must be unique")
        seen[c.id] = c.id
    return Dataset(
        root=root,
        name=str(raw.get("name", root.name)),
        task=task,
        labels=labels,
        channels=channels,
        modalities=modalities,
        training=training,
        test=test,
        classification_type=ctype,
        ndim=ndim,
        description=str(raw.get("description", "")),
        extra=extra,
    )


def _parse_labels(raw: Any, where: str) -> dict[str, int]:
    """Accept nnU-Net v2 (``{"name": 0}``) and MSD (``{"0": "name"}``) label maps."""
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: 'labels' must be an object mapping class names to integers")
    out: dict[str, int] = {}
    for k, v in raw.items():
        if isinstance(v, bool):
            raise DatasetError(f"{where}: label {k!r} has value {v!r}; expected an integer")
        if isinstance(v, int):
            out[str(k)] = v
        elif isinstance(v, str) and str(k).lstrip("-").isdigit():
            out[v] = int(k)
        elif isinstance(v, list):
            raise DatasetError(
                f"{where}: label {k!r} is a region (list of values); medlens needs one integer per class"
            )
        else:
            raise DatasetError(f"{where}: label {k!r}: {v!r} is neither 'name: int' nor '\"int\": name'")
    values = list(out.values())
    if len(set(values)) != len(values):
        raise DatasetError(f"{where}: two classes share one label value in 'labels' ({out})")
    return out


def _parse_channels(raw: dict[str, Any], where: str) -> tuple[dict[int, str], dict[int, str]]:
    names = raw.get("channel_names") or {}
    mods = raw.get("modality") or {}
    if not isinstance(names, dict) or not isinstance(mods, dict):
        raise DatasetError(f"{where}: 'channel_names' and 'modality' must be objects like {{\"0\": \"T1\"}}")
    try:
        channels = {int(k): str(v) for k, v in names.items()}
        modalities = {int(k): str(v) for k, v in mods.items()}
    except ValueError:
        raise DatasetError(f'{where}: channel keys must be integers as strings ("0", "1", ...)') from None
    if not channels:
        channels = dict(modalities)
    if not modalities:
        # nnU-Net v2 keeps the modality in channel_names ("CT" triggers CT normalisation there too).
        modalities = dict(channels)
    # MSD puts channel names in "modality" ("FLAIR", "T2", "MRI"): keep those as names, store codes.
    return channels, {k: modality_code(v) for k, v in modalities.items()}


#: Channel names that mean an MR image (MSD and nnU-Net datasets name MR channels by sequence).
_MR_NAMES = ("MR", "MRI", "T1", "T1W", "T1GD", "T1C", "T1CE", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD", "SWI")


def modality_code(name: str) -> str:
    """Map a modality or channel name (``"MRI"``, ``"FLAIR"``, ``"PET"``, ``"CT"``) to a modality code.

    Unknown names give ``"OT"``; codes medlens knows (:data:`medlens.io.image.MODALITIES`) pass unchanged.
    """
    from medlens.io.image import MODALITIES

    up = str(name).strip().upper()
    if up in MODALITIES:
        return up
    if up in _MR_NAMES or up.startswith(("T1", "T2")):
        return "MR"
    return {"PET": "PT", "CTA": "CT", "XRAY": "XR", "X-RAY": "XR", "ULTRASOUND": "US"}.get(up, "OT")


def _parse_cases(raw: Any, section: str, where: str) -> list[Case]:
    if not isinstance(raw, list):
        raise DatasetError(f"{where}: '{section}' must be a list of cases")
    return [_parse_case(entry, section, n, where) for n, entry in enumerate(raw)]


def _parse_case(entry: Any, section: str, n: int, where: str) -> Case:
    """Parse entry ``n`` of ``section`` (``"training"`` or ``"test"``); errors name ``section[n]``."""
    if isinstance(entry, str):  # MSD test entries are bare paths
        entry = {"image": entry}
    if not isinstance(entry, dict) or ("image" not in entry and "fixed" not in entry):
        raise DatasetError(f"{where}: {section}[{n}] must be an object with an 'image' path")
    image = entry.get("image", entry.get("moving"))
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise DatasetError(f"{where}: {section}[{n}].image must be a path or a list of paths")
    cid = entry.get("id") or _id_from_path(images[0], per_channel=len(images) > 1)
    split = entry.get("split")
    if split is not None and split not in ("train", "val", "test"):
        raise DatasetError(f"{where}: {section}[{n}].split is {split!r}; use 'train', 'val' or 'test'")
    label = entry.get("label")
    if (label is not None and not isinstance(label, str | int | list)) or isinstance(label, bool):
        raise DatasetError(f"{where}: {section}[{n}].label must be a path, an integer or a list of 0/1")
    return Case(
        id=str(cid),
        image=list(images),
        label=label,
        boxes=entry.get("boxes"),
        box_labels=entry.get("box_labels"),
        target=entry.get("target"),
        fixed=entry.get("fixed"),
        moving=entry.get("moving"),
        split=split,
        meta={k: v for k, v in entry.items() if k not in STRUCTURAL_KEYS},
    )


def _id_from_path(p: str, per_channel: bool = False) -> str:
    """Case id from an image file name; per-channel nnU-Net names (``CASE_0000``) lose the channel suffix."""
    name = Path(p).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npz"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    if per_channel and len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name


def read_case_image(dataset: Dataset, case: Case, atol: float = 1e-3) -> Image:
    """Read a case's image, joining per-channel files along the channel axis.

    Returns:
        A :class:`medlens.io.Image` with every channel of the case, channel order as listed.

    Raises:
        ImageReadError: a file is missing or unreadable.
        DatasetError: the channel files differ in geometry (``medlens dataset check`` lists every such case).
    """
    import numpy as np

    from medlens.io import read_image

    parts = [read_image(dataset.path(rel)) for rel in case.image]
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for rel, im in zip(case.image[1:], parts[1:], strict=True):
        if not im.same_geometry(first, atol=atol):
            raise DatasetError(
                f"{dataset.path(rel)}: channel of case {case.id!r} has shape {im.spatial_shape} and affine "
                f"differing from {case.image[0]} {first.spatial_shape}; channels must share one geometry "
                "(run 'medlens dataset check')"
            )
    return first.with_array(np.concatenate([im.array for im in parts], axis=0))
