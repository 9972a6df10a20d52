"""MedMNIST ``.npz`` files: one small NIfTI per image, the official splits kept in each case's ``split``.

``train`` and ``val`` images become training cases with ``split`` ``"train"``/``"val"`` (so the folds use
MedMNIST's own validation set) and ``test`` images the ``test`` section. The classification type follows the
labels: ``N x K`` with ``K > 1`` is multilabel, one column is binary (two classes) or multiclass, or ordinal
when the caller says the classes are ordered grades (``ordinal=True``, e.g. RetinaMNIST). Images keep the
medlens index order (a 28 x 28 image stored ``H x W`` becomes ``(1, W, H)``) with 1 mm pixels, since MedMNIST
records no physical spacing. 10,000 28 x 28 images import in about 20 s (nibabel's per-file cost; two
writer threads were slower on two cores, the GIL is held most of the time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from medlens._fs import atomic_dir
from medlens.data.dataset import CLASSIFICATION_TYPES, Case, Dataset
from medlens.data.importers._common import reload, write_json
from medlens.errors import DatasetError, InputError, did_you_mean
from medlens.io import write_image
from medlens.io.image import MODALITIES

log = logging.getLogger(__name__)

#: Modality of each MedMNIST collection (from its file name), used when the caller gives none.
MEDMNIST_MODALITY = {
    "pathmnist": "SM", "chestmnist": "DX", "dermamnist": "OT", "octmnist": "OCT", "pneumoniamnist": "DX",
    "retinamnist": "OP", "breastmnist": "US", "bloodmnist": "SM", "tissuemnist": "SM", "organamnist": "CT",
    "organcmnist": "CT", "organsmnist": "CT", "organmnist3d": "CT", "nodulemnist3d": "CT",
    "adrenalmnist3d": "CT", "fracturemnist3d": "CT", "vesselmnist3d": "MR", "synapsemnist3d": "OT",
}  # fmt: skip


def import_medmnist(
    src: Path,
    out: Path,
    *,
    overwrite: bool = False,
    ordinal: bool = False,
    classification_type: str | None = None,
    class_names: Mapping[int | str, str] | Sequence[str] | None = None,
    modality: str | None = None,
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Import a MedMNIST ``.npz`` as a classification dataset.

    Args:
        src: the ``.npz`` file (e.g. ``pathmnist.npz``, ``organmnist3d_64.npz``).
        out: the dataset folder to create.
        overwrite: replace an existing ``out``.
        ordinal: the classes are ordered grades (classification type ``"ordinal"``).
        classification_type: state the type instead of inferring it; an error when the labels disagree
            (e.g. ``"multiclass"`` for a multi-label file).
        class_names: names of the classes (or of the labels of a multi-label file), as a list or a mapping
            index -> name (the ``label`` dict of MedMNIST's INFO); default ``class_0``, ``class_1``...
            When given, labels must lie within these classes.
        modality: modality code; default from the file name (``pathmnist`` -> ``SM``), else ``OT``.
        name: dataset name (default: the file name without extension).
        progress: called as ``progress(done, total)`` after each batch of images.

    Raises:
        ImageReadError: the npz is not a valid MedMNIST file.
        DatasetError: labels outside the declared classes (split and index named), or a type that does not
            match the labels.
    """
    from medlens.io.medmnist import SPLITS, load_medmnist

    arrays = load_medmnist(src)
    stem = src.name.split(".")[0]
    k = arrays.num_labels
    all_labels = np.concatenate([arrays.split(s).labels for s in SPLITS])
    ctype, names = _classes(src, all_labels, k, ordinal, classification_type, class_names)
    for s in SPLITS:
        _check_label_values(src, s, arrays.split(s).labels, ctype, len(names))
    mod = _modality(stem, modality)
    channels = {0: "gray"} if arrays.num_channels == 1 else {0: "R", 1: "G", 2: "B"}
    total = sum(len(arrays.split(s)) for s in SPLITS)
    sections: dict[str, list[Case]] = {"training": [], "test": []}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        done = 0
        for split in SPLITS:
            labels = arrays.split(split).labels
            width = len(str(max(len(labels) - 1, 0)))
            ids = [f"{split}_{i:0{width}d}" for i in range(len(labels))]
            (tmp / "images" / split).mkdir(parents=True)
            for i, cid in enumerate(ids):
                image = arrays.image(split, i)
                image.modality = mod
                write_image(image, tmp / "images" / split / f"{cid}.nii.gz")
                done += 1
                if progress is not None and (done % 256 == 0 or done == total):
                    progress(done, total)
            section = "test" if split == "test" else "training"
            for i, cid in enumerate(ids):
                lab = labels[i]
                target: int | list[int] = [int(v) for v in lab] if ctype == "multilabel" else int(lab[0])
                sections[section].append(
                    Case(id=cid, image=[f"images/{split}/{cid}.nii.gz"], label=target, split=split)
                )
        ds = Dataset(
            root=tmp,
            name=name or stem,
            task="classification",
            labels={n: i for i, n in enumerate(names)},
            channels=channels,
            modalities=dict.fromkeys(channels, mod),
            training=sections["training"],
            test=sections["test"],
            classification_type=ctype,
            ndim=arrays.ndim,
            description=f"Imported from {src.name} (MedMNIST, {arrays.image_size} px)",
            extra={"source_format": "medmnist"},
        )
        write_json(ds, tmp)
    return reload(out)


