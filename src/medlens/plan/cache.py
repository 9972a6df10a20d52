"""The preprocessed cache: every case preprocessed once, stored as memory-mappable ``.npy`` files.

Layout of ``cache_dir``::

    cache.json          index: version, the preprocessing section, and per case its key and file stem
    <case>.npy          data (C, *spatial), float16 (half the IO; values are normalised) or float32
    <case>_seg.npy      class indices (1, *spatial), uint8 or int16 (labelled cases only)
    <case>.json         PreprocessInfo + up to 10k sampled voxel locations per foreground class

A case's key hashes the preprocessing section, the dataset's labels and the size and modification time of its
files: an unchanged case is reused, a changed one (or a changed plan) rebuilt. Every file is written atomically
and the index last, so an interrupted build leaves a cache that the next build completes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens._fs import atomic_path, atomic_write_json
from medlens.errors import PlanError
from medlens.plan.preprocess import PreprocessInfo, preprocess_case

if TYPE_CHECKING:
    from medlens.data.dataset import Case, Dataset

log = logging.getLogger(__name__)

CACHE_VERSION = 1
INDEX = "cache.json"
MAX_LOCATIONS = 10_000
_FLOAT16_MAX = 65000.0


class Cache:
    """Read access to a built cache (use :func:`build_cache` to make or refresh one).

    Arrays are opened with ``np.load(mmap_mode="r")``: a patch read touches only the pages it needs.

    Args:
        root: the cache folder.
        case_ids: the cases this view exposes (default: every case in the index).
    """

    def __init__(self, root: str | Path, case_ids: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        self.index = _read_index(self.root)
        if not self.index:
            raise PlanError(
                f"{self.root}: no preprocessed cache here (build it with build_cache / 'medlens preprocess')"
            )
        cases = self.index["cases"]
        ids = list(cases) if case_ids is None else list(case_ids)
        missing = [i for i in ids if i not in cases]
        if missing:
            raise PlanError(
                f"{self.root}: cases {missing[:5]} are not in the cache; rebuild it with build_cache"
            )
        self.case_ids = ids
        self._meta: dict[str, dict[str, Any]] = {}

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing section the cache was built with."""
        return dict(self.index["preprocessing"])

    def __len__(self) -> int:
        return len(self.case_ids)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.case_ids

    def _stem(self, case_id: str) -> Path:
        return self.root / self.index["cases"][case_id]["file"]

    def data(self, case_id: str) -> np.ndarray:
        """``(C, *spatial)`` image data (memory-mapped, float16 or float32)."""
        return np.load(f"{self._stem(case_id)}.npy", mmap_mode="r")

    def seg(self, case_id: str) -> np.ndarray | None:
        """``(1, *spatial)`` class indices (memory-mapped), or None for an unlabelled case."""
        path = Path(f"{self._stem(case_id)}_seg.npy")
        return np.load(path, mmap_mode="r") if path.exists() else None

    def meta(self, case_id: str) -> dict[str, Any]:
        if case_id not in self._meta:
            path = Path(f"{self._stem(case_id)}.json")
            self._meta[case_id] = json.loads(path.read_text(encoding="utf-8"))
        return self._meta[case_id]

    def info(self, case_id: str) -> PreprocessInfo:
        """What :func:`medlens.plan.preprocess.invert` needs to map predictions back to the input grid."""
        return PreprocessInfo.from_json(self.meta(case_id)["info"])

    def shape(self, case_id: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.meta(case_id)["info"]["shape"])

    def foreground(self, case_id: str) -> dict[int, np.ndarray]:
        """Class index -> ``(n, ndim)`` voxel locations (a sample of at most 10k per class)."""
        fg = self.meta(case_id).get("foreground", {})
        ndim = len(self.shape(case_id))
        return {int(k): np.asarray(v, dtype=np.int64).reshape(-1, ndim) for k, v in fg.items() if len(v)}


