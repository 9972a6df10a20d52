"""DIMSE client unit tests against an in-process pynetdicom PACS on 127.0.0.1 (C-ECHO/FIND/STORE/GET/MOVE)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pacs_series import write_mr_series
from pydicom import dcmread
from pydicom.dataset import Dataset

from medlens.serve.dimse import DimseClient
from medlens.serve.pacs_config import PacsAuthError, PacsConfig, PacsError, PacsNotFoundError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _FakeScp:
    """A minimal study-root Q/R + storage SCP keeping instances in memory."""

    def __init__(self, move_port: int) -> None:
        self.instances: dict[str, Dataset] = {}
        self.move_port = move_port

    def _matches(self, query: Dataset) -> list[Dataset]:
        out = []
        for ds in self.instances.values():
            if all(
                not query.get(k) or str(query.get(k)) == str(ds.get(k))
                for k in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID")
            ):
                out.append(ds)
        return out

    def on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.instances[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        level = query.QueryRetrieveLevel
        key = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}[level]
        seen = set()
        for ds in self._matches(query):
            if ds.get(key) in seen:
                continue
            seen.add(ds.get(key))
            ident = Dataset()
            ident.QueryRetrieveLevel = level
            for k in (
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "SOPInstanceUID",
                "SOPClassUID",
                "PatientID",
                "Modality",
            ):
                if k in query and k in ds:
                    setattr(ident, k, ds.get(k))
            yield 0xFF00, ident
        yield 0x0000, None

    def on_get(self, event: Any) -> Iterator[Any]:
        found = self._matches(event.identifier)
        yield len(found)
        for ds in found:
            yield 0xFF00, ds

    def on_move(self, event: Any) -> Iterator[Any]:
        if event.move_destination.strip() != "MEDLENS":
            yield None, None
            return
        yield "127.0.0.1", self.move_port
        found = self._matches(event.identifier)
        yield len(found)
        for ds in found:
            yield 0xFF00, ds


@pytest.fixture
def scp() -> Iterator[tuple[_FakeScp, PacsConfig]]:
    from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
        Verification,
    )

    move_port = _free_port()
    fake = _FakeScp(move_port)
    ae = AE(ae_title="FAKEPACS")
    ae.require_called_aet = True
    for ctx in AllStoragePresentationContexts:
        ae.add_supported_context(ctx.abstract_syntax, scp_role=True, scu_role=True)
    for cls in (
        Verification,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
    ):
        ae.add_supported_context(cls)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.requested_contexts = StoragePresentationContexts  # for the C-MOVE sub-association to us
    handlers = [
        (evt.EVT_C_STORE, fake.on_store),
        (evt.EVT_C_FIND, fake.on_find),
        (evt.EVT_C_GET, fake.on_get),
        (evt.EVT_C_MOVE, fake.on_move),
    ]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    port = server.server_address[1]
    cfg = PacsConfig(
        host="127.0.0.1",
        port=port,
        called_aet="FAKEPACS",
        calling_aet="MEDLENS",
        move_port=move_port,
        dimse_timeout=10.0,
    )
    try:
        yield fake, cfg
    finally:
        server.shutdown()


def test_store_find_get_move(scp: tuple[_FakeScp, PacsConfig], tmp_path: Path) -> None:
    fake, cfg = scp
    src = write_mr_series(tmp_path / "mr", shape=(8, 8, 4))
    client = DimseClient(cfg)
    client.echo()
    result = client.store(src["files"])  # type: ignore[arg-type]
    assert sorted(result.stored) == sorted(src["sops"])  # type: ignore[arg-type]
    assert set(fake.instances) == set(src["sops"])  # type: ignore[arg-type]
    assert [str(s.SeriesInstanceUID) for s in client.find_series(str(src["study"]))] == [src["series"]]
    originals = {dcmread(f).SOPInstanceUID: dcmread(f).pixel_array for f in src["files"]}  # type: ignore[attr-defined]
    for method in ("get", "move"):
        files = DimseClient(replace(cfg, retrieve=method)).retrieve(str(src["study"]), tmp_path / method)
        assert {f.parent.name for f in files} == {src["series"]}
        assert {f.stem for f in files} == set(originals)
        for f in files:
            assert (dcmread(f).pixel_array == originals[f.stem]).all()


def test_unknown_study_wrong_aet_and_unreachable(scp: tuple[_FakeScp, PacsConfig], tmp_path: Path) -> None:
    _, cfg = scp
    with pytest.raises(PacsNotFoundError, match=r"study 1\.2\.3 is not on the PACS FAKEPACS@"):
        DimseClient(cfg).retrieve("1.2.3", tmp_path)
    with pytest.raises(PacsAuthError, match=r"rejected the association.*called_aet"):
        DimseClient(replace(cfg, called_aet="NOT-THE-PACS")).echo()
    with pytest.raises(PacsError, match="cannot reach the PACS"):
        DimseClient(replace(cfg, port=_free_port(), dimse_timeout=2.0)).echo()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_instances_with_bad_uids_are_refused(scp: tuple[_FakeScp, PacsConfig], tmp_path: Path) -> None:
    from pydicom import config

    fake, cfg = scp
    src = write_mr_series(tmp_path / "mr", shape=(8, 8, 2))
    DimseClient(cfg).store(src["files"])  # type: ignore[arg-type]
    config.settings.reading_validation_mode = config.IGNORE
    try:
        for ds in fake.instances.values():
            ds.SOPInstanceUID = "../../escaped"
        with pytest.raises(PacsError, match="not valid DICOM UIDs"):
            DimseClient(cfg).retrieve(str(src["study"]), tmp_path / "out")
    finally:
        config.settings.reading_validation_mode = config.WARN
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_move_scp_accepts_only_the_pacs_ae_title_from_the_pacs_address(
    scp: tuple[_FakeScp, PacsConfig],
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    _, cfg = scp
    stored: list[Any] = []

    def associate(calling: str, source: str = "127.0.0.1") -> Any:
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 3
        ae.add_requested_context(CTImageStorage)
        return ae.associate("127.0.0.1", cfg.move_port, ae_title="MEDLENS", bind_address=(source, 0))

    with DimseClient(cfg).storage_scp(lambda event: stored.append(event) or 0x0000) as server:
        assert server.server_address[0] == "127.0.0.1"  # a PACS on loopback: listen on loopback only
        intruder = associate("INTRUDER")
        assert intruder.is_rejected and not intruder.is_established
        other_host = associate("FAKEPACS", source="127.0.0.2")  # the right AE title from another address
        assert not other_host.is_established
        pacs = associate("FAKEPACS")
        assert pacs.is_established
        pacs.release()


def test_retrieval_past_the_byte_budget_stops_with_too_large(
    scp: tuple[_FakeScp, PacsConfig], tmp_path: Path
) -> None:
    from medlens.serve.security import TooLarge

    _, cfg = scp
    src = write_mr_series(tmp_path / "mr", shape=(8, 8, 4))
    DimseClient(cfg).store(src["files"])  # type: ignore[arg-type]
    one = Path(src["files"][0]).stat().st_size  # type: ignore[index]
    with pytest.raises(TooLarge, match="more than the limit"):
        DimseClient(cfg).retrieve(str(src["study"]), tmp_path / "out", max_bytes=2 * one)
    assert len([p for p in (tmp_path / "out").rglob("*") if p.is_file()]) <= 2  # nothing past the budget
    files = DimseClient(cfg).retrieve(str(src["study"]), tmp_path / "all", max_bytes=10 * one)
    assert len(files) == 4
