"""nnU-Net v2 raw dataset folders (``DatasetXXX_Name``).

Layout: ``imagesTr/CASE_XXXX<file_ending>`` (one file per channel ``XXXX`` = 0000, 0001, ...),
``labelsTr/CASE<file_ending>``, optional ``imagesTs``, and a ``dataset.json`` with ``channel_names``,
``labels`` (name -> value), ``numTraining`` and ``file_ending``. A ``dataset`` key listing files explicitly
is honoured too. The output keeps the same layout and keys, so it is still a valid nnU-Net raw folder, plus
the medlens case list.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medlens._fs import atomic_dir
from medlens.data.dataset import Case, Dataset, dataset_from_json
from medlens.data.importers._common import copy_file, first_image_ndim, reload, safe_id, write_json
from medlens.errors import DatasetError

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"(.+)_(\d{4})")


def import_nnunet(
    src: Path,
    out: Path,
    *,
    overwrite: bool = False,
    link: bool = False,
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Import an nnU-Net v2 raw folder.

    Args:
        src: the raw dataset folder (``Dataset001_BrainTumour``).
        out: the dataset folder to create.
        overwrite: replace an existing ``out``.
        link: hard-link files instead of copying them (same file system only).
        name: dataset name (default: ``name`` in dataset.json, else the folder name).
        progress: called as ``progress(done, total)`` after each case.

    Raises:
        DatasetError: missing keys, a file not named ``CASE_XXXX<file_ending>``, a missing channel or label
            file (named), or a region-based label definition.
    """
    jpath = src / "dataset.json"
    if not jpath.is_file():
        raise DatasetError(f"{src}: no dataset.json; an nnU-Net raw folder holds dataset.json and imagesTr/")
    try:
        raw: Any = json.loads(jpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{jpath}: is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{jpath}: must hold a JSON object")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in raw:
            raise DatasetError(
                f"{jpath}: nnU-Net v2 dataset.json needs {key!r} (is this an nnU-Net v1 or MSD folder?)"
            )
    fe = str(raw["file_ending"])
    top = {k: v for k, v in raw.items() if k not in ("dataset", "training", "test")}
    source = dataset_from_json(top, src, where=str(jpath))
    nch = len(source.channels)
    if "dataset" in raw:
        training = _listed_cases(raw["dataset"], src, jpath)
        test: dict[str, tuple[list[Path], Path | None]] = {}
    else:
        training = _scan(src / "imagesTr", src / "labelsTr", fe, nch, need_labels=True)
        test = _scan(src / "imagesTs", src / "labelsTs", fe, nch, need_labels=False)
    if not training:
        raise DatasetError(f"{src / 'imagesTr'}: no training images named CASE_0000{fe}")
    declared = raw.get("numTraining")
    if isinstance(declared, int) and declared != len(training):
        log.warning("%s: numTraining is %d but %d training cases were found", jpath, declared, len(training))
    total = len(training) + len(test)
    sections: dict[str, list[Case]] = {"training": [], "test": []}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        done = 0
        for section, cases, folder in (("training", training, "Tr"), ("test", test, "Ts")):
            for cid, (images, label) in sorted(cases.items()):
                rels = [f"images{folder}/{cid}_{k:04d}{fe}" for k in range(len(images))]
                for p, rel in zip(images, rels, strict=True):
                    copy_file(p, tmp / rel, link)
                lrel = None
                if label is not None:
                    lrel = f"labels{folder}/{cid}{fe}"
                    copy_file(label, tmp / lrel, link)
                sections[section].append(Case(id=cid, image=rels, label=lrel))
                done += 1
                if progress is not None:
                    progress(done, total)
        extra = dict(source.extra)
        ds = Dataset(
            root=tmp,
            name=name or str(raw.get("name") or src.name),
            task=source.task,
            labels=source.labels,
            channels=source.channels,
            modalities=source.modalities,
            training=sections["training"],
            test=sections["test"],
            ndim=first_image_ndim(tmp / sections["training"][0].image[0]),
            description=source.description,
            extra=extra,
        )
        write_json(ds, tmp)
    return reload(out)


def _scan(
    images_dir: Path, labels_dir: Path, fe: str, nch: int, need_labels: bool
) -> dict[str, tuple[list[Path], Path | None]]:
    """Group ``images_dir`` files into cases by the ``CASE_XXXX`` naming rule and pair them with labels."""
    if not images_dir.is_dir():
        if need_labels:
            raise DatasetError(
                f"{images_dir}: missing; an nnU-Net raw folder keeps its training images there"
            )
        return {}
    channels: dict[str, dict[int, Path]] = {}
    for p in sorted(images_dir.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(fe):
            continue
        m = _CHANNEL.fullmatch(p.name[: -len(fe)])
        if m is None:
            raise DatasetError(f"{p}: not named CASE_XXXX{fe} (XXXX = 4-digit channel number, e.g. _0000)")
        k = int(m.group(2))
        if k >= nch:
            raise DatasetError(
                f"{p}: channel {k}, but dataset.json declares {nch} channel(s) in channel_names"
            )
        channels.setdefault(m.group(1), {})[k] = p
    cases: dict[str, tuple[list[Path], Path | None]] = {}
    for cid, chans in channels.items():
        for k in range(nch):
            if k not in chans:
                raise DatasetError(
                    f"{images_dir / f'{cid}_{k:04d}{fe}'}: missing (channel {k} of case {cid!r})"
                )
        label: Path | None = labels_dir / f"{cid}{fe}"
        if not (labels_dir / f"{cid}{fe}").is_file():
            if need_labels:
                raise DatasetError(f"{label}: missing (label of training case {cid!r})")
            label = None
        cases[cid] = ([chans[k] for k in range(nch)], label)
    if labels_dir.is_dir():
        extra = sorted(
            p.name for p in labels_dir.iterdir() if p.name.endswith(fe) and p.name[: -len(fe)] not in cases
        )
        if extra:
            log.warning(
                "%s: %d label file(s) without images ignored (e.g. %s)", labels_dir, len(extra), extra[0]
            )
    return cases


def _listed_cases(listed: Any, src: Path, jpath: Path) -> dict[str, tuple[list[Path], Path | None]]:
    """Cases from an explicit ``"dataset": {case: {"images": [...], "label": ...}}`` entry."""
    if not isinstance(listed, dict):
        raise DatasetError(f"{jpath}: 'dataset' must map case ids to {{'images': [...], 'label': ...}}")
    cases: dict[str, tuple[list[Path], Path | None]] = {}
    for cid, entry in listed.items():
        images = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            raise DatasetError(f"{jpath}: dataset[{cid!r}].images must be a list of paths")
        paths = [(src / i) if not Path(i).is_absolute() else Path(i) for i in images]
        label = entry.get("label")
        lpath = None if label is None else (src / label if not Path(label).is_absolute() else Path(label))
        for p in [*paths, *([lpath] if lpath else [])]:
            if not p.is_file():
                raise DatasetError(f"{p}: listed for case {cid!r} in {jpath} but missing")
        cases[safe_id(str(cid))] = (paths, lpath)
    return cases