def cache_key(preprocessing: Mapping[str, Any], labels: Mapping[str, int]) -> str:
    """Hash of what makes a cache valid regardless of the files: the preprocessing section and the labels."""
    blob = json.dumps({"v": CACHE_VERSION, "pre": preprocessing, "labels": dict(labels)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def case_key(dataset: Dataset, case: Case, config_key: str) -> str:
    """Hash of the configuration key and the size and modification time of the case's files."""
    files = []
    for rel in [*case.image, *([case.label] if isinstance(case.label, str) else [])]:
        path = dataset.path(rel)
        try:
            st = path.stat()
            files.append([rel, st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([rel, None, None])
    blob = json.dumps({"config": config_key, "id": case.id, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_cache(
    dataset: Dataset,
    config: Mapping[str, Any],
    cache_dir: str | Path,
    *,
    case_ids: Sequence[str] | None = None,
    progress: bool = False,
    workers: int = 1,
) -> Cache:
    """Preprocess the cases of ``dataset`` once into ``cache_dir`` (valid cases are reused, stale ones rebuilt).

    Args:
        dataset: the dataset.
        config: a resolved plan configuration (its ``preprocessing`` section is used) or that section.
        cache_dir: where the cache lives (one folder per configuration).
        case_ids: which cases; default every training case.
        progress: show a rich progress bar.
        workers: preprocess this many cases in parallel processes.

    Returns:
        A :class:`Cache` over the requested cases.
    """
    pre = dict(config.get("preprocessing", config))
    if pre.get("label_values") is None:
        pre["label_values"] = sorted(dataset.labels.values()) or None
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    cases = [dataset.case(i) for i in case_ids] if case_ids is not None else list(dataset.training)
    ckey = cache_key(pre, dataset.labels)
    index = _read_index(root)
    if not index:
        index = {"medlens_cache": CACHE_VERSION, "preprocessing": pre, "config_key": ckey, "cases": {}}
    if index.get("config_key") != ckey:
        _prune(root, index)
        index = {"medlens_cache": CACHE_VERSION, "preprocessing": pre, "config_key": ckey, "cases": {}}

    keys = {c.id: case_key(dataset, c, ckey) for c in cases}
    todo = [c for c in cases if not _valid(root, index["cases"].get(c.id), keys[c.id])]
    log.info(
        "cache %s: %d of %d cases valid, preprocessing %d",
        root,
        len(cases) - len(todo),
        len(cases),
        len(todo),
    )
    stems = _stems([c.id for c in cases])
    jobs = [(c.id, str(root / stems[c.id])) for c in todo]

    def done(case_id: str) -> None:
        index["cases"][case_id] = {"key": keys[case_id], "file": stems[case_id]}
        atomic_write_json(root / INDEX, index)

    with _Progress(progress, len(jobs), f"preprocessing {dataset.name}") as bar:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                raw = dataset.to_json()
                futures = [
                    pool.submit(_build_remote, str(dataset.root), raw, cid, pre, stem) for cid, stem in jobs
                ]
                for fut in as_completed(futures):
                    done(fut.result())
                    bar.advance()
        else:
            for cid, stem in jobs:
                done(_build_one(dataset, cid, pre, stem))
                bar.advance()
    if not jobs:
        atomic_write_json(root / INDEX, index)
    return Cache(root, [c.id for c in cases])


def _build_remote(
    root: str, dataset_json: dict[str, Any], case_id: str, pre: dict[str, Any], stem: str
) -> str:
    """:func:`_build_one` in a worker process (the dataset travels as its JSON)."""
    from medlens.data.dataset import dataset_from_json

    return _build_one(dataset_from_json(dataset_json, Path(root)), case_id, pre, stem)


def _build_one(dataset: Dataset, case_id: str, pre: dict[str, Any], stem: str) -> str:
    """Preprocess one case and write its three files."""
    from medlens.io import read_image

    case = dataset.case(case_id)
    images = [
        read_image(dataset.path(rel), modality=dataset.modalities.get(i, "OT"))
        for i, rel in enumerate(case.image)
    ]
    label = read_image(dataset.path(case.label)) if isinstance(case.label, str) else None
    data, seg, info = preprocess_case(images, label, pre, case_id=case_id)
    dtype = np.float16 if pre.get("cache_dtype", "float16") == "float16" else np.float32
    if dtype == np.float16 and data.size and float(np.abs(data).max()) > _FLOAT16_MAX:
        log.warning("%s: values beyond float16 range; caching as float32", case_id)
        dtype = np.float32
    _save_npy(Path(f"{stem}.npy"), data.astype(dtype))
    meta: dict[str, Any] = {"info": info.to_json(), "foreground": {}}
    if seg is not None:
        _save_npy(Path(f"{stem}_seg.npy"), seg)
        meta["foreground"] = _foreground_locations(seg[0], case_id)
    else:
        Path(f"{stem}_seg.npy").unlink(missing_ok=True)
    atomic_write_json(Path(f"{stem}.json"), meta)
    return case_id


def _foreground_locations(seg: np.ndarray, case_id: str) -> dict[str, list[list[int]]]:
    """Up to :data:`MAX_LOCATIONS` voxel locations per foreground class, sampled reproducibly per case."""
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    out: dict[str, list[list[int]]] = {}
    for k in np.unique(seg):
        if k == 0:
            continue
        locs = np.argwhere(seg == k)
        if len(locs) > MAX_LOCATIONS:
            locs = locs[np.sort(rng.choice(len(locs), MAX_LOCATIONS, replace=False))]
        out[str(int(k))] = locs.tolist()
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))


def _read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(index, dict) or index.get("medlens_cache") != CACHE_VERSION or "cases" not in index:
        return {}
    return index


def _valid(root: Path, entry: Mapping[str, Any] | None, key: str) -> bool:
    if not entry or entry.get("key") != key:
        return False
    stem = root / entry["file"]
    return Path(f"{stem}.npy").exists() and Path(f"{stem}.json").exists()


def _prune(root: Path, index: Mapping[str, Any]) -> None:
    """Delete the files of a cache built with another configuration."""
    for entry in index.get("cases", {}).values():
        for suffix in (".npy", "_seg.npy", ".json"):
            Path(f"{root / entry['file']}{suffix}").unlink(missing_ok=True)


def _stems(case_ids: Sequence[str]) -> dict[str, str]:
    """File-system-safe, unique file stems for case ids."""
    out = {}
    for cid in case_ids:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", cid)
        if safe != cid or safe.endswith("_seg"):
            safe = f"{safe}-{hashlib.sha1(cid.encode()).hexdigest()[:8]}"
        out[cid] = safe
    return out


class _Progress:
    """A rich progress bar when asked for, else nothing."""

    def __init__(self, enabled: bool, total: int, title: str) -> None:
        self.enabled = enabled and total > 0
        self.total, self.title = total, title
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.title, total=self.total)
        return self

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
