"""A small in-process DICOMweb server on 127.0.0.1 for the PACS unit tests (QIDO-RS, WADO-RS, STOW-RS).

It keeps instances in memory, checks basic or bearer authentication, and can misbehave on request
(``server.mode``): answer HTML, cut a multipart answer short, refuse ``transfer-syntax=*`` (406), send an instance of another study or one whose
UIDs try to climb out of the output folder, or echo the Authorization header in an error body.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydicom import dcmread


class FakePacs:
    """State of the fake server: instances by SOPInstanceUID (raw bytes + UIDs), credentials, misbehaviour."""

    def __init__(self, user: str = "alice", password: str = "pw-5ecret!", token: str | None = None) -> None:
        self.user, self.password, self.token = user, password, token
        self.instances: dict[str, tuple[bytes, str, str]] = {}  # sop -> (bytes, study, series)
        self.mode = "normal"
        self.url = ""
        self.requests: list[str] = []

    def add(self, data: bytes) -> str:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
        self.instances[str(ds.SOPInstanceUID)] = (data, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        return str(ds.SOPInstanceUID)

    def authorised(self, header: str | None) -> bool:
        if self.token is not None:
            return header == f"Bearer {self.token}"
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return header == f"Basic {expected}"


def _tag(tag: str, vr: str, value: Any) -> dict[str, Any]:
    return {tag: {"vr": vr, "Value": [value]}}


class _Handler(BaseHTTPRequestHandler):
    pacs: FakePacs

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, code: int = 200) -> None:
        self._send(code, json.dumps(obj).encode(), "application/dicom+json")

    def _check(self) -> bool:
        self.pacs.requests.append(f"{self.command} {self.path}")
        auth = self.headers.get("Authorization")
        if self.pacs.mode == "echo-auth-500":
            self._send(500, f"internal error handling {auth} for {self.pacs.password}".encode(), "text/plain")
            return False
        if not self.pacs.authorised(auth):
            self._send(401, b"unauthorised", "text/plain")
            return False
        if self.pacs.mode == "html":
            self._send(200, b"<html>login page</html>", "text/html")
            return False
        return True

    def do_GET(self) -> None:
        if not self._check():
            return
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p][1:]  # drop "dicom-web"
        query = parse_qs(url.query)
        inst = self.pacs.instances
        if parts == ["studies"]:
            wanted = query.get("StudyInstanceUID", [None])[0]
            studies = sorted({st for _, st, _ in inst.values() if wanted in (None, st)})
            self._json([_tag("0020000D", "UI", s) for s in studies])
        elif len(parts) == 3 and parts[0] == "studies" and parts[2] == "series":
            series = sorted({(se, st) for _, st, se in inst.values() if st == parts[1]})
            rows = []
            for se, st in series:
                n = sum(1 for _, s2, se2 in inst.values() if se2 == se)
                rows.append(
                    _tag("0020000D", "UI", st) | _tag("0020000E", "UI", se) | _tag("00201209", "IS", n)
                )
            self._json(rows)
        elif parts[:1] == ["studies"] and len(parts) in (2, 4):
            series = parts[3] if len(parts) == 4 else None
            chosen = [d for d, st, se in inst.values() if st == parts[1] and series in (None, se)]
            if not chosen:
                self._send(404, b"not found", "text/plain")
                return
            if self.pacs.mode == "no-any-syntax" and "transfer-syntax=*" in self.headers.get("Accept", ""):
                self._send(406, b"transfer-syntax=* not supported", "text/plain")
                return
            self._multipart(chosen)
        else:
            self._send(404, b"unknown path", "text/plain")

    def _multipart(self, files: list[bytes]) -> None:
        boundary = "fake-0123456789"
        body = BytesIO()
        body.write(b"preamble to ignore\r\n")
        for data in files:
            body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            body.write(data)
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        raw = body.getvalue()
        if self.pacs.mode == "truncated":
            raw = raw[: len(raw) - len(files[-1]) // 2]
        self._send(200, raw, f'multipart/related; type="application/dicom"; boundary="{boundary}"')

    def do_POST(self) -> None:
        if not self._check():
            return
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        head = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
        msg = BytesParser(policy=HTTP).parsebytes(head + body)
        if msg.get_content_type() != "multipart/related" or msg.get_param("type") != "application/dicom":
            self._send(415, b"unsupported media type", "text/plain")
            return
        stored = []
        for part in msg.iter_parts():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            stored.append(self.pacs.add(payload))
        seq = [_tag("00081155", "UI", sop) for sop in stored]
        self._json({"00081199": {"vr": "SQ", "Value": seq}})


@contextmanager
def fake_pacs(pacs: FakePacs | None = None) -> Iterator[FakePacs]:
    """Serve ``pacs`` on 127.0.0.1 (a free port) for the duration of the block; ``pacs.url`` is its root."""
    pacs = pacs or FakePacs()
    handler = type("Handler", (_Handler,), {"pacs": pacs})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    pacs.url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        yield pacs
    finally:
        server.shutdown()
        server.server_close()
