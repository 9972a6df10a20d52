"""DICOMweb client: find studies (QIDO-RS), retrieve them into a folder (WADO-RS), store results (STOW-RS).

``DicomWebClient(load_pacs_config(...))`` talks to any DICOMweb server (Orthanc, dcm4chee, Google/Azure health
APIs). Retrieved instances stream to disk part by part (a study never has to fit in memory) and land as
``OUT/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: names built by us from UIDs read from the file itself and
checked to be digits and dots, never from anything the server calls them. Each file is written to a temporary
name, checked to be DICOM of the study asked for, then renamed into place.

Errors say what happened without a secret in sight: the server is unreachable, refused the credentials (HTTP
401/403: check them), has no such study (404), or answered something that is not DICOM.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlens.serve.pacs_config import PacsAuthError, PacsConfig, PacsError, PacsNotFoundError, check_uid
from medlens.serve.pacs_files import (
    PartSink,
    StoreResult,
    batches,
    boundary_of,
    dicom_files,
    multipart_body,
    parse_multipart,
    place_instance,
)

__all__ = ["DicomWebClient", "StoreResult", "dicom_files", "json_value", "place_instance"]

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
#: What we ask WADO-RS for: whole Part-10 instances, in whatever transfer syntax they are stored (servers that
#: answer 406 to that are asked again without the transfer-syntax parameter).
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: Largest STOW-RS request body we build in memory; more files are sent in several requests.
STOW_BATCH_BYTES = 64 * 1024 * 1024

# DICOM JSON tags used here
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, SERIES_NUMBER, SERIES_DESCRIPTION = "00080060", "00200011", "0008103E"
NUM_INSTANCES = "00201209"
REFERENCED_SOP_SEQ, FAILED_SOP_SEQ = "00081199", "00081198"
REF_SOP_UID, FAILURE_REASON = "00081155", "00081197"


def json_value(item: dict[str, Any], tag: str, default: Any = None) -> Any:
    """First value of ``tag`` (8 hex digits) in a DICOM JSON object, or ``default``."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else default


