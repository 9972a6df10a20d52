"""What a service job does: load the served models, unpack an upload safely, predict, write the results.

The API (:mod:`medlens.serve.api`) calls :func:`prepare_upload` in the request (so a refused upload is refused
with its HTTP status at once) and queues :func:`run_job` on the job manager (:mod:`medlens.serve.jobs`).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import InputError, RunError
from medlens.serve.jobs import Job
from medlens.serve.security import BadUpload, TooLarge, extract_zip, gunzip

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ServedModel:
    """A run loaded for serving: its name (the run folder's name), task, predictor and lock."""

    name: str
    run_dir: Path
    task: str
    predictor: Any
    info: dict[str, Any]
    backend: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def supports_uncertainty(self) -> bool:
        """Whether this predictor's ``predict`` accepts ``uncertainty=True``."""
        return "uncertainty" in inspect.signature(self.predictor.predict).parameters


def load_models(
    runs: list[Path], *, names: list[str] | None = None, backend: str = "auto", threads: int = 1
) -> dict[str, ServedModel]:
    """Load every run (safetensors + JSON only) once; names are the run folders' names and must be unique.

    Args:
        runs: run directories.
        names: the models' names (default: each run folder's name, as given: a symlink's own name counts).
        backend: "auto", "torch" or "onnx" (segmentation runs; see :class:`medlens.serve.predictor.Predictor`).
        threads: intra-op threads for each ONNX Runtime session (torch threads are set process-wide).
    """
    from medlens.serve import load_predictor

    if not runs:
        raise InputError("no run to serve: give at least one run directory")
    if names is not None and len(names) != len(runs):
        raise InputError(f"{len(names)} model names for {len(runs)} runs; give one name per run")
    models: dict[str, ServedModel] = {}
    for i, run in enumerate(runs):
        run = Path(run)
        name = names[i] if names is not None else Path(os.path.abspath(run)).name
        if not _NAME.match(name):
            raise InputError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        if name in models:
            raise InputError(
                f"{run}: two served runs are named {name!r}; model names must be unique (serve NAME=RUN)"
            )
        predictor = load_predictor(run, device="auto", backend=backend)
        _set_onnx_threads(predictor, threads)
        models[name] = ServedModel(
            name=name,
            run_dir=run,
            task=str(predictor.info.get("task")),
            predictor=predictor,
            info=predictor.info,
            backend=str(getattr(predictor, "backend", "torch")),
        )
        log.info("serving %s (%s, %s backend) from %s", name, models[name].task, models[name].backend, run)
    return models


def _set_onnx_threads(predictor: Any, threads: int) -> None:
    """Re-open ONNX Runtime sessions with ``threads`` intra-op threads (the default takes every core)."""
    from medlens.serve.backends import OnnxBackend

    models = getattr(predictor, "models", [])
    for i, m in enumerate(models):
        if isinstance(m, OnnxBackend) and m.threads != threads:
            models[i] = OnnxBackend(m.path, m.device, threads=threads)


# ---- input ---------------------------------------------------------------------------------------------------------
def prepare_upload(job: Job, upload: Path, max_unpacked_bytes: int) -> str:
    """Recognise an upload by its content and unpack it under generated names; returns the input kind.

    Accepted: a NIfTI file (``.nii``), a gzipped NIfTI (``.nii.gz``), a zip of one DICOM series, or one DICOM
    file. The client's file name is never looked at.

    Raises:
        BadUpload: none of those.
        TooLarge: the unpacked content, or the pixel data its DICOM headers declare, passes
            ``max_unpacked_bytes``.
    """
    with open(upload, "rb") as fh:
        head = fh.read(544)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        files = extract_zip(upload, job.input_dir / "dicom", max_unpacked_bytes)
        if not files:
            raise BadUpload("the zip holds no files; zip the DICOM series' files")
        upload.unlink()
        check_pixel_budget(_headers(files), max_unpacked_bytes)
        return "dicom"
    if head.startswith(b"\x1f\x8b"):
        target = job.input_dir / "image.nii"
        gunzip(upload, target, max_unpacked_bytes)
        upload.unlink()
        with open(target, "rb") as fh:
            head = fh.read(544)
        if not _is_nifti(head):
            raise BadUpload("the gzip upload is not a NIfTI image; send a .nii.gz, a .nii or a zip of DICOM")
        return "nifti"
    if _is_nifti(head):
        if upload.stat().st_size > max_unpacked_bytes:
            raise TooLarge("the NIfTI upload is larger than the unpacked-size limit")
        upload.rename(job.input_dir / "image.nii")
        return "nifti"
    if head[128:132] == b"DICM":
        (job.input_dir / "dicom").mkdir()
        upload.rename(job.input_dir / "dicom" / "00000.dcm")
        check_pixel_budget(_headers([job.input_dir / "dicom" / "00000.dcm"]), max_unpacked_bytes)
        return "dicom"
    raise BadUpload("the upload is not a NIfTI (.nii/.nii.gz), a DICOM file or a zip of a DICOM series")


def _is_nifti(head: bytes) -> bool:
    return head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00")


def decoded_pixel_bytes(ds: Any) -> int:
    """Bytes the pixel data of a DICOM header decodes to: Rows x Columns x frames x bytes per sample x samples.

    Read from the header alone (compressed pixel data can be tiny on disk and huge decoded); 0 when the header
    declares no image or garbage (the reader then reports the file properly).
    """
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.get("BitsAllocated") or 8)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError):
        return 0
    return max(0, rows) * max(0, cols) * max(1, frames) * max(1, (bits + 7) // 8) * max(1, samples)


def check_pixel_budget(headers: Iterable[tuple[str, Any]], max_bytes: int) -> None:
    """Refuse, before anything is decoded, DICOM whose declared pixel data passes ``max_bytes`` (alone or together).

    Args:
        headers: ``(file name, dataset read with stop_before_pixels)`` pairs.
        max_bytes: the server's unpacked-size limit.

    Raises:
        TooLarge: one file, or all of them together, decode to more than ``max_bytes``.
    """
    total = 0
    for name, ds in headers:
        n = decoded_pixel_bytes(ds)
        if n > max_bytes:
            raise TooLarge(
                f"DICOM file {name} declares {n / 2**20:.6g} MB of decoded pixel data (Rows x Columns x frames x "
                f"bytes x samples), more than the limit of {max_bytes / 2**20:g} MB"
            )
        total += n
        if total > max_bytes:
            raise TooLarge(
                f"the DICOM files declare more than the limit of {max_bytes / 2**20:g} MB of decoded pixel data; "
                "send a smaller series"
            )


def _headers(files: Iterable[Path]) -> Iterator[tuple[str, Any]]:
    """``(name, header)`` of every file that reads as DICOM (others are left to the reader to report)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
            continue
        yield f.name, ds


def fetch_from_pacs(job: Job, pacs: Any, max_bytes: int | None = None) -> None:
    """Retrieve the job's study (or series) from the server's PACS into ``JOB/input/dicom``.

    Args:
        job: a "pacs" job (``options["study"]``, optional ``options["series"]``: UIDs checked by the API).
        pacs: the server's :class:`~medlens.serve.pacs_config.PacsConfig` (None: no PACS configured).
        max_bytes: the instances' total size limit (past it: :class:`TooLarge`); None: unbounded.
    """
    if pacs is None:
        raise InputError("this server has no PACS configured (start it with --pacs-config FILE)")
    from medlens.serve.pacs_run import pull

    protocol = "dicomweb" if pacs.url else "dimse"
    dest = job.input_dir / "dicom"
    dest.mkdir(exist_ok=True)
    files = pull(
        pacs,
        str(job.options["study"]),
        dest,
        series_uid=job.options.get("series"),
        protocol=protocol,
        max_bytes=max_bytes,
    )
    if not files:
        raise InputError(f"the PACS returned no instances for study {job.options['study']}")


# ---- the work ------------------------------------------------------------------------------------------------------
def run_job(job: Job, model: ServedModel, pacs: Any = None, max_unpacked: int | None = None) -> None:
    """Read the job's input, predict with ``model`` and write the results into ``JOB/results``.

    Args:
        job: the job (its input is on disk, or for a "pacs" job, is fetched first).
        model: the served model.
        pacs: the server's PACS config, for "pacs" jobs.
        max_unpacked: limit on what a PACS sends and on a DICOM series' decoded pixel data (past it:
            :class:`TooLarge`, which the API answers with 413); None: unbounded.
    """
    from medlens._fs import atomic_write_json
    from medlens.io import read_image, write_image

    if job.kind == "pacs":
        fetch_from_pacs(job, pacs, max_unpacked)
    series = job.options.get("series")
    if job.kind == "nifti":
        image = read_image(job.input_dir / "image.nii")
        sources: list[Any] = []
    else:
        image, sources = _read_dicom(job.input_dir / "dicom", series, max_unpacked)
    image.meta["source"] = "upload"
    out: dict[str, Path] = {}
    want_unc = bool(job.options.get("uncertainty")) and model.supports_uncertainty
    kwargs: dict[str, Any] = {"tta": bool(job.options.get("tta"))}
    if want_unc:
        kwargs["uncertainty"] = True
    result: dict[str, Any] = {"task": model.task, "model": model.name, "backend": model.backend}
    if model.task == "segmentation":
        kwargs["probabilities"] = bool(job.options.get("probabilities"))
        with model.lock:
            pred = model.predictor.predict(image, **kwargs)
        write_image(_as_float(image), job.results_dir / "image.nii.gz")
        write_image(pred.label, job.results_dir / "label.nii.gz")
        out["image.nii.gz"] = job.results_dir / "image.nii.gz"
        out["label.nii.gz"] = job.results_dir / "label.nii.gz"
        if pred.probabilities is not None:
            write_image(pred.probabilities, job.results_dir / "probabilities.nii.gz")
            out["probabilities.nii.gz"] = job.results_dir / "probabilities.nii.gz"
        result["volumes_ml"] = label_volumes(pred.label, model.predictor.labels)
        result["max_label"] = max(int(v) for v in model.predictor.labels.values())
        result["seconds"] = round(float(pred.seconds), 4)
    else:
        with model.lock:
            pred = model.predictor.predict(image, **kwargs)
        result.update(pred.to_dict())
        result.pop("uncertainty_detail", None)
        result["seconds"] = round(float(pred.seconds), 4)
    unc_map, score, refer = uncertainty_of(pred)
    if unc_map is not None:
        write_image(unc_map, job.results_dir / "uncertainty.nii.gz")
        out["uncertainty.nii.gz"] = job.results_dir / "uncertainty.nii.gz"
    if score is not None:
        result["uncertainty"] = score
    if refer is not None:
        result["refer"] = refer
    detail = getattr(pred, "uncertainty_info", None)
    if isinstance(detail, dict):
        result["uncertainty_detail"] = detail
    if job.kind in ("dicom", "pacs") and sources:
        out.update(_dicom_results(pred, sources, job, model))
    atomic_write_json(job.results_dir / "result.json", result)
    out["result.json"] = job.results_dir / "result.json"
    job.result, job.files = result, out


def uncertainty_of(pred: Any) -> tuple[Any, float | None, bool | None]:
    """The uncertainty map (an Image or None), score and refer flag a predictor returned, when it did."""
    from medlens.io.image import Image

    unc = getattr(pred, "uncertainty", None)
    unc_map = unc if isinstance(unc, Image) else None
    score: Any = unc if isinstance(unc, int | float) and not isinstance(unc, bool) else None
    for key in ("uncertainty_score", "score"):
        if score is None and isinstance(getattr(pred, key, None), int | float):
            score = getattr(pred, key)
    meta = getattr(pred, "meta", {}) or {}
    if score is None and isinstance(meta.get("uncertainty"), int | float):
        score = meta["uncertainty"]
    refer = getattr(pred, "refer", None)
    if refer is None:
        refer = meta.get("refer")
    return (
        unc_map,
        None if score is None else float(score),
        None if refer is None else bool(refer),
    )


def label_volumes(label: Any, labels: dict[str, int]) -> dict[str, float]:
    """Volume in millilitres of each foreground class of a label map."""
    arr = np.asarray(label.array[0])
    voxel_ml = float(abs(np.linalg.det(label.affine[:3, :3]))) / 1000.0
    counts = np.bincount(arr.ravel().astype(np.int64), minlength=max(labels.values()) + 1)
    return {n: round(float(counts[v]) * voxel_ml, 4) for n, v in labels.items() if v != 0}


def _as_float(image: Any) -> Any:
    """The input image as float32 (NiiVue and every viewer read it; integer types would be kept as well)."""
    return image.with_array(np.asarray(image.array, dtype=np.float32))


def _read_dicom(folder: Path, series: str | None, max_unpacked: int | None = None) -> tuple[Any, list[Any]]:
    """The image of one series in ``folder`` and its source datasets (headers only, for DICOM SEG/SR).

    Raises:
        TooLarge: the series' headers declare more decoded pixel data than ``max_unpacked`` (checked before any
            pixel is decoded).
    """
    from medlens.io import read_image
    from medlens.io._dicom import dcmread
    from medlens.io.dicom import list_series

    found = list_series(folder)
    if series is None and len(found) > 1:
        listing = "; ".join(f"{s.uid} ({s.num_files} files)" for s in found)
        raise InputError(f"the upload holds {len(found)} series; choose one with ?series=UID: {listing}")
    chosen = found[0] if series is None else next((s for s in found if s.uid == series), None)
    if chosen is None:
        raise InputError(f"series {series!r} is not in the upload (found: {', '.join(s.uid for s in found)})")
    files = sorted(chosen.files)
    sources = [dcmread(Path(f), headers_only=True) for f in files]
    if max_unpacked is not None:
        check_pixel_budget(((Path(f).name, ds) for f, ds in zip(files, sources, strict=True)), max_unpacked)
    image = read_image(folder, series=chosen.uid)
    return image, sources


def _dicom_results(pred: Any, sources: list[Any], job: Job, model: ServedModel) -> dict[str, Path]:
    """DICOM SEG/SR of the prediction (``result_seg.dcm``, ``result_sr.dcm``), in the source's study."""
    from medlens.serve.dicom_out import write_dicom_results

    kind = "segmentation" if model.task == "segmentation" else "classification"
    run_info = {**model.info, "run_name": model.name}
    paths = write_dicom_results(pred, sources, job.results_dir, run_info=run_info, kind=kind, name="result")
    return {Path(p).name: Path(p) for p in paths}


