"""Medical Segmentation Decathlon task folders: ``dataset.json`` + ``imagesTr``/``labelsTr``/``imagesTs``.

The MSD ``dataset.json`` loads unchanged; the importer checks every listed file exists, copies the files
(4D multi-channel NIfTI kept as is: channels last on disk, channel-first once read) and writes a medlens
``dataset.json`` with ``task``, channel names and modality codes (``"FLAIR"`` -> name ``FLAIR``, code ``MR``).
Files the ``dataset.json`` does not list (such as the macOS ``._*`` files in the MSD archives) are left out.
Any medlens ``dataset.json`` folder (other tasks, metadata, boxes, targets) is copied the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from medlens._fs import atomic_dir
from medlens.data.dataset import Case, Dataset, load_dataset
from medlens.data.importers._common import copy_file, dest_rel, first_image_ndim, reload, write_json
from medlens.errors import DatasetError

log = logging.getLogger(__name__)


def import_msd(
    src: Path,
    out: Path,
    *,
    overwrite: bool = False,
    link: bool = False,
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Import an MSD task folder.

    Args:
        src: the task folder (``Task01_BrainTumour``), holding ``dataset.json``.
        out: the dataset folder to create.
        overwrite: replace an existing ``out``.
        link: hard-link files instead of copying them (same file system only; falls back to copying).
        name: dataset name (default: the MSD ``name``).
        progress: called as ``progress(done, total)`` after each case.

    Raises:
        DatasetError: no or malformed ``dataset.json``, or a listed file is missing (named).
    """
    if not src.is_dir():
        raise DatasetError(f"{src}: an MSD task is a folder with dataset.json, imagesTr and labelsTr")
    source = load_dataset(src)
    missing = [rel for c in source.cases for rel in c.files() if not source.path(rel).is_file()]
    if missing:
        raise DatasetError(
            f"{source.path(missing[0])}: listed in {source.json_path} but missing"
            + (f" ({len(missing)} listed files are missing)" if len(missing) > 1 else "")
        )
    sections: dict[str, list[Case]] = {"training": [], "test": []}
    total = len(source.cases)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        copied: dict[str, str] = {}  # source path -> new relative path (a file listed twice is copied once)

        def move(rel: str, folder: str) -> str:
            if rel not in copied:
                copied[rel] = dest_rel(rel, folder)
                copy_file(source.path(rel), tmp / copied[rel], link)
            return copied[rel]

        done = 0
        for section, cases in (("training", source.training), ("test", source.test)):
            tr = "Tr" if section == "training" else "Ts"
            for c in cases:
                new = Case(
                    id=c.id,
                    image=[move(rel, f"images{tr}") for rel in c.image],
                    label=move(c.label, f"labels{tr}") if isinstance(c.label, str) else c.label,
                    boxes=c.boxes,
                    box_labels=c.box_labels,
                    target=move(c.target, f"targets{tr}") if c.target else None,
                    fixed=move(c.fixed, f"images{tr}") if c.fixed else None,
                    moving=move(c.moving, f"images{tr}") if c.moving else None,
                    split=c.split,
                    meta=dict(c.meta),
                )
                sections[section].append(new)
                done += 1
                if progress is not None:
                    progress(done, total)
        first = sections["training"][0].image[0] if sections["training"] else None
        ndim = source.ndim or (first_image_ndim(tmp / first) if first else None)
        ds = Dataset(
            root=tmp,
            name=name or source.name,
            task=source.task,
            labels=source.labels,
            channels=source.channels,
            modalities=source.modalities,
            training=sections["training"],
            test=sections["test"],
            ndim=ndim,
            description=source.description,
            extra=source.extra,
        )
        write_json(ds, tmp)
    return reload(out)
