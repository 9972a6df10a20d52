"""DICOM instances in and out of the PACS clients: multipart/related bodies, safe file placement, Part-10 files.

Shared by the DICOMweb (:mod:`medlens.serve.pacs`) and DIMSE (:mod:`medlens.serve.dimse`) clients:

- :func:`parse_multipart` streams a WADO-RS ``multipart/related`` answer part by part (RFC 2046; a boundary
  may straddle chunks; no part is held in memory); :func:`multipart_body` builds a STOW-RS body.
- :class:`PartSink` (DICOMweb) and :class:`ByteBudget` (shared with the DIMSE receiver) stop a retrieval with
  :class:`~medlens.serve.security.TooLarge` once the bytes received pass a budget: a PACS answer is as
  untrusted as an upload.
- :func:`place_instance` is the only way a received instance reaches its final name:
  ``OUT/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` from UIDs read from the file and checked to be digits and
  dots. Nothing a server sends (a file name, a Content-Location, a UID with ``../``) becomes a path.
- :func:`dicom_files` collects the Part-10 files to send.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, TypeVar

from medlens.errors import InputError
from medlens.serve.pacs_config import PacsError, is_uid
from medlens.serve.security import TooLarge

log = logging.getLogger(__name__)


@dataclass
class StoreResult:
    """What a PACS accepted from a store (STOW-RS or C-STORE).

    Attributes:
        stored: SOPInstanceUIDs the server accepted.
        failed: ``(SOPInstanceUID, reason)`` of instances it refused.
        files: the files that were sent.
    """

    stored: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


class PartWriter(Protocol):
    """Where a part's body goes: anything with ``write(bytes)`` (a file, a BytesIO, a counting wrapper)."""

    def write(self, data: bytes, /) -> object: ...


W = TypeVar("W", bound=PartWriter)


class ByteBudget:
    """Counts the bytes a retrieval received and raises :class:`TooLarge` once they pass ``max_bytes``.

    Args:
        max_bytes: the budget (None: unbounded).
        sender: who sends, for the message (e.g. ``"the PACS at https://..."``).
    """

    def __init__(self, max_bytes: int | None, sender: str) -> None:
        self.max_bytes, self.sender, self.received = max_bytes, sender, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Count ``n`` more bytes.

        Raises:
            TooLarge: the total passes the budget.
        """
        with self._lock:
            self.received += n
            over = self.max_bytes is not None and self.received > self.max_bytes
        if over:
            raise TooLarge(
                f"{self.sender} sent more than the limit of {(self.max_bytes or 0) / 2**20:g} MB for one job; "
                "retrieve a smaller series or raise the server's unpacked-size limit"
            )


# ---- multipart/related --------------------------------------------------------------------------------------
def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/related`` Content-Type, or None for anything else."""
    from email.message import Message

    msg = Message()
    msg["Content-Type"] = content_type
    if msg.get_content_type() != "multipart/related":
        return None
    b = msg.get_param("boundary")
    return b.encode("latin-1") if isinstance(b, str) and 0 < len(b) <= 200 else None


def parse_multipart(
    chunks: Iterable[bytes],
    boundary: bytes,
    open_part: Callable[[dict[str, str]], W],
    close_part: Callable[[W], None],
    max_header_bytes: int = 16384,
) -> int:
    """Stream a ``multipart/related`` body (RFC 2046) part by part, without holding a part in memory.

    Args:
        chunks: the body, in chunks of any size (a boundary may be split across chunks).
        boundary: the boundary from the Content-Type.
        open_part: called with a part's headers (lower-case names); returns where its body goes.
        close_part: called with that file once the part is complete.
        max_header_bytes: longest part header block accepted.

    Returns:
        The number of parts.

    Raises:
        PacsError: the body is malformed or ends before its closing boundary.
    """
    delim = b"--" + boundary
    body_delim = b"\r\n" + delim
    buf = b""
    state = "preamble"
    sink: W | None = None
    parts = 0
    for chunk in _with_end(chunks):
        at_end = chunk is None
        buf += chunk or b""
        while True:
            if state == "preamble":
                i = 0 if buf.startswith(delim) else buf.find(body_delim)
                if i < 0:
                    buf = buf[-len(body_delim) :]
                    break
                buf = buf[i + (0 if i == 0 and buf.startswith(delim) else 2) + len(delim) :]
                state = "delimiter"
            if state == "delimiter":
                if buf.startswith(b"--"):
                    return parts
                j = buf.find(b"\r\n")
                if j < 0:
                    if len(buf) > 1024:
                        raise PacsError("malformed multipart answer: no line end after a boundary")
                    break
                buf = buf[j + 2 :]
                state = "headers"
            if state == "headers":
                if buf.startswith(b"\r\n"):
                    head, buf = b"", buf[2:]
                else:
                    j = buf.find(b"\r\n\r\n")
                    if j < 0:
                        if len(buf) > max_header_bytes:
                            raise PacsError("malformed multipart answer: part headers too long")
                        break
                    head, buf = buf[:j], buf[j + 4 :]
                sink = open_part(_part_headers(head))
                state = "body"
            if state == "body":
                assert sink is not None
                j = buf.find(body_delim)
                if j >= 0:
                    sink.write(buf[:j])
                    close_part(sink)
                    sink = None
                    parts += 1
                    buf = buf[j + len(body_delim) :]
                    state = "delimiter"
                    continue
                keep = len(body_delim) - 1
                if len(buf) > keep:
                    sink.write(buf[:-keep])
                    buf = buf[-keep:]
                break
        if at_end:
            break
    raise PacsError(f"the multipart answer ended early ({parts} complete part(s)); the transfer was cut")


