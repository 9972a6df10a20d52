"""``medlens pacs``: query, pull, push and run a model on a PACS study (DICOMweb or DIMSE)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medlens.cli._app import _echo, app

pacs_app = typer.Typer(
    help="Exchange studies with a PACS (DICOMweb or DIMSE): find, pull, push, run a model on a study.\n\n"
    "Settings come from --config (a TOML or JSON file with dicomweb and dimse tables) and MEDLENS_PACS_URL, "
    "MEDLENS_PACS_USER, MEDLENS_PACS_PASSWORD, MEDLENS_PACS_TOKEN (which win). See docs/pacs.md.",
    no_args_is_help=True,
)
app.add_typer(pacs_app, name="pacs")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="PACS config file (.toml or .json).", show_default=False)
]
ProtocolOpt = Annotated[str, typer.Option("--protocol", "-p", help="dicomweb (QIDO/WADO/STOW-RS) or dimse.")]
StudyOpt = Annotated[str, typer.Option("--study", help="StudyInstanceUID.")]
SeriesOpt = Annotated[str | None, typer.Option("--series", help="SeriesInstanceUID (default: whole study).")]


def _config(path: Path | None) -> Any:
    from medlens.serve.pacs_config import load_pacs_config

    return load_pacs_config(path)


@pacs_app.command("echo")
def echo(config: ConfigOpt = None, protocol: ProtocolOpt = "dicomweb") -> None:
    """Check that the PACS answers and accepts our credentials (C-ECHO or a QIDO-RS query).

    Example: medlens pacs echo --config pacs.toml --protocol dimse
    """
    from medlens.serve.pacs_run import make_client

    client = make_client(_config(config), protocol)
    if protocol == "dimse":
        client.echo()
    else:
        client.search_studies(limit="1")
    _echo(f"{client!r}: OK")


@pacs_app.command("find")
def find(
    study: Annotated[str | None, typer.Option("--study", help="List this study's series.")] = None,
    patient: Annotated[str | None, typer.Option("--patient", help="PatientID to match.")] = None,
    config: ConfigOpt = None,
    protocol: ProtocolOpt = "dicomweb",
) -> None:
    """List studies (optionally of one patient), or the series of one study.

    Example: medlens pacs find --patient 12345 --config pacs.toml
    """
    from medlens.serve.pacs_run import make_client

    client = make_client(_config(config), protocol)
    rows = _find_rows(client, protocol, study, patient)
    for row in rows:
        _echo(row)
    if not rows:
        _echo("no match")


def _find_rows(client: Any, protocol: str, study: str | None, patient: str | None) -> list[str]:
    from medlens.serve.pacs import json_value

    if protocol == "dimse":
        if study:
            return [
                f"series {s.get('SeriesNumber', '?')} {s.get('Modality', '')} '{s.get('SeriesDescription', '')}' "
                f"{s.get('NumberOfSeriesRelatedInstances', '?')} instance(s) (uid {s.SeriesInstanceUID})"
                for s in client.find_series(study)
            ]
        keys = {"PatientID": patient} if patient else {}
        return [
            f"study {s.StudyInstanceUID} patient {s.get('PatientID', '')} {s.get('StudyDate', '')} "
            f"'{s.get('StudyDescription', '')}' {s.get('ModalitiesInStudy', '')}"
            for s in client.find("STUDY", **keys)
        ]
    if study:
        return [
            f"series {json_value(s, '00200011', '?')} {json_value(s, '00080060', '')} "
            f"'{json_value(s, '0008103E', '')}' {json_value(s, '00201209', '?')} instance(s) "
            f"(uid {json_value(s, '0020000E')})"
            for s in client.search_series(study)
        ]
    filters = {"PatientID": patient} if patient else {}
    return [
        f"study {json_value(s, '0020000D')} patient {json_value(s, '00100020', '')} "
        f"{json_value(s, '00080020', '')} '{json_value(s, '00081030', '')}'"
        for s in client.search_studies(**filters)
    ]


@pacs_app.command("pull")
def pull(
    study: StudyOpt,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for <SeriesUID>/<SOPInstanceUID>.dcm files.")
    ],
    series: SeriesOpt = None,
    config: ConfigOpt = None,
    protocol: ProtocolOpt = "dicomweb",
) -> None:
    """Retrieve a study (or one series) from the PACS (WADO-RS, or C-GET/C-MOVE).

    Example: medlens pacs pull --study 1.2.840.113619.2.55 --out study/ --config pacs.toml
    """
    from medlens.serve.pacs_run import pull as do_pull

    files = do_pull(_config(config), study, out, series_uid=series, protocol=protocol)
    n_series = len({f.parent for f in files})
    _echo(f"pulled {len(files)} instance(s) in {n_series} series into {out}")


@pacs_app.command("push")
def push(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")],
    config: ConfigOpt = None,
    protocol: ProtocolOpt = "dicomweb",
) -> None:
    """Store DICOM files on the PACS (STOW-RS, or C-STORE).

    Example: medlens pacs push results/ --config pacs.toml
    """
    from medlens.serve.pacs_run import push as do_push

    result = do_push(_config(config), list(paths), protocol=protocol)
    _echo(f"stored {len(result.stored)} of {len(result.files)} instance(s)")
    for uid, why in result.failed:
        _echo(f"refused {uid}: {why}")
    if result.failed:
        raise typer.Exit(1)


@pacs_app.command("run")
def run(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from 'medlens train'.")],
    study: StudyOpt,
    series: Annotated[
        str | None,
        typer.Option("--series", help="SeriesInstanceUID to process (default: the only image series)."),
    ] = None,
    config: ConfigOpt = None,
    protocol: ProtocolOpt = "dicomweb",
    keep: Annotated[
        Path | None, typer.Option("--keep", help="Keep the pulled series and the results in this folder.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    tta: Annotated[bool, typer.Option("--tta", help="Mirroring test-time augmentation.")] = False,
) -> None:
    """Pull a study, apply a run, store the DICOM-SEG/SR results back in the study; print their UIDs.

    Example: medlens pacs run runs/liver --study 1.2.840.113619.2.55 --config pacs.toml
    """
    from medlens.serve.pacs_run import run_on_study

    result = run_on_study(
        run_dir,
        _config(config),
        study,
        series_uid=series,
        protocol=protocol,
        work_dir=keep,
        device=device,
        tta=tta,
    )
    _echo(f"study {result.study_uid}, source series {result.source_series_uid}")
    for obj in result.results:
        _echo(f"{obj.modality} series {obj.series_instance_uid} instance {obj.sop_instance_uid}")
    _echo(f"stored {len(result.store.stored)} result object(s)")
