"""The PACS round trip: pull a study, apply a run, write DICOM-SEG/SR results, store them back in the study.

``run_on_study(RUN, config, STUDY)`` is what ``medlens pacs run`` does:

1. retrieve the study (or the series asked for) with DICOMweb (WADO-RS) or DIMSE (C-GET/C-MOVE);
2. pick the image series (``series_uid``, or the only image series; several are an error listing them);
3. read it with :func:`medlens.io.dicom.read_dicom_series` and predict with
   :func:`medlens.serve.load_predictor`;
4. write the results with :func:`medlens.serve.dicom_out.write_dicom_results` (a DICOM-SEG and a TID 1500 SR
   for segmentation, an SR for classification), which reference the source series and join its study;
5. store them (STOW-RS or C-STORE) and report their UIDs.

:func:`pull` and :func:`push` are the two halves alone, behind one protocol switch.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlens.errors import InputError, unknown_name
from medlens.serve.pacs import DicomWebClient
from medlens.serve.pacs_config import PacsConfig, check_uid
from medlens.serve.pacs_files import StoreResult, dicom_files

log = logging.getLogger(__name__)

PROTOCOLS = ("dicomweb", "dimse")


def make_client(config: PacsConfig, protocol: str = "dicomweb") -> Any:
    """A :class:`~medlens.serve.pacs.DicomWebClient` or :class:`~medlens.serve.dimse.DimseClient`.

    Both offer ``retrieve(study_uid, out_dir, series_uid=None) -> list[Path]`` and
    ``store(files) -> StoreResult``.
    """
    if protocol == "dicomweb":
        return DicomWebClient(config)
    if protocol == "dimse":
        from medlens.serve.dimse import DimseClient

        return DimseClient(config)
    raise unknown_name("PACS protocol", protocol, PROTOCOLS)


def pull(
    config: PacsConfig,
    study_uid: str,
    out_dir: str | Path,
    *,
    series_uid: str | None = None,
    protocol: str = "dicomweb",
    max_bytes: int | None = None,
) -> list[Path]:
    """Retrieve a study (or one series) into ``out_dir/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

    ``max_bytes`` bounds the instances' total size (None: unbounded); past it the transfer stops with
    :class:`~medlens.serve.security.TooLarge`.
    """
    client = make_client(config, protocol)
    return list(client.retrieve(study_uid, out_dir, series_uid=series_uid, max_bytes=max_bytes))


def push(config: PacsConfig, paths: list[str | Path], *, protocol: str = "dicomweb") -> StoreResult:
    """Store DICOM files (folders are searched recursively for Part-10 files)."""
    result: StoreResult = make_client(config, protocol).store(dicom_files(paths))
    return result


@dataclass
class ResultObject:
    """One DICOM object ``pacs run`` produced and stored."""

    path: Path
    modality: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


@dataclass
class PacsRunResult:
    """What :func:`run_on_study` did.

    Attributes:
        study_uid: the study.
        source_series_uid: the series the model was applied to.
        results: the SEG/SR objects written and stored.
        store: what the PACS accepted.
        work_dir: where the inputs and results were kept (None when a temporary folder was used).
    """

    study_uid: str
    source_series_uid: str
    results: list[ResultObject] = field(default_factory=list)
    store: StoreResult = field(default_factory=StoreResult)
    work_dir: Path | None = None


def run_on_study(
    run_dir: str | Path,
    config: PacsConfig,
    study_uid: str,
    *,
    series_uid: str | None = None,
    protocol: str = "dicomweb",
    work_dir: str | Path | None = None,
    device: str = "auto",
    tta: bool = False,
) -> PacsRunResult:
    """Pull a study, apply the run to one of its series, store the SEG/SR results back into the study.

    Args:
        run_dir: a run directory from ``medlens train``.
        config: PACS settings.
        study_uid: StudyInstanceUID.
        series_uid: the series to process; default: the study's only image series.
        protocol: "dicomweb" or "dimse".
        work_dir: keep the pulled series (``input/``) and the results (``results/``) there; default: a
            temporary folder, removed afterwards.
        device: "auto", "cpu" or "cuda".
        tta: mirroring test-time augmentation (segmentation).

    Raises:
        PacsError: the PACS cannot be reached, refuses us, or has no such study.
        InputError: the study has several image series and none was chosen, or the run does not fit them.
    """
    study_uid = check_uid(study_uid, "StudyInstanceUID")
    if series_uid is not None:
        series_uid = check_uid(series_uid, "SeriesInstanceUID")
    client = make_client(config, protocol)
    keep = work_dir is not None
    if work_dir is not None:
        root = Path(work_dir)
        if root.exists() and any(root.iterdir()):
            raise InputError(
                f"{root}: already exists and is not empty (choose a new folder to keep the files in)"
            )
    else:
        root = Path(tempfile.mkdtemp(prefix="medlens-pacs-"))
    try:
        inputs = root / "input"
        client.retrieve(study_uid, inputs, series_uid=series_uid)
        series = _image_series(inputs, series_uid, study_uid)
        results = _predict_to_dicom(Path(run_dir), inputs / series, root / "results", device=device, tta=tta)
        stored = client.store(results)
        objects = [_describe(p) for p in results]
        missing = [o.sop_instance_uid for o in objects if o.sop_instance_uid not in stored.stored]
        if missing and stored.stored:  # servers that list accepted instances: all results must be there
            log.warning("the PACS did not confirm %d result object(s): %s", len(missing), ", ".join(missing))
        return PacsRunResult(study_uid, series, objects, stored, root if keep else None)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _image_series(folder: Path, series_uid: str | None, study_uid: str) -> str:
    """The SeriesInstanceUID to process among what was pulled into ``folder``."""
    from medlens.io.dicom import list_series

    found = list_series(folder)  # image series only: SEG, SR and the like are skipped
    if series_uid is not None:
        if not any(s.uid == series_uid for s in found):
            raise InputError(f"series {series_uid} of study {study_uid} holds no image the model can read")
        return series_uid
    if len(found) > 1:
        listing = "; ".join(str(s) for s in found)
        raise InputError(
            f"study {study_uid} has {len(found)} image series; choose one with --series ({listing})"
        )
    return found[0].uid


def _predict_to_dicom(
    run_dir: Path, series_dir: Path, out_dir: Path, *, device: str, tta: bool
) -> list[Path]:
    """Apply the run to the series in ``series_dir``; write its DICOM results into ``out_dir``."""
    from medlens.io.dicom import read_dicom_series
    from medlens.serve import load_predictor
    from medlens.serve.dicom_out import dicom_sources, write_dicom_results

    image = read_dicom_series(series_dir)
    sources = dicom_sources(image)  # headers only: the pixels were read into the image already
    predictor = load_predictor(run_dir, device=device)
    prediction = predictor.predict(image, tta=tta)
    written = write_dicom_results(prediction, sources, out_dir, run_info=run_dir, kind="auto")
    paths = [Path(p) for p in written]
    if not paths:
        raise InputError(f"{run_dir}: the run produced no DICOM result for series {series_dir.name}")
    log.info("wrote %s", ", ".join(p.name for p in paths))
    return paths


def _describe(path: Path) -> ResultObject:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return ResultObject(
        path=path,
        modality=str(ds.get("Modality", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
    )
