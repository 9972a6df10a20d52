"""Commands for clinical integration: DICOM de-identification."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlens.cli._app import _echo, _progress, app


@app.command()
def deid(
    src: Annotated[Path, typer.Argument(help="DICOM file or folder to de-identify (never modified).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (same relative paths as SRC).")],
    key_file: Annotated[
        Path,
        typer.Option(
            help="Secret key for UIDs, pseudonyms and date offsets; created (mode 600) if missing. "
            "Keep it outside --out; the same key gives the same mapping."
        ),
    ],
    audit: Annotated[
        Path | None, typer.Option(help="CSV audit log of every change (default OUT/deid_audit.csv).")
    ] = None,
    shift_dates: Annotated[
        bool, typer.Option(help="Retain longitudinal dates, shifted by a per-patient offset (option 113107).")
    ] = False,
    keep_dates: Annotated[bool, typer.Option(help="Retain full dates unmodified (option 113106).")] = False,
    keep_device: Annotated[bool, typer.Option(help="Retain device identity (option 113109).")] = False,
    keep_institution: Annotated[
        bool, typer.Option(help="Retain institution identity (option 113112).")
    ] = False,
    keep_patient_characteristics: Annotated[
        bool, typer.Option(help="Retain sex, age, size, weight... (option 113108).")
    ] = False,
    clean_descriptors: Annotated[
        bool, typer.Option(help="Keep free-text descriptors, scrubbed of identifiers (option 113105).")
    ] = False,
    keep_uids: Annotated[bool, typer.Option(help="Retain UIDs unchanged (option 113110).")] = False,
    allow_burned_in: Annotated[
        bool,
        typer.Option(
            help="Also write images that may carry burned-in text (US, secondary capture, flagged)."
        ),
    ] = False,
) -> None:
    """De-identify DICOM files (PS3.15 Basic Application Level Confidentiality Profile + options).

    Private tags are removed, UIDs replaced by a keyed mapping (consistent across runs with the same key),
    patient ID/name by a keyed pseudonym; images that may carry burned-in text are quarantined (not written)
    unless --allow-burned-in.

    Example: medlens deid dicom_in/ --out dicom_deid/ --key-file ~/secrets/deid.key --shift-dates
    """
    from medlens.io.deid import DeidOptions, deidentify

    options = DeidOptions(
        retain_modified_dates=shift_dates,
        retain_full_dates=keep_dates,
        retain_device_identity=keep_device,
        retain_institution_identity=keep_institution,
        retain_patient_characteristics=keep_patient_characteristics,
        clean_descriptors=clean_descriptors,
        retain_uids=keep_uids,
        allow_burned_in=allow_burned_in,
    )
    with _progress("de-identifying") as progress:
        result = deidentify(src, out, key_file=key_file, options=options, audit_path=audit, progress=progress)
    counts = ", ".join(f"{n} {a}" for a, n in sorted(result.actions.items()))
    _echo(f"wrote {len(result.written)} file(s) to {result.out_dir} ({counts or 'no changes'})")
    for rel, reason in result.quarantined:
        _echo(f"quarantined (not written): {rel}: {reason}")
    for rel, reason in result.skipped:
        _echo(f"skipped: {rel}: {reason}")
    _echo(f"audit: {result.audit_path}")