# ---- the client -------------------------------------------------------------------------------------------
class DicomWebClient:
    """A DICOMweb client for one server (QIDO-RS, WADO-RS, STOW-RS).

    Args:
        config: where the server is and how to authenticate (:func:`~medlens.serve.pacs_config.load_pacs_config`).
        session: a ``requests.Session`` to use (tests pass a prepared one); one is made otherwise.
    """

    def __init__(self, config: PacsConfig, session: Any = None) -> None:
        import requests

        self.config = config
        self.url = config.require_url()
        self.session = session if session is not None else requests.Session()
        self.session.verify = config.verify
        if config.auth == "basic":
            self.session.auth = requests.auth.HTTPBasicAuth(config.username or "", config.password or "")
        elif config.auth == "bearer":
            self.session.headers["Authorization"] = f"Bearer {config.token}"

    def __repr__(self) -> str:
        return f"DicomWebClient({self.url!r}, auth={self.config.auth!r})"

    # ---- QIDO-RS ----------------------------------------------------------------------------------------
    def search_studies(self, **filters: str) -> list[dict[str, Any]]:
        """QIDO-RS ``/studies`` with attribute filters (e.g. ``StudyInstanceUID=..., PatientID=...``)."""
        return self._qido("studies", filters)

    def search_series(self, study_uid: str, **filters: str) -> list[dict[str, Any]]:
        """QIDO-RS ``/studies/{study}/series``; raises :class:`PacsNotFoundError` if the study is unknown."""
        study_uid = check_uid(study_uid, "StudyInstanceUID")
        if not self.search_studies(StudyInstanceUID=study_uid):
            raise PacsNotFoundError(f"study {study_uid} is not on the PACS at {self.url}")
        return self._qido(f"studies/{study_uid}/series", filters)

    def search_instances(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS ``/studies/{study}/series/{series}/instances``."""
        study_uid = check_uid(study_uid, "StudyInstanceUID")
        series_uid = check_uid(series_uid, "SeriesInstanceUID")
        return self._qido(f"studies/{study_uid}/series/{series_uid}/instances", {})

    def _qido(self, path: str, filters: dict[str, str]) -> list[dict[str, Any]]:
        resp = self._request("GET", path, params=filters or None, headers={"Accept": DICOM_JSON})
        if resp.status_code == 204 or not resp.content:
            return []
        try:
            data = resp.json()
        except ValueError:
            raise self._not_dicom(resp, "QIDO-RS", "DICOM JSON") from None
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise self._not_dicom(resp, "QIDO-RS", "a DICOM JSON array")
        return data

    # ---- WADO-RS ----------------------------------------------------------------------------------------
    def retrieve(
        self,
        study_uid: str,
        out_dir: str | Path,
        series_uid: str | None = None,
        *,
        max_bytes: int | None = None,
    ) -> list[Path]:
        """Retrieve a study (or one of its series) into ``out_dir/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

        ``max_bytes`` bounds the instances' total size (None: unbounded); past it the transfer stops with
        :class:`~medlens.serve.security.TooLarge`.

        Returns:
            The files written, in the order the server sent them.

        Raises:
            PacsNotFoundError: no such study or series on the server.
            PacsError: unreachable, refused, or the answer is not DICOM of the study asked for.
        """
        study_uid = check_uid(study_uid, "StudyInstanceUID")
        path = f"studies/{study_uid}"
        if series_uid is not None:
            path += f"/series/{check_uid(series_uid, 'SeriesInstanceUID')}"
        what = f"series {series_uid} of study {study_uid}" if series_uid else f"study {study_uid}"
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        resp = self._request("GET", path, headers={"Accept": WADO_ACCEPT}, stream=True, what=what, ok=(406,))
        if resp.status_code == 406:  # servers that refuse transfer-syntax=*: take their default syntax
            resp.close()
            accept = 'multipart/related; type="application/dicom"'
            resp = self._request("GET", path, headers={"Accept": accept}, stream=True, what=what)
        with resp:
            ctype = resp.headers.get("Content-Type", "")
            boundary = boundary_of(ctype)
            if boundary is None:
                raise self._not_dicom(resp, "WADO-RS", "multipart/related DICOM")
            written: list[Path] = []
            sink = PartSink(out_dir, study_uid, written, self.url, max_bytes=max_bytes)
            try:
                parse_multipart(resp.iter_content(chunk_size=1 << 16), boundary, sink.open, sink.close)
            finally:
                sink.discard()
        if not written:
            raise PacsNotFoundError(f"{what}: the PACS at {self.url} returned no instances")
        log.info("retrieved %d instance(s) of %s into %s", len(written), what, out_dir)
        return written

    # ---- STOW-RS ----------------------------------------------------------------------------------------
    def store(self, files: Sequence[str | Path], study_uid: str | None = None) -> StoreResult:
        """Send DICOM files with STOW-RS (``multipart/related; type="application/dicom"``).

        Files go in batches of at most :data:`STOW_BATCH_BYTES`. Raises :class:`PacsError` when the server
        refuses every instance; partial failures are reported in the result.
        """
        path = f"studies/{check_uid(study_uid, 'StudyInstanceUID')}" if study_uid else "studies"
        result = StoreResult(files=[Path(f) for f in files])
        for batch in batches(result.files, STOW_BATCH_BYTES):
            boundary = f"medlens-{uuid.uuid4().hex}"
            body = b"".join(multipart_body(batch, boundary))
            ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
            resp = self._request(
                "POST", path, data=body, headers={"Content-Type": ctype, "Accept": DICOM_JSON}, ok=(409,)
            )
            stored, failed = _stow_outcome(resp)
            if resp.status_code == 409 and not failed:
                failed = [("?", f"HTTP 409 for {len(batch)} file(s)")]
            result.stored += stored
            result.failed += failed
        if result.failed and not result.stored:
            reasons = "; ".join(f"{uid}: {why}" for uid, why in result.failed[:3])
            raise PacsError(f"the PACS at {self.url} refused every instance ({reasons})")
        for uid, why in result.failed:
            log.warning("the PACS refused instance %s: %s", uid, why)
        log.info("stored %d instance(s) at %s", len(result.stored), self.url)
        return result

    # ---- HTTP and its errors ----------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        what: str | None = None,
        ok: tuple[int, ...] = (),
        stream: bool = False,
        **kwargs: Any,
    ) -> Any:
        import requests

        url = f"{self.url}/{path}"
        try:
            resp = self.session.request(method, url, timeout=self.config.timeout, stream=stream, **kwargs)
        except requests.exceptions.SSLError:
            raise PacsError(
                f"TLS verification failed for {self.url} (give the CA bundle path as 'verify' in the config)"
            ) from None
        except requests.exceptions.Timeout:
            raise PacsError(
                f"the PACS at {self.url} did not answer within {self.config.timeout:g} s (raise 'timeout')"
            ) from None
        except requests.exceptions.ConnectionError as e:
            reason = self.config.redact(_short_reason(e))
            raise PacsError(
                f"cannot reach the PACS at {self.url} ({reason}); check the URL and that the server is running"
            ) from None
        if resp.status_code in (401, 403):
            resp.close()
            raise PacsAuthError(
                f"the PACS at {self.url} refused access (HTTP {resp.status_code}); check "
                f"{self.config.credential_source()}"
            )
        if resp.status_code == 404:
            resp.close()
            raise PacsNotFoundError(f"{what or path}: not found on the PACS at {self.url} (HTTP 404)")
        if resp.status_code >= 400 and resp.status_code not in ok:
            detail = self.config.redact((resp.text or "").strip().replace("\n", " ")[:200])
            resp.close()
            raise PacsError(
                f"the PACS at {self.url} answered HTTP {resp.status_code} to {method} {path}"
                + (f": {detail}" if detail else "")
            )
        return resp

    def _not_dicom(self, resp: Any, service: str, expected: str) -> PacsError:
        ctype = resp.headers.get("Content-Type", "none")
        return PacsError(
            f"the {service} answer of {self.url} is not {expected} (Content-Type {ctype!r}); "
            "is the URL the DICOMweb root (e.g. http://host:8042/dicom-web)?"
        )


def _short_reason(e: Exception) -> str:
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "timed out"):
        if marker in text:
            return marker.lower()
    return type(e).__name__


def _stow_outcome(resp: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """Accepted and refused SOPInstanceUIDs from a STOW-RS answer (PS3.18 Table 10.5.3-1)."""
    try:
        data = resp.json() if resp.content else {}
    except ValueError:
        data = {}
    if isinstance(data, list):  # some servers wrap the one response object in an array
        data = data[0] if data else {}
    if not isinstance(data, dict):
        return [], []
    stored = [
        str(json_value(item, REF_SOP_UID)) for item in (data.get(REFERENCED_SOP_SEQ) or {}).get("Value", [])
    ]
    failed = [
        (str(json_value(item, REF_SOP_UID)), f"failure reason {json_value(item, FAILURE_REASON)}")
        for item in (data.get(FAILED_SOP_SEQ) or {}).get("Value", [])
    ]
    return stored, failed
