"""Import datasets from the formats they come in into a medlens dataset folder (``dataset.json`` + files).

``import_dataset(kind, src, out, **options)`` dispatches to one importer per kind; each takes explicit
keyword options (unknown options are an error naming the accepted ones):

* ``msd``: a Medical Segmentation Decathlon task folder (``dataset.json`` + ``imagesTr``/``labelsTr``/
  ``imagesTs``); 4D multi-channel NIfTI files are kept as they are.
* ``nnunet``: an nnU-Net v2 raw folder (``imagesTr/CASE_0000.nii.gz`` per channel, ``labelsTr``,
  ``dataset.json`` with ``channel_names``/``labels``/``file_ending``); the output stays a valid nnU-Net folder.
* ``medmnist``: a MedMNIST ``.npz``; its train/val/test splits are kept in each case's ``split`` field.
* ``folder``: class-per-subfolder images (``root/CLASS/*.png``, optionally ``root/train|val|test/CLASS/``).
* ``dicom``: a DICOM tree plus a CSV naming a study, series or path per row, its label and metadata.

Every importer builds its output in a temporary folder next to ``out`` and renames it into place
(:func:`medlens._fs.atomic_dir`): an interrupted import leaves nothing behind.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medlens.data.dataset import Dataset
from medlens.errors import InputError, did_you_mean, unknown_name

__all__ = ["IMPORTERS", "import_dataset"]

#: kind -> "module:function" of its importer (imported only when used).
IMPORTERS = {
    "msd": "medlens.data.importers.msd:import_msd",
    "nnunet": "medlens.data.importers.nnunet:import_nnunet",
    "medmnist": "medlens.data.importers.medmnist:import_medmnist",
    "folder": "medlens.data.importers.folder:import_folder",
    "dicom": "medlens.data.importers.dicom:import_dicom",
}


def importer(kind: str) -> Callable[..., Dataset]:
    """The import function for ``kind`` (one of :data:`IMPORTERS`)."""
    if kind not in IMPORTERS:
        raise unknown_name("dataset kind", kind, tuple(IMPORTERS))
    module, func = IMPORTERS[kind].split(":")
    fn: Callable[..., Dataset] = getattr(importlib.import_module(module), func)
    return fn


def import_dataset(kind: str, src: str | Path, out: str | Path, **options: Any) -> Dataset:
    """Import the dataset at ``src`` (of format ``kind``) into a new medlens dataset folder ``out``.

    Args:
        kind: ``"msd"``, ``"nnunet"``, ``"medmnist"``, ``"folder"`` or ``"dicom"``.
        src: the source folder or file.
        out: the dataset folder to create (must not exist or be empty, unless ``overwrite=True``).
        **options: the keyword options of that kind's importer (``overwrite`` for all; see each importer:
            :func:`~medlens.data.importers.msd.import_msd`, ...). Options set to ``None`` take their default.

    Returns:
        The imported dataset, loaded from ``out``.

    Raises:
        InputError: unknown kind or option, missing source, or ``out`` exists.
        DatasetError: the source is malformed (the message names the file, row or key).
    """
    fn = importer(kind)
    params = inspect.signature(fn).parameters
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for name in options:
        if name not in accepted:
            raise InputError(
                f"{kind} import has no option {name!r}.{did_you_mean(name, accepted)} "
                f"Accepted: {', '.join(sorted(accepted))}."
            )
    src, out = Path(src), Path(out)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder to import")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise InputError(
            f"{out}: the output folder must not be (or contain) the source {src}; choose another --out"
        )
    given = {k: v for k, v in options.items() if v is not None}
    return fn(src, out, **given)
