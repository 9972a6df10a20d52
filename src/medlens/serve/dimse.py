"""Classic DICOM networking with pynetdicom, for PACS without DICOMweb: C-ECHO, C-FIND, C-STORE, C-GET, C-MOVE.

``DimseClient(config)`` uses the ``[dimse]`` settings of a :class:`~medlens.serve.pacs_config.PacsConfig`
(host, port, the PACS' AE title, ours). Retrieval is C-GET by default (the instances come back on the same
association, so the PACS need not know our address); ``retrieve = "move"`` uses C-MOVE to a storage SCP we
run on ``move_port`` for the duration of the request (the PACS must know our AE title and that port). That SCP
listens only on the local address facing the PACS (loopback for a PACS on this machine), accepts only the PACS'
AE title as calling AE and closes connections from any other address than the PACS' ``host`` before they can
associate. Received instances are checked and named like DICOMweb ones:
``OUT/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` from validated UIDs
(:func:`~medlens.serve.pacs_files.place_instance`), and their total size is bounded when a budget is given.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medlens.errors import InputError
from medlens.serve.pacs_config import (
    PacsAuthError,
    PacsConfig,
    PacsError,
    PacsNotFoundError,
    check_uid,
)
from medlens.serve.pacs_files import ByteBudget, StoreResult, place_instance
from medlens.serve.security import TooLarge

log = logging.getLogger(__name__)

#: Storage SOP classes we accept on C-GET when the PACS does not tell us which classes a study holds.
DEFAULT_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX
)
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit, implicit VR little endian
_OK_STORE = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the storage warnings (stored anyway)
_STUDY_KEYS = (
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyDescription",
    "AccessionNumber",
    "ModalitiesInStudy",
)
_SERIES_KEYS = ("Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances")


class DimseClient:
    """A DIMSE service user for one PACS.

    Args:
        config: PACS settings; ``host``, ``port``, ``called_aet``, ``calling_aet``, ``retrieve``, ``move_port``
            and ``dimse_timeout`` are used.
    """

    def __init__(self, config: PacsConfig) -> None:
        self.config = config
        self.host = config.require_host()
        if not log.isEnabledFor(
            logging.DEBUG
        ):  # pynetdicom logs every PDU at INFO; our errors say what failed
            logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        self.where = f"{config.called_aet}@{self.host}:{config.port}"

    def __repr__(self) -> str:
        return f"DimseClient({self.where!r}, calling_aet={self.config.calling_aet!r})"

    # ---- association ----------------------------------------------------------------------------------------
    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.config.calling_aet)
        t = self.config.dimse_timeout
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
        return ae

    @contextmanager
    def _association(self, ae: Any, **kwargs: Any) -> Iterator[Any]:
        assoc = ae.associate(self.host, self.config.port, ae_title=self.config.called_aet, **kwargs)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise PacsAuthError(
                    f"the PACS {self.where} rejected the association; check that it knows our AE title "
                    f"{self.config.calling_aet!r} and that 'called_aet' is its AE title"
                )
            raise PacsError(
                f"cannot reach the PACS {self.where} (no association: unreachable, refused or timed out); "
                "check 'host' and 'port' and that the server is running"
            )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    # ---- C-ECHO -----------------------------------------------------------------------------------------
    def echo(self) -> None:
        """C-ECHO: raise :class:`PacsError` unless the PACS answers with success."""
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = self._ae()
        ae.add_requested_context(Verification)
        with self._association(ae) as assoc:
            status = assoc.send_c_echo()
        _check_status(status, f"C-ECHO to {self.where}")

    # ---- C-FIND -----------------------------------------------------------------------------------------
    def find(self, level: str, **keys: str) -> list[Any]:
        """C-FIND (study root) at ``level`` ("STUDY", "SERIES" or "IMAGE"); ``keys`` are matching keys.

        Returns the identifiers (pydicom Datasets) the PACS matched; the usual return keys of the level are
        requested too (patient and study description, modality, series number...).
        """
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

        level = level.upper()
        query = Dataset()
        query.QueryRetrieveLevel = level
        query.StudyInstanceUID = ""
        wanted: tuple[str, ...] = _STUDY_KEYS
        if level in ("SERIES", "IMAGE"):
            query.SeriesInstanceUID = ""
            wanted = _SERIES_KEYS
        if level == "IMAGE":
            query.SOPInstanceUID = ""
            wanted = ("SOPClassUID", "InstanceNumber")
        for key in wanted:
            setattr(query, key, "")
        for key, value in keys.items():
            setattr(query, key, value)
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        found = []
        with self._association(ae) as assoc:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = _check_status(status, f"C-FIND at {self.where}")
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    found.append(identifier)
        return found

    def find_series(self, study_uid: str) -> list[Any]:
        """The series of a study (C-FIND at SERIES level); :class:`PacsNotFoundError` if it has none."""
        study_uid = check_uid(study_uid, "StudyInstanceUID")
        series = self.find("SERIES", StudyInstanceUID=study_uid)
        if not series:
            raise PacsNotFoundError(f"study {study_uid} is not on the PACS {self.where}")
        return series

    # ---- C-STORE ----------------------------------------------------------------------------------------
    def store(self, files: Sequence[str | Path]) -> StoreResult:
        """C-STORE each file; raises :class:`PacsError` when every instance is refused."""
        from pydicom import dcmread

        paths = [Path(f) for f in files]
        result = StoreResult(files=paths)
        headers = [dcmread(p, stop_before_pixels=True) for p in paths]
        contexts: dict[str, set[str]] = {}
        for path, ds in zip(paths, headers, strict=True):
            if (
                "SOPClassUID" not in ds
                or "SOPInstanceUID" not in ds
                or "TransferSyntaxUID" not in ds.file_meta
            ):
                raise InputError(
                    f"{path}: not a storable DICOM instance (no SOPClassUID, SOPInstanceUID or transfer syntax)"
                )
            ts = str(ds.file_meta.TransferSyntaxUID)
            contexts.setdefault(str(ds.SOPClassUID), set()).update(
                _UNCOMPRESSED if ts in _UNCOMPRESSED else (ts,)
            )
        if len(contexts) > 127:
            raise PacsError(f"{len(contexts)} SOP classes in one store: send them in smaller groups")
        ae = self._ae()
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, sorted(syntaxes))
        with self._association(ae) as assoc:
            for path, head in zip(paths, headers, strict=True):
                sop = str(head.SOPInstanceUID)
                status = assoc.send_c_store(dcmread(path))  # pynetdicom re-encodes to the accepted syntax
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in _OK_STORE:
                    result.stored.append(sop)
                else:
                    why = "no answer" if code < 0 else f"status 0x{code:04X}"
                    result.failed.append((sop, why))
                    log.warning("the PACS %s refused %s: %s", self.where, path.name, why)
        if result.failed and not result.stored:
            raise PacsError(f"the PACS {self.where} refused every instance ({result.failed[0][1]})")
        log.info("stored %d instance(s) at %s", len(result.stored), self.where)
        return result

    # ---- C-GET / C-MOVE ---------------------------------------------------------------------------------
    def retrieve(
        self,
        study_uid: str,
        out_dir: str | Path,
        series_uid: str | None = None,
        *,
        max_bytes: int | None = None,
    ) -> list[Path]:
        """Retrieve a study (or one series) into ``out_dir/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

        Uses C-GET or C-MOVE as configured (``retrieve``). ``max_bytes`` bounds the received instances' total
        size (None: unbounded): past it every further instance is refused and :class:`TooLarge` is raised.
        """
        study_uid = check_uid(study_uid, "StudyInstanceUID")
        if series_uid is not None:
            series_uid = check_uid(series_uid, "SeriesInstanceUID")
        keys = {"StudyInstanceUID": study_uid} | ({"SeriesInstanceUID": series_uid} if series_uid else {})
        instances = self.find("IMAGE", **keys)
        what = f"series {series_uid} of study {study_uid}" if series_uid else f"study {study_uid}"
        if not instances:
            raise PacsNotFoundError(f"{what} is not on the PACS {self.where}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        receiver = _Receiver(out_dir, study_uid, f"the PACS {self.where}", max_bytes)
        query = _retrieve_query(study_uid, series_uid)
        try:
            if self.config.retrieve == "move":
                self._move(query, receiver)
            else:
                classes = {str(i.get("SOPClassUID", "")) for i in instances} - {""}
                self._get(query, receiver, sorted(classes) or list(DEFAULT_STORAGE_CLASSES))
        except PacsError:
            receiver.raise_errors()  # when we refused what was sent, that is the cause to report
            raise
        receiver.raise_errors()
        if not receiver.written:
            raise PacsError(f"{what}: the PACS {self.where} sent no instances")
        if len(receiver.written) < len(instances):
            log.warning("received %d of %d instance(s) of %s", len(receiver.written), len(instances), what)
        log.info("retrieved %d instance(s) of %s into %s", len(receiver.written), what, out_dir)
        return receiver.written

    def _get(self, query: Any, receiver: _Receiver, classes: list[str]) -> None:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in classes[:127]:
            ae.add_requested_context(sop_class, list(_UNCOMPRESSED))
        roles = [build_role(c, scp_role=True) for c in classes[:127]]
        handlers = [(evt.EVT_C_STORE, receiver.handle)]
        with self._association(ae, ext_neg=roles, evt_handlers=handlers) as assoc:
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                _check_status(status, f"C-GET at {self.where}")

    @contextmanager
    def storage_scp(self, on_store: Callable[[Any], int]) -> Iterator[Any]:
        """Run the storage SCP that receives C-MOVE sub-operations on ``move_port`` for the block's duration.

        It listens on the local address facing the PACS (loopback when the PACS is on this machine), requires the
        PACS' AE title (``called_aet``) as calling AE title, and closes connections from any address the PACS'
        ``host`` does not resolve to before they can associate.

        Args:
            on_store: the ``EVT_C_STORE`` handler (returns the C-STORE status).

        Raises:
            PacsError: the PACS host does not resolve, or the port cannot be opened.
        """
        from pynetdicom import AllStoragePresentationContexts, evt

        peers = _addresses(self.host, self.config.port)
        bind = _address_facing(self.host, self.config.port)
        scp_ae = self._ae()
        scp_ae.supported_contexts = AllStoragePresentationContexts
        scp_ae.require_calling_aet = [self.config.called_aet]
        try:
            server = scp_ae.make_server(
                (bind, self.config.move_port),
                evt_handlers=[(evt.EVT_C_STORE, on_store)],
                server_class=_peer_filtered_server(),
            )
        except OSError as e:
            raise PacsError(
                f"cannot listen on {bind}:{self.config.move_port} for C-MOVE ({e.strerror}); set 'move_port' "
                'or use retrieve = "get"'
            ) from None
        server.allowed_peers = peers
        scp_ae._servers.append(server)  # as AE.start_server does: the server's shutdown() removes it
        threading.Thread(target=server.serve_forever, name="medlens-move-scp", daemon=True).start()
        try:
            yield server
        finally:
            server.shutdown()

    def _move(self, query: Any, receiver: _Receiver) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

        with self.storage_scp(receiver.handle):
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            with self._association(ae) as assoc:
                for status, _ in assoc.send_c_move(
                    query, self.config.calling_aet, StudyRootQueryRetrieveInformationModelMove
                ):
                    code = _check_status(status, f"C-MOVE at {self.where}")
                    if code == 0xA801:
                        raise PacsError(
                            f"the PACS {self.where} does not know the move destination "
                            f"{self.config.calling_aet!r}; register it there with port {self.config.move_port}"
                        )


def _ip(text: str) -> str:
    """An address in one spelling: no IPv6 scope, IPv4-mapped IPv6 as plain IPv4."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _addresses(host: str, port: int) -> frozenset[str]:
    """Every address ``host`` resolves to (the peers the C-MOVE SCP accepts)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise PacsError(f"cannot resolve the PACS host {host!r} ({e})") from None
    return frozenset(_ip(str(info[4][0])) for info in infos)


def _address_facing(host: str, port: int) -> str:
    """The local address the PACS at ``host`` is reached through: loopback for a local PACS, else the address of
    the interface the route to ``host`` leaves by; ``""`` (all interfaces) only when no route can be found."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise PacsError(f"cannot resolve the PACS host {host!r} ({e})") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first: "localhost" -> 127.0.0.1
    family, _, _, _, sockaddr = infos[0]
    if ipaddress.ip_address(_ip(str(sockaddr[0]))).is_loopback:
        return str(sockaddr[0])
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)  # a UDP connect sends nothing: the kernel only picks the route
            return str(probe.getsockname()[0])
    except OSError:
        log.warning("no route to the PACS host %s; the C-MOVE SCP listens on all interfaces", host)
        return ""