def _classes(
    src: Path,
    labels: np.ndarray,
    k: int,
    ordinal: bool,
    ctype: str | None,
    class_names: Mapping[int | str, str] | Sequence[str] | None,
) -> tuple[str, list[str]]:
    """The classification type and the class names, checked against the label array ``(N, K)``."""
    if ctype is not None and ctype not in CLASSIFICATION_TYPES:
        raise InputError(
            f"classification_type {ctype!r} is unknown.{did_you_mean(ctype, CLASSIFICATION_TYPES)} "
            f"Use one of: {', '.join(CLASSIFICATION_TYPES)}"
        )
    names = _names(class_names)
    if k > 1:
        if ordinal or ctype not in (None, "multilabel"):
            given = "ordinal=True" if ordinal else f"classification_type={ctype!r}"
            raise DatasetError(
                f"{src}: labels are N x {k} (several 0/1 labels per image: multi-label), but {given} was given; "
                "use classification_type='multilabel' or leave it out"
            )
        if names and len(names) != k:
            raise DatasetError(f"{src}: {len(names)} class names given for {k} labels per image")
        return "multilabel", names or [f"label_{i}" for i in range(k)]
    if ctype == "multilabel":
        raise DatasetError(
            f"{src}: labels are one class index per image, not multi-label; leave classification_type out"
        )
    n = len(names) if names else int(labels.max()) + 1 if labels.size else 0
    if ordinal:
        if ctype not in (None, "ordinal"):
            raise InputError(f"ordinal=True contradicts classification_type={ctype!r}")
        ctype = "ordinal"
    elif ctype is None:
        ctype = "binary" if n <= 2 else "multiclass"
    elif ctype == "binary" and n > 2:
        raise DatasetError(f"{src}: classification_type='binary' but the labels hold {n} classes")
    return ctype, names or [f"class_{i}" for i in range(max(n, 2 if ctype == "binary" else n))]


def _names(class_names: Mapping[int | str, str] | Sequence[str] | None) -> list[str]:
    if class_names is None:
        return []
    if isinstance(class_names, Mapping):
        try:
            by_index = {int(i): str(n) for i, n in class_names.items()}
        except ValueError:
            raise InputError(
                f"class_names keys must be class indices 0, 1, ...; got {list(class_names)}"
            ) from None
        if sorted(by_index) != list(range(len(by_index))):
            raise InputError(
                f"class_names must name classes 0..{len(by_index) - 1}; got indices {sorted(by_index)}"
            )
        return [by_index[i] for i in range(len(by_index))]
    if isinstance(class_names, str):
        raise InputError("class_names must be a list of names or a mapping index -> name, not one string")
    return [str(n) for n in class_names]


def _check_label_values(src: Path, split: str, labels: np.ndarray, ctype: str, n: int) -> None:
    if ctype == "multilabel":
        bad = np.argwhere((labels != 0) & (labels != 1))
        if bad.size:
            i, j = bad[0]
            raise DatasetError(
                f"{src}: {split}_labels[{i}, {j}] = {labels[i, j]}; multi-label values are 0 or 1"
            )
        return
    outside = np.flatnonzero((labels[:, 0] < 0) | (labels[:, 0] >= n))
    if outside.size:
        i = int(outside[0])
        raise DatasetError(
            f"{src}: {split}_labels[{i}] = {labels[i, 0]} is outside the {n} declared classes (0..{n - 1}); "
            f"{outside.size} label(s) of {split} are (give class_names for every class, or fix the file)"
        )


def _modality(stem: str, modality: str | None) -> str:
    if modality is not None:
        code = modality.upper()
        if code not in MODALITIES:
            raise InputError(
                f"modality {modality!r} is unknown.{did_you_mean(code, MODALITIES)} Use one of: {', '.join(MODALITIES)}"
            )
        return code
    base = stem.lower().rsplit("_", 1)[0] if "_" in stem else stem.lower()
    return MEDMNIST_MODALITY.get(base, "OT")
