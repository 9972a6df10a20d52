"""Prediction results as DICOM: a DICOM-SEG and a TID 1500 SR for a segmentation, an SR for a classification.

``write_dicom_results(prediction, source_datasets, out_dir, run_info=...)`` is what ``medlens predict
--dicom-out`` and the PACS round trip call. The objects go into the *source's study*, each in a new series
with new UIDs; patient and study attributes are copied from the source by highdicom (nothing is invented);
Manufacturer is "medlens", SoftwareVersions the medlens version and the run name. Files are written
atomically as ``<name>_seg.dcm`` and ``<name>_sr.dcm``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medlens._fs import atomic_path
from medlens.errors import InputError
from medlens.io.image import Image

log = logging.getLogger(__name__)

KINDS = ("auto", "segmentation", "classification")
#: New series numbers: the source's SeriesNumber plus these offsets.
SEG_SERIES_OFFSET = 1000
SR_SERIES_OFFSET = 2000


def write_dicom_results(
    prediction: Any,
    source_datasets: Sequence[Any],
    out_dir: str | Path,
    *,
    run_info: Mapping[str, Any] | str | Path,
    kind: str = "auto",
    name: str | None = None,
) -> list[Path]:
    """Write a prediction as DICOM objects in the source's study.

    Args:
        prediction: a :class:`~medlens.serve.predictor.SegmentationPrediction` (or its label map
            :class:`~medlens.io.image.Image`, in the source geometry) -> ``<name>_seg.dcm`` + ``<name>_sr.dcm``
            with the volume of every label; or a :class:`~medlens.serve.classify.ClassificationPrediction` ->
            ``<name>_sr.dcm`` with the probabilities, decision and threshold. An uncertainty score and refer
            flag are included when the prediction carries them.
        source_datasets: the pydicom datasets of the input series (every file; headers suffice, any order) or
            of the classified image.
        out_dir: where to write (created if needed).
        run_info: the run's ``run.json`` content (optionally with ``run_name``), or the run directory.
        kind: "auto" (from the prediction's type), "segmentation" or "classification".
        name: file name stem; default ``series<SeriesNumber>`` of the source. Either is sanitised with
            :func:`safe_stem` (a source header never chooses where a file lands).

    Returns:
        The files written (SEG first for a segmentation).

    Raises:
        InputError: no source datasets, sources from several series (SEG) or studies, a label map that does
            not have the source's geometry, or a kind that does not fit the prediction.
    """
    from medlens.io.dicom_seg import build_segmentation, segment_volumes
    from medlens.io.dicom_sr import classification_report, segmentation_report

    _quiet_highdicom()
    info = _run_info(run_info)
    kind = _kind(prediction, kind)
    sources = _check_sources(source_datasets, one_series=kind == "segmentation")
    out_dir = Path(out_dir)
    stem = safe_stem(name if name else _default_name(sources[0]))
    base = _series_number(sources[0])
    dataset = info.get("dataset") or {}
    run_name = str(info.get("run_name") or Path(str(info.get("run_dir") or "run")).name)
    version = f"{info.get('medlens_version') or _medlens_version()} run {run_name}"
    algorithm = f"medlens {dataset.get('name') or info.get('task') or 'model'}"
    codes = info.get("segment_codes") if isinstance(info.get("segment_codes"), Mapping) else None
    ctx = _context(prediction, info, algorithm, version, base + SR_SERIES_OFFSET)
    objects: list[tuple[Any, Path]] = []  # built first, written after: a failure leaves no half result
    if kind == "segmentation":
        label = prediction if isinstance(prediction, Image) else prediction.label
        labels = {str(k): int(v) for k, v in (dataset.get("labels") or {}).items()}
        if not labels:
            raise InputError("run.json has no dataset labels; cannot name the segments")
        seg = build_segmentation(
            label,
            sources,
            labels,
            algorithm_name=algorithm,
            algorithm_version=version,
            series_number=base + SEG_SERIES_OFFSET,
            codes=codes,
            model_name=algorithm,
            device_serial=run_name,
            series_description=f"{algorithm} segmentation",
        )
        ctx.series_description = f"{algorithm} volumes"
        sr = segmentation_report(seg, sources, segment_volumes(label, labels), ctx, codes)
        objects += [(seg, out_dir / f"{stem}_seg.dcm"), (sr, out_dir / f"{stem}_sr.dcm")]
    else:
        cls_info = info.get("classification") or {}
        names = list(cls_info.get("class_names") or prediction.probabilities.keys())
        ctx.series_description = f"{algorithm} classification"
        sr = classification_report(prediction, names, sources, ctx, task=str(dataset.get("name") or ""))
        objects.append((sr, out_dir / f"{stem}_sr.dcm"))
    written = [_save(ds, path) for ds, path in objects]
    log.debug("wrote %s", ", ".join(str(p) for p in written))
    return written


def dicom_sources(image: Image) -> list[Any]:
    """The source datasets (headers only) of an image read from DICOM, from ``image.meta["files"]``.

    Raises:
        InputError: the image was not read from DICOM (a SEG and an SR need a DICOM source).
    """
    from medlens.io._dicom import dcmread

    files = image.meta.get("files") or []
    if image.meta.get("format") != "dicom" or not files:
        source = image.meta.get("source", "the input")
        raise InputError(
            f"{source}: is not DICOM; --dicom-out writes a DICOM-SEG/SR that must reference a DICOM source "
            "(predict on the DICOM series folder instead, or leave out --dicom-out)"
        )
    return [dcmread(Path(f), headers_only=True) for f in files]


def check_dicom_inputs(src: str | Path, series: str | None = None) -> None:
    """Refuse, before any prediction, inputs that are not DICOM when DICOM results are asked for.

    Raises:
        InputError: naming the first input that is a NIfTI/NRRD/MHA/PNG... file.
    """
    from medlens.io._dicom import DICOM_SUFFIXES, has_dicm_preamble
    from medlens.serve.predictor import discover_inputs

    for _, path, _ in discover_inputs(Path(src), series):
        if path.is_file() and not has_dicm_preamble(path) and path.suffix.lower() not in DICOM_SUFFIXES:
            raise InputError(
                f"{path}: is not DICOM; --dicom-out writes a DICOM-SEG/SR that must reference a DICOM source "
                "(predict on the DICOM series folder instead, or leave out --dicom-out)"
            )


def dicom_writer(dicom_out: str | Path, run_info: Mapping[str, Any] | str | Path) -> Any:
    """An ``on_result`` callback for ``predict_path``: writes each result's DICOM objects into ``dicom_out``."""
    info = _run_info(run_info)

    def write(name: str, image: Image, result: Any) -> list[Path]:
        return write_dicom_results(result, dicom_sources(image), dicom_out, run_info=info, name=name)

    return write


# ---- helpers -----------------------------------------------------------------------------------------------------
def _run_info(run_info: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(run_info, Mapping):
        return dict(run_info)
    from medlens.tasks.run import read_run

    info = read_run(run_info)
    info.setdefault("run_name", Path(run_info).resolve().name)
    return info


def _kind(prediction: Any, kind: str) -> str:
    if kind not in KINDS:
        from medlens.errors import unknown_name

        raise unknown_name("DICOM result kind", kind, KINDS)
    is_seg = isinstance(prediction, Image) or isinstance(getattr(prediction, "label", None), Image)
    is_cls = isinstance(getattr(prediction, "probabilities", None), Mapping)
    found = "segmentation" if is_seg else "classification" if is_cls else None
    if found is None:
        raise InputError(
            f"cannot write a {type(prediction).__name__} as DICOM; pass a segmentation or classification prediction"
        )
    if kind != "auto" and kind != found:
        raise InputError(f"kind={kind!r} but the prediction is a {found}")
    return found


def _check_sources(sources: Sequence[Any], one_series: bool) -> list[Any]:
    sources = list(sources)
    if not sources:
        raise InputError("no source DICOM datasets given; DICOM results must reference their source images")
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if any(key not in ds for ds in sources):
            raise InputError(f"a source dataset has no {key}; it is not a DICOM image")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) > 1:
        raise InputError(f"the source datasets come from {len(studies)} studies; give one study's images")
    series = {str(ds.SeriesInstanceUID) for ds in sources}
    if one_series and len(series) > 1:
        raise InputError(f"the source datasets come from {len(series)} series; a SEG references one series")
    return sources


def _series_number(ds: Any) -> int:
    try:
        return int(ds.get("SeriesNumber") or 0) % 100_000
    except (TypeError, ValueError):
        return 0


def _default_name(ds: Any) -> str:
    """``series<SeriesNumber>`` of the source; not yet safe (a PACS chooses these values), see :func:`safe_stem`."""
    try:
        number = ds.get("SeriesNumber")
    except (TypeError, ValueError):  # an undecodable IS value
        number = None
    return f"series{number}" if number not in (None, "") else f"series_{str(ds.SeriesInstanceUID)[-12:]}"


#: Longest file-name stem written (the ``_seg.dcm`` suffix comes on top).
MAX_STEM = 64


def safe_stem(name: str) -> str:
    """A file-name stem made only of ``[A-Za-z0-9._-]``, not starting with a dot, at most :data:`MAX_STEM` long.

    Whatever ``name`` holds (a source header's SeriesNumber such as ``'/../../x'``, a caller's name), the result
    is one plain name inside the output folder: no separator, no ``..`` component, no hidden file.
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)).lstrip(".")[:MAX_STEM]
    return stem or "result"


def _medlens_version() -> str:
    from medlens import __version__

    return __version__


def _context(
    prediction: Any, info: Mapping[str, Any], algorithm: str, version: str, series_number: int
) -> Any:
    """The SR context: who made it, and the prediction's uncertainty and referral when it has them."""
    from medlens.io.dicom_sr import ReportContext

    detail = getattr(prediction, "uncertainty_info", None) or {}
    score = getattr(prediction, "uncertainty_score", None)
    if score is None:
        value = getattr(prediction, "uncertainty", None)
        score = value if isinstance(value, int | float) else detail.get("score")
    referral = info.get("referral") or {}
    threshold = detail.get("threshold", referral.get("threshold"))
    refer = getattr(prediction, "refer", None)
    return ReportContext(
        algorithm_name=algorithm,
        algorithm_version=version,
        series_number=series_number,
        uncertainty=None if score is None else float(score),
        uncertainty_name=str(
            detail.get("score_name") or referral.get("score_name") or "uncertainty score"
        ).replace("_", " "),
        refer=None if refer is None else bool(refer),
        refer_threshold=None if threshold is None or score is None else float(threshold),
    )


def _quiet_highdicom() -> None:
    """highdicom logs every module it copies at INFO; keep that out of medlens's progress output, unless the
    user configured the highdicom logger themselves."""
    hd_log = logging.getLogger("highdicom")
    if hd_log.level == logging.NOTSET:
        hd_log.setLevel(logging.WARNING)


def _save(ds: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path