@functools.cache
def _peer_filtered_server() -> type:
    """pynetdicom's threaded association server, closing connections from addresses not in ``allowed_peers``."""
    from pynetdicom.transport import ThreadedAssociationServer

    class PeerFilteredServer(ThreadedAssociationServer):
        allowed_peers: frozenset[str] = frozenset()

        def verify_request(self, request: Any, client_address: Any) -> bool:
            host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
            try:
                allowed = _ip(str(host)) in self.allowed_peers
            except ValueError:
                allowed = False
            if not allowed:
                log.warning("refused a C-MOVE connection from %s: it is not the PACS' host", host)
            return allowed

    return PeerFilteredServer


def _retrieve_query(study_uid: str, series_uid: str | None) -> Any:
    from pydicom.dataset import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    query.StudyInstanceUID = study_uid  # C-MOVE at SERIES level still needs the study (Orthanc does)
    if series_uid:
        query.SeriesInstanceUID = series_uid
    return query


def _check_status(status: Any, what: str) -> int:
    """The status code of a DIMSE response; :class:`PacsError` for a failure or no answer."""
    if not status or "Status" not in status:
        raise PacsError(f"{what}: no answer (the association was aborted or timed out)")
    code = int(status.Status)
    if code == 0xA801:  # move destination unknown: the caller explains
        return code
    if code >= 0xA000 and code not in (0xB000, 0xFE00) and not 0xFF00 <= code <= 0xFF01:
        comment = str(status.get("ErrorComment", "")).strip()
        raise PacsError(f"{what} failed with status 0x{code:04X}" + (f" ({comment})" if comment else ""))
    return code