def result_media_type(name: str) -> str:
    """Media type of a published result file."""
    if name.endswith(".dcm"):
        return "application/dicom"
    if name.endswith(".json"):
        return "application/json"
    return "application/gzip"


def model_card(model: ServedModel) -> dict[str, Any]:
    """The run's model card: ``RUN/model_card.json`` when present, else the essentials of ``run.json``."""
    import json

    path = model.run_dir / "model_card.json"
    if path.is_file():
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunError(f"{model.name}: model_card.json is not valid JSON ({exc})") from None
        if isinstance(card, dict):
            return {"source": "model_card.json", **card}
    info = model.info
    ds = info.get("dataset") or {}
    fold_results = info.get("fold_results") or {}
    return {
        "source": "run.json",
        "name": model.name,
        "task": info.get("task"),
        "created": info.get("created"),
        "medlens_version": info.get("medlens_version"),
        "configuration": info.get("configuration"),
        "dataset": {k: ds.get(k) for k in ("name", "labels", "channels", "modalities", "ndim")},
        "folds": info.get("folds"),
        "validation_scores": {k: v.get("best_score") for k, v in fold_results.items()},
        "classification": info.get("classification"),
        "decision": info.get("decision"),
        "validation_metrics": info.get("validation_metrics"),
        "postprocessing": info.get("postprocessing"),
        "referral": info.get("referral"),
        "backend": model.backend,
    }