def _with_end(chunks: Iterable[bytes]) -> Iterator[bytes | None]:
    yield from chunks
    yield None


def _part_headers(head: bytes) -> dict[str, str]:
    headers = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


class _PartFile:
    """A part's temporary file whose writes are counted against the retrieval's budget first."""

    def __init__(self, fh: IO[bytes], path: Path, budget: ByteBudget) -> None:
        self.fh, self.path, self.budget = fh, path, budget

    def write(self, data: bytes, /) -> int:
        self.budget.take(len(data))
        return self.fh.write(data)


class PartSink:
    """Writes each WADO-RS part to a temporary file, then checks it and renames it to its UID name.

    Args:
        out_dir: where instances land (``out_dir/<series>/<sop>.dcm``).
        study_uid: the study asked for (instances of another study are refused).
        written: the list the final paths are appended to.
        url: the server, for messages.
        max_bytes: budget for all parts together; past it :class:`TooLarge` stops the transfer (None: none).
    """

    def __init__(
        self, out_dir: Path, study_uid: str, written: list[Path], url: str, max_bytes: int | None = None
    ) -> None:
        self.out_dir, self.study_uid, self.written, self.url = out_dir, study_uid, written, url
        self.budget = ByteBudget(max_bytes, f"the PACS at {url}")
        self.open_files: list[_PartFile] = []

    def open(self, headers: dict[str, str]) -> _PartFile:
        ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if ctype != "application/dicom":
            raise PacsError(f"the PACS at {self.url} sent a {ctype!r} part where DICOM was expected")
        fd, name = tempfile.mkstemp(prefix=".wado-", suffix=".part", dir=self.out_dir)
        part = _PartFile(os.fdopen(fd, "wb"), Path(name), self.budget)
        self.open_files.append(part)
        return part

    def close(self, part: _PartFile) -> None:
        fh, tmp = part.fh, part.path
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        self.open_files = [f for f in self.open_files if f is not part]
        try:
            self.written.append(place_instance(tmp, self.out_dir, self.study_uid, f"the PACS at {self.url}"))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        for part in self.open_files:
            part.fh.close()
            part.path.unlink(missing_ok=True)
        self.open_files = []


def place_instance(tmp: Path, out_dir: Path, study_uid: str | None, sender: str) -> Path:
    """Check that ``tmp`` is a DICOM instance (of ``study_uid``) and move it to ``out_dir/<series>/<sop>.dcm``.

    The name comes from UIDs read from the file and validated as digits and dots: whatever a server sends,
    it cannot choose where a file lands.

    Raises:
        PacsError: not DICOM, invalid UIDs, or an instance of another study.
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(
            tmp,
            stop_before_pixels=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
    except (InvalidDicomError, OSError, ValueError, EOFError):
        raise PacsError(f"{sender} sent an instance that is not a DICOM file") from None
    study, series, sop = (
        str(ds.get(k, "")).strip() for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    if not (is_uid(series) and is_uid(sop) and is_uid(study)):
        raise PacsError(f"{sender} sent an instance whose UIDs are not valid DICOM UIDs; refusing it")
    if study_uid is not None and study != study_uid:
        raise PacsError(f"{sender} sent an instance of study {study} when study {study_uid} was asked for")
    final = out_dir / series / f"{sop}.dcm"
    final.parent.mkdir(parents=True, exist_ok=True)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp made it 0600
    os.replace(tmp, final)
    return final


def dicom_files(paths: Sequence[str | Path]) -> list[Path]:
    """The DICOM Part-10 files among ``paths`` (folders searched recursively; other files there are skipped).

    Raises:
        InputError: a path does not exist, a file named explicitly is not DICOM, or nothing DICOM was found.
    """
    from medlens.io._dicom import has_dicm_preamble

    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
        if p.is_file():
            if not has_dicm_preamble(p):
                raise InputError(
                    f"{p}: not a DICOM file (no DICM preamble); only Part-10 files can be stored"
                )
            found.append(p)
            continue
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            if has_dicm_preamble(f):
                found.append(f)
            else:
                log.debug("skipping %s: not a DICOM file", f)
    if not found:
        raise InputError(f"no DICOM files in {', '.join(map(str, paths))}")
    return found


def batches(files: list[Path], limit: int) -> Iterator[list[Path]]:
    batch: list[Path] = []
    size = 0
    for f in files:
        n = f.stat().st_size
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += n
    if batch:
        yield batch


def multipart_body(files: list[Path], boundary: str) -> Iterator[bytes]:
    for f in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        yield f.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")