class _Receiver:
    """Storage SCP handler: writes each received instance via a temporary file into its UID-named place."""

    def __init__(self, out_dir: Path, study_uid: str, sender: str, max_bytes: int | None = None) -> None:
        self.out_dir, self.study_uid, self.sender = out_dir, study_uid, sender
        self.budget = ByteBudget(max_bytes, sender)
        self.written: list[Path] = []
        self.errors: list[str] = []
        self.too_large: str | None = None
        self._lock = threading.Lock()

    def handle(self, event: Any) -> int:
        data = event.encoded_dataset(include_meta=True)
        try:
            self.budget.take(len(data))
        except TooLarge as e:
            with self._lock:
                self.too_large = self.too_large or str(e)
            return 0xA700  # out of resources: nothing more is written
        fd, name = tempfile.mkstemp(prefix=".dimse-", suffix=".part", dir=self.out_dir)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            path = place_instance(tmp, self.out_dir, self.study_uid, self.sender)
        except PacsError as e:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.errors.append(str(e))
            return 0xC211  # refused: not what we asked for
        except Exception as e:  # a handler must answer; the error is reported after the retrieve
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.errors.append(f"could not write a received instance ({type(e).__name__}: {e})")
            return 0xA700  # out of resources
        with self._lock:
            self.written.append(path)
        return 0x0000

    def raise_errors(self) -> None:
        """Raise what went wrong while receiving: :class:`TooLarge` past the budget, else a :class:`PacsError`."""
        if self.too_large is not None:
            raise TooLarge(self.too_large)
        if self.errors:
            raise PacsError(
                self.errors[0] + (f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else "")
            )
