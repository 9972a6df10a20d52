"""De-identify DICOM files: PS3.15 Basic Application Level Confidentiality Profile with selectable options.

``deidentify(src, dst, key_file=...)`` copies every DICOM file under ``src`` to the same relative path under
``dst`` with the Table E.1-1 actions applied (:mod:`medlens.io.deid_profile`), recursing into sequences:

- private attributes (odd groups), curves ``(50xx,xxxx)`` and whole overlay groups ``(60xx,xxxx)`` are removed
  (the table removes Overlay Data and Overlay Comments; the rest of the group is dropped too, because an
  Overlay Plane module without its type 1 Overlay Data is invalid);
- combined codes (``X/Z``, ``X/Z/D``, ``X/Z/U*``...) resolve to the strictest action that keeps the IOD valid,
  from the attribute's type in the IOD (:func:`~medlens.io.deid_profile.resolve_action`); a plain ``X`` on an
  attribute the IOD requires (type 1/2) becomes ``D``/``Z`` for the same reason;
- sequences are walked item by item (:mod:`medlens.io.deid_dataset`): a kept sequence is cleaned inside, a
  ``D`` sequence keeps its structure with dummy values (codes of public coding schemes keep their meaning);
- UIDs (``U``) become ``2.25.<int>`` where the integer is an HMAC-SHA256 of the old UID under a secret key
  (RFC 9562 version-8 bits set): the same UID gives the same new UID in every file and every run with the same
  key, so studies, series and references inside sequences stay linked, and nobody without the key can map back;
- Patient ID and Patient's Name become a keyed pseudonym of the Patient ID (the same patient keeps the same
  pseudonym across runs with the same key);
- with ``retain_modified_dates`` every date is shifted by a per-patient whole number of days derived from the
  key (times of day kept, so intervals between dates are preserved); without a date option, dates outside the
  table (e.g. Instance Creation Date) are handled like the table's dates (``X/Z/D``), stricter than the table;
- ``clean_descriptors`` keeps free-text descriptors but scrubs any identifier of the patient found elsewhere in
  the file, dates, e-mail addresses and digit runs of five or more (a scrubber, not a guarantee: names of other
  people that appear nowhere else in the file cannot be recognised);
- the result carries PatientIdentityRemoved=YES, DeidentificationMethod, DeidentificationMethodCodeSequence
  (CID 7050 codes of the profile and options used) and LongitudinalTemporalInformationModified.

Images that may carry burned-in text (BurnedInAnnotation=YES, ultrasound, secondary capture) are not written
unless ``allow_burned_in``: they are listed as quarantined in the audit (nothing of them is copied). Encapsulated
documents (PDF, CDA, STL, OBJ, MTL SOP classes, or any Encapsulated Document (0042,0011) anywhere in a file) are
always quarantined: the document itself carries the name and birth date and is not de-identified; no option
writes them. The 128-byte Part 10 preamble is zeroed (it is free bytes a writer may fill with anything). DICOMDIR
index files are skipped (they repeat patient data and point at byte offsets of the original files): rebuild
one on the output with a DICOMDIR tool. Files and folder names are copied as they are: rename them first if
they contain identifiers.

The audit CSV has one row per change (file, path in the dataset, tag, keyword, action, rule, old value hash,
new value). The old value is never written: its hash is an HMAC-SHA256 under the same key (truncated), because
a plain hash of a low-entropy value such as a birth date or a name is reversed by trying every candidate.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import logging
import os
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medlens._fs import atomic_path, atomic_write_bytes
from medlens.errors import InputError
from medlens.io import deid_profile as profile
from medlens.io.deid_dataset import AUDIT_COLUMNS, AuditRow, ProfileWalk, scrub_text

if TYPE_CHECKING:
    from pydicom import Dataset

log = logging.getLogger(__name__)

__all__ = [
    "AuditRow",
    "DeidOptions",
    "DeidResult",
    "Deidentifier",
    "burned_in_reason",
    "deidentify",
    "encapsulated_document_reason",
    "load_or_create_key",
    "read_audit",
    "scrub_text",
]

_SC_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture (single and multi-frame)
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_ENCAPSULATED_SOPS = {
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
    "1.2.840.10008.5.1.4.1.1.104.3": "Encapsulated STL",
    "1.2.840.10008.5.1.4.1.1.104.4": "Encapsulated OBJ",
    "1.2.840.10008.5.1.4.1.1.104.5": "Encapsulated MTL",
}
_ENCAPSULATED_DOCUMENT = 0x00420011
_PREAMBLE = b"\0" * 128
_KEY_BYTES = 32


@dataclass(frozen=True)
class DeidOptions:
    """Options of PS3.15 Table E.1-1 (CID 7050) medlens implements; everything off is the Basic Profile.

    Attributes:
        retain_modified_dates: keep dates, shifted by a per-patient offset of whole days derived from the key.
        retain_full_dates: keep dates unmodified (not with ``retain_modified_dates``).
        retain_device_identity: keep device identifiers (station name, serial numbers...).
        retain_institution_identity: keep institution name, address and department.
        retain_patient_characteristics: keep sex, age, size, weight, ethnic group, smoking/pregnancy status.
        clean_descriptors: keep free-text descriptors (study/series description...) after scrubbing them.
        retain_uids: keep all UIDs unchanged (off by default).
        allow_burned_in: de-identify images that may carry burned-in text instead of quarantining them (their
            pixels are NOT cleaned).
    """

    retain_modified_dates: bool = False
    retain_full_dates: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    clean_descriptors: bool = False
    retain_uids: bool = False
    allow_burned_in: bool = False

    def __post_init__(self) -> None:
        if self.retain_modified_dates and self.retain_full_dates:
            raise InputError(
                "retain_modified_dates and retain_full_dates exclude each other: choose shifted or full dates"
            )

    def profile_options(self) -> tuple[str, ...]:
        """Names of the selected Table E.1-1 options (keys of :data:`~medlens.io.deid_profile.OPTIONS`)."""
        return tuple(f.name for f in fields(self) if f.name in profile.OPTIONS and getattr(self, f.name))


@dataclass
class DeidResult:
    """What a :func:`deidentify` run did."""

    out_dir: Path
    audit_path: Path
    written: list[Path] = field(default_factory=list)
    quarantined: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)
    untouched: int = 0


def load_or_create_key(path: str | Path) -> bytes:
    """Read the secret key from ``path``, or create it (32 random bytes, hex, permission 600) if missing."""
    path = Path(path)
    if path.exists():
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError as e:
            raise InputError(
                f"{path}: not a medlens key file (expected hex); point --key-file elsewhere"
            ) from e
        if len(key) < 16:
            raise InputError(f"{path}: key too short ({len(key)} bytes, need >= 16); use a new --key-file")
        if path.stat().st_mode & 0o077:
            log.warning("%s: key file is readable by others; restrict it with chmod 600", path)
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(_KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    log.info(
        "created a new de-identification key at %s: keep it secret, keep it to reproduce the mapping", path
    )
    return key


def burned_in_reason(ds: Dataset) -> str | None:
    """Why ``ds`` may carry burned-in identifying text in its pixels, or None."""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "BurnedInAnnotation=YES"
    if str(ds.get("Modality", "")).upper() == "US":
        return "ultrasound (modality US) images often carry burned-in text"
    if str(ds.get("SOPClassUID", "")).startswith(_SC_SOP_PREFIX):
        return "secondary capture images often carry burned-in text"
    return None


def encapsulated_document_reason(ds: Dataset) -> str | None:
    """Why ``ds`` holds an encapsulated document medlens cannot de-identify (always quarantined), or None."""
    meta_sop = getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "")
    for sop in (str(ds.get("SOPClassUID", "") or ""), str(meta_sop or "")):
        if sop in _ENCAPSULATED_SOPS:
            return (
                f"encapsulated document ({_ENCAPSULATED_SOPS[sop]}): the document usually carries the patient's "
                "name and birth date and is not de-identified; never written"
            )
    if any(elem.tag == _ENCAPSULATED_DOCUMENT for elem in ds.iterall()):
        return (
            "carries an encapsulated document (Encapsulated Document (0042,0011)) that is not de-identified; "
            "never written"
        )
    return None


class Deidentifier:
    """Applies the profile to datasets in place; holds the key that makes UIDs, pseudonyms and offsets stable."""

    def __init__(self, key: bytes, options: DeidOptions | None = None) -> None:
        self._key = key
        self.options = options or DeidOptions()
        self.last_untouched = 0

    # ---- keyed mappings ----------------------------------------------------------------------------------------
    def _mac(self, purpose: str, value: str | bytes) -> bytes:
        data = value.encode("utf-8") if isinstance(value, str) else value
        return hmac.new(self._key, purpose.encode() + b"\0" + data, hashlib.sha256).digest()

    def new_uid(self, uid: str) -> str:
        """Map ``uid`` to ``2.25.<128-bit int>`` (UUIDv8 layout); deterministic for a key, one-way without it."""
        b = bytearray(self._mac("uid", str(uid).strip("\0 "))[:16])
        b[6] = (b[6] & 0x0F) | 0x80
        b[8] = (b[8] & 0x3F) | 0x80
        return f"2.25.{int.from_bytes(b, 'big')}"

    def pseudonym(self, patient_id: str) -> str:
        """Keyed pseudonym of a Patient ID (used for both Patient ID and Patient's Name)."""
        code = base64.b32encode(self._mac("patient", str(patient_id).strip())[:10]).decode().rstrip("=")
        return f"ML{code[:14]}"

    def date_offset_days(self, patient_key: str) -> int:
        """Per-patient shift: between 1 and 11 years into the past, in whole days."""
        n = int.from_bytes(self._mac("dateshift", patient_key)[:8], "big")
        return -(365 + n % (3650 + 1))

    def value_hash(self, value: Any) -> str:
        """Keyed hash of an old value for the audit (never the value itself)."""
        if value is None or value == "":
            return ""
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        return self._mac("audit", raw)[:8].hex()

    # ---- dataset -----------------------------------------------------------------------------------------------
    def deidentify_dataset(self, ds: Dataset, label: str = "") -> list[AuditRow]:
        """De-identify ``ds`` in place (file meta included); return the audit rows."""
        walk = ProfileWalk(self, ds, label)
        walk.run()
        self.last_untouched = walk.untouched
        return walk.rows


# ---- files -----------------------------------------------------------------------------------------------------
def deidentify(
    src: str | Path,
    dst: str | Path,
    *,
    key_file: str | Path,
    options: DeidOptions | None = None,
    audit_path: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DeidResult:
    """De-identify every DICOM file under ``src`` (a folder or one file) into ``dst``, same relative paths.

    Args:
        src: the input folder or file; never modified.
        dst: output folder (created; must not be inside ``src``). Existing files at the same paths are replaced.
        key_file: secret key file (created with permission 600 if missing). Keep it outside ``dst``.
        options: profile options; default the Basic Profile.
        audit_path: CSV audit log; default ``dst/deid_audit.csv``.
        progress: ``progress(done, total)`` callback.

    Returns:
        A :class:`DeidResult` (written files, quarantined and skipped files with reasons, action counts).
    """
    options = options or DeidOptions()
    src, dst, key_path = Path(src).resolve(), Path(dst).resolve(), Path(key_file).resolve()
    if not src.exists():
        raise InputError(f"{src}: no such file or folder; give the DICOM folder to de-identify")
    if dst == src or (src.is_dir() and dst.is_relative_to(src)):
        raise InputError(f"{dst}: output is inside the input folder {src}; choose --out outside it")
    if src.is_file() and dst == src.parent:
        raise InputError(f"{dst}: writing there would overwrite the input {src.name}; choose another --out")
    if dst.exists() and not dst.is_dir():
        raise InputError(f"{dst}: exists and is not a folder; choose another --out")
    if key_path.is_relative_to(dst) or (src.is_dir() and key_path.is_relative_to(src)):
        raise InputError(f"{key_path}: the key file must not be inside the input or output folder")
    audit = Path(audit_path).resolve() if audit_path else dst / "deid_audit.csv"
    if src.is_dir() and audit.is_relative_to(src):
        raise InputError(f"{audit}: the audit log must not be written inside the input folder {src}")
    key = load_or_create_key(key_path)
    deid = Deidentifier(key, options)
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    root = src.parent if src.is_file() else src
    result = DeidResult(out_dir=dst, audit_path=audit)
    rows: list[AuditRow] = []
    for done, path in enumerate(files, 1):
        _one_file(deid, path, path.relative_to(root), dst, result, rows)
        if progress:
            progress(done, len(files))
    _write_audit(result.audit_path, rows)
    return result


def _one_file(
    deid: Deidentifier, path: Path, rel: Path, dst: Path, result: DeidResult, rows: list[AuditRow]
) -> None:
    """De-identify one file into ``dst / rel``, or record why it is skipped or quarantined."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:  # no Part 10 header: old exports still hold a valid data set, try it
        try:
            ds = pydicom.dcmread(path, force=True)
            ds.get("SOPClassUID")
        except Exception:  # anything at all can be in a file that is not DICOM
            ds = None
    except (EOFError, OSError, ValueError) as e:
        return _skip(result, rows, rel, f"not a readable DICOM file ({type(e).__name__}: {e})")
    meta_sop = getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "") if ds is not None else ""
    sop = str(meta_sop or (ds.get("SOPClassUID", "") if ds is not None else ""))
    if sop == _DICOMDIR_SOP:
        return _skip(result, rows, rel, "DICOMDIR index (holds patient data and offsets into the originals)")
    if ds is None or not sop or "SOPInstanceUID" not in ds:
        return _skip(result, rows, rel, "not a DICOM instance (no SOP Class UID or SOP Instance UID)")
    try:
        document = encapsulated_document_reason(ds)
    except Exception as e:  # a malformed sequence deep in the file: cannot tell, so do not write it
        return _skip(result, rows, rel, f"could not be checked for documents ({type(e).__name__}: {e})")
    if document:
        return _quarantine(result, rows, rel, document, document)
    reason = burned_in_reason(ds)
    if reason and not deid.options.allow_burned_in:
        return _quarantine(result, rows, rel, reason, f"{reason} (--allow-burned-in)")
    try:
        file_rows = deid.deidentify_dataset(ds, str(rel))
        ds.preamble = _PREAMBLE  # free bytes before "DICM": a writer may have put anything there
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    except Exception as e:  # one malformed element deep in one file must not stop the batch
        return _skip(result, rows, rel, f"could not be de-identified ({type(e).__name__}: {e})")
    atomic_write_bytes(dst / rel, buf.getvalue())
    rows.extend(file_rows)
    result.written.append(rel)
    result.actions.update(r.action for r in file_rows)
    result.untouched += deid.last_untouched
    return None


def _quarantine(result: DeidResult, rows: list[AuditRow], rel: Path, reason: str, rule: str) -> None:
    result.quarantined.append((rel, reason))
    rows.append(AuditRow(str(rel), "", "", "", "quarantined", rule, "", ""))
    log.warning("%s: quarantined, not written: %s", rel, reason)


def _skip(result: DeidResult, rows: list[AuditRow], rel: Path, reason: str) -> None:
    result.skipped.append((rel, reason))
    rows.append(AuditRow(str(rel), "", "", "", "skipped", reason, "", ""))
    log.warning("%s: skipped, %s", rel, reason)


def _write_audit(path: Path, rows: list[AuditRow]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(AUDIT_COLUMNS)
        for r in rows:
            writer.writerow([getattr(r, c) for c in AUDIT_COLUMNS])


def read_audit(path: str | Path) -> list[dict[str, str]]:
    """Read an audit CSV written by :func:`deidentify`."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
