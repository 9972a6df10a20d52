"""The service's defences: tokens, viewer tickets, bounded uploads and safe zip extraction.

Rules this module enforces, so the routes cannot forget them:

- **Authentication.** Every route but ``/health`` needs ``Authorization: Bearer <token>``, compared in constant
  time. ``--no-auth`` is accepted only when the server listens on a loopback address.
- **No client path is a file path.** Uploads are written under names the server makes (``upload.bin``,
  ``dicom/00000.dcm`` ...); zip member names are read only to skip folders, never joined to a path (no zip-slip).
- **Bounded input.** An upload is streamed to disk and stopped at ``max_bytes`` (:class:`TooLarge`, HTTP 413); a
  zip is refused when its declared sizes exceed the unpacked limit, and extraction counts the bytes actually
  inflated, so a lying header (a zip bomb) is stopped at the limit too.
- **Viewer tickets.** A browser cannot send a Bearer header when it opens a link, so the viewer is opened with a
  short-lived, single-use ticket signed by the server (HMAC-SHA256, bound to one job), which is exchanged for an
  HttpOnly, SameSite=Lax cookie valid for that job's viewer only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from medlens.errors import InputError

CHUNK = 1 << 20


class TooLarge(InputError):
    """An upload or its unpacked content is larger than the server accepts (HTTP 413)."""


class BadUpload(InputError):
    """An upload is malformed: not multipart as declared, no file part, a broken zip (HTTP 400)."""


def new_token() -> str:
    """A fresh random API token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_matches(given: str | None, expected: str) -> bool:
    """Whether ``given`` equals ``expected``, compared in constant time."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or 'localhost') is a loopback address only reachable from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Tickets:
    """Signed, job-bound, expiring tokens for the viewer: a single-use ticket (URL) and a session (cookie).

    Args:
        ticket_seconds: how long a ticket (put in a URL) may wait before it is redeemed.
        session_seconds: how long the cookie it is exchanged for stays valid.
    """

    def __init__(self, ticket_seconds: float = 120.0, session_seconds: float = 3600.0) -> None:
        self._key = secrets.token_bytes(32)  # per process: restarting the server invalidates every ticket
        self.ticket_seconds = ticket_seconds
        self.session_seconds = session_seconds
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()

    def _sign(self, kind: str, job_id: str, expires: int, nonce: str) -> str:
        msg = f"{kind}|{job_id}|{expires}|{nonce}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def _make(self, kind: str, job_id: str, seconds: float) -> str:
        expires = int(time.time() + seconds)
        nonce = secrets.token_hex(8)
        return f"{expires}.{nonce}.{self._sign(kind, job_id, expires, nonce)}"

    def _check(self, kind: str, job_id: str, value: str | None) -> bool:
        if not value or value.count(".") != 2:
            return False
        expires_s, nonce, sig = value.split(".")
        if not expires_s.isdigit() or int(expires_s) < time.time():
            return False
        return hmac.compare_digest(sig, self._sign(kind, job_id, int(expires_s), nonce))

    def ticket(self, job_id: str) -> str:
        """A single-use ticket that opens ``job_id``'s viewer for :attr:`ticket_seconds`."""
        return self._make("ticket", job_id, self.ticket_seconds)

    def redeem(self, job_id: str, ticket: str | None) -> bool:
        """Check a ticket and mark it used (a second use, e.g. a replay from a log, fails)."""
        if not self._check("ticket", job_id, ticket):
            return False
        now = time.time()
        with self._lock:
            self._used = {k: v for k, v in self._used.items() if v > now}  # forget expired ones
            assert ticket is not None  # _check returned True
            if ticket in self._used:
                return False
            self._used[ticket] = now + self.ticket_seconds + 1
        return True

    def session(self, job_id: str) -> str:
        """The cookie value a redeemed ticket is exchanged for."""
        return self._make("session", job_id, self.session_seconds)

    def session_ok(self, job_id: str, value: str | None) -> bool:
        """Whether a viewer cookie is valid for ``job_id``."""
        return self._check("session", job_id, value)


# ---- bounded uploads -------------------------------------------------------------------------------------------
def check_declared_length(content_length: str | None, max_bytes: int) -> None:
    """Refuse at once a request whose Content-Length already says it is too large."""
    if content_length and content_length.isdigit() and int(content_length) > max_bytes:
        raise TooLarge(f"upload of {int(content_length)} bytes exceeds the limit of {_mb(max_bytes)}")


async def save_body(stream: AsyncIterator[bytes], dest: Path, max_bytes: int) -> int:
    """Write a raw request body to ``dest``, stopping with :class:`TooLarge` once it passes ``max_bytes``."""
    total = 0
    with open(dest, "wb") as fh:
        async for chunk in stream:
            total += len(chunk)
            if total > max_bytes:
                raise TooLarge(f"upload exceeds the limit of {_mb(max_bytes)}")
            fh.write(chunk)
    return total


async def save_multipart_file(
    stream: AsyncIterator[bytes], content_type: str, dest: Path, max_bytes: int, field: str = "file"
) -> int:
    """Stream the ``field`` part of a multipart/form-data body to ``dest`` (its client file name is ignored).

    The whole body counts towards ``max_bytes``: the limit cannot be dodged with large extra fields.

    Returns:
        The bytes of the file part.
    """
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadUpload("multipart/form-data without a boundary")
    part = _Part(field.encode(), open(dest, "wb"))  # noqa: SIM115 - closed in finally
    parser = MultipartParser(
        boundary,
        {
            "on_header_field": part.on_header_field,
            "on_header_value": part.on_header_value,
            "on_header_end": part.on_header_end,
            "on_headers_finished": part.on_headers_finished,
            "on_part_data": part.on_part_data,
        },
    )
    total = 0
    try:
        async for chunk in stream:
            total += len(chunk)
            if total > max_bytes:
                raise TooLarge(f"upload exceeds the limit of {_mb(max_bytes)}")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadUpload(f"malformed multipart body ({exc})") from None
    finally:
        part.out.close()
    if not part.seen:
        raise BadUpload(f"multipart body has no {field!r} part (send the image as form field {field!r})")
    return part.written


class _Part:
    """Multipart parser callbacks: write the data of the first part named ``field`` to ``out``."""

    def __init__(self, field: bytes, out: BinaryIO) -> None:
        self.field, self.out = field, out
        self.header, self.value, self.disposition = b"", b"", b""
        self.mine = self.seen = False
        self.written = 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        self.header, self.value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, opts = parse_options_header(self.disposition)
        self.mine = opts.get(b"name") == self.field and not self.seen
        self.seen = self.seen or self.mine
        self.disposition = b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.mine:
            self.out.write(data[start:end])
            self.written += end - start


# ---- zips ---------------------------------------------------------------------------------------------------------
def extract_zip(
    archive: Path, dest: Path, max_unpacked_bytes: int, max_members: int = 20000, suffix: str = ".dcm"
) -> list[Path]:
    """Extract the files of a zip under generated names ``dest/00000.dcm``...; member names are never used.

    Declared sizes are checked before anything is written, and the inflated bytes are counted while
    extracting (a header can lie), so a zip bomb stops at ``max_unpacked_bytes``.

    Raises:
        BadUpload: not a zip, encrypted, or too many members.
        TooLarge: the declared or actual unpacked size passes the limit.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadUpload(f"the upload is not a readable zip ({exc})") from None
    written: list[Path] = []
    with zf:
        if any(m.flag_bits & 0x1 for m in zf.infolist()):
            raise BadUpload("the zip is encrypted; upload an unencrypted zip")
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > max_members:
            raise BadUpload(f"the zip has {len(members)} files; at most {max_members} are accepted")
        declared = sum(m.file_size for m in members)
        if declared > max_unpacked_bytes:
            raise TooLarge(
                f"the zip unpacks to {declared} bytes, more than the limit of {_mb(max_unpacked_bytes)}"
            )
        dest.mkdir(parents=True, exist_ok=True)
        total = 0
        for n, member in enumerate(members):
            target = dest / f"{n:05d}{suffix}"  # a generated name: the member's own name is never a path
            try:
                with zf.open(member) as src, open(target, "wb") as out:
                    while chunk := src.read(CHUNK):
                        total += len(chunk)
                        if total > max_unpacked_bytes:
                            raise TooLarge(
                                f"the zip unpacks to more than the limit of {_mb(max_unpacked_bytes)}"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, EOFError, NotImplementedError) as exc:
                raise BadUpload(f"zip member {n} cannot be extracted ({exc})") from None
            written.append(target)
    return written


def gunzip(archive: Path, dest: Path, max_unpacked_bytes: int) -> int:
    """Inflate a gzip file (e.g. an uploaded ``.nii.gz``) to ``dest``, stopping at ``max_unpacked_bytes``.

    A gzip header cannot be trusted for the size (it stores it modulo 4 GiB), so the inflated bytes are counted.
    """
    import gzip
    import zlib

    total = 0
    try:
        with gzip.open(archive, "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(CHUNK):
                total += len(chunk)
                if total > max_unpacked_bytes:
                    raise TooLarge(f"the upload inflates to more than the limit of {_mb(max_unpacked_bytes)}")
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise BadUpload(f"the upload is not a readable gzip file ({exc})") from None
    return total


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"
