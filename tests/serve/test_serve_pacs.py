"""PACS client unit tests: config and secrets, the multipart parser, DICOMweb against an in-process fake server."""

from __future__ import annotations

import io
import json
import logging
import socket
import stat
from pathlib import Path

import pytest
from fake_dicomweb import FakePacs, fake_pacs
from hypothesis import given, settings
from hypothesis import strategies as st
from pacs_series import write_mr_series
from pydicom import dcmread

from medlens.errors import InputError
from medlens.serve.pacs import DicomWebClient
from medlens.serve.pacs_config import (
    PacsAuthError,
    PacsConfig,
    PacsError,
    PacsNotFoundError,
    load_pacs_config,
)
from medlens.serve.pacs_files import dicom_files, multipart_body, parse_multipart


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return write_mr_series(tmp_path_factory.mktemp("mr") / "series")


def _config(pacs: FakePacs, **kw: object) -> PacsConfig:
    args: dict[str, object] = {
        "url": pacs.url,
        "auth": "basic",
        "username": pacs.user,
        "password": pacs.password,
    }
    return PacsConfig(**(args | kw | {"timeout": 5.0}))  # type: ignore[arg-type]


def _loaded(pacs: FakePacs, series: dict[str, object]) -> FakePacs:
    for f in series["files"]:  # type: ignore[attr-defined]
        pacs.add(Path(f).read_bytes())
    return pacs


# ---- config -------------------------------------------------------------------------------------------------
def test_config_file_then_environment_wins(tmp_path: Path) -> None:
    cfg_file = tmp_path / "pacs.toml"
    cfg_file.write_text(
        '[dicomweb]\nurl = "http://pacs.local/dicom-web/"\nusername = "bob"\npassword = "file-pw"\ntimeout = 7\n'
        '[dimse]\nhost = "pacs.local"\nport = 11112\ncalled_aet = "PACS"\nretrieve = "move"\ntimeout = 9\n'
    )
    cfg = load_pacs_config(cfg_file, env={})
    assert (cfg.url, cfg.auth, cfg.username, cfg.password, cfg.timeout) == (
        "http://pacs.local/dicom-web",
        "basic",
        "bob",
        "file-pw",
        7.0,
    )
    assert (cfg.host, cfg.port, cfg.called_aet, cfg.retrieve, cfg.dimse_timeout) == (
        "pacs.local",
        11112,
        "PACS",
        "move",
        9.0,
    )
    env = {
        "MEDLENS_PACS_URL": "https://other/dw",
        "MEDLENS_PACS_USER": "carol",
        "MEDLENS_PACS_PASSWORD": "env-pw",
    }
    cfg = load_pacs_config(cfg_file, env=env)
    assert (cfg.url, cfg.username, cfg.password) == ("https://other/dw", "carol", "env-pw")
    assert "environment" in cfg.source and str(cfg_file) in cfg.source
    token = load_pacs_config(None, env={"MEDLENS_PACS_URL": "http://x/dw", "MEDLENS_PACS_TOKEN": "tok-123"})
    assert (token.auth, token.token) == ("bearer", "tok-123")
    js = tmp_path / "pacs.json"
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    js.write_text(json.dumps({"dicomweb": {"url": "http://j/dw", "auth": "none", "verify": str(ca)}}))
    assert load_pacs_config(js, env={}).verify == str(ca)


def test_config_hides_secrets_and_moves_url_credentials() -> None:
    cfg = load_pacs_config(None, env={"MEDLENS_PACS_URL": "http://dave:url-pw%21@pacs:8042/dicom-web"})
    assert (cfg.url, cfg.username, cfg.password) == ("http://pacs:8042/dicom-web", "dave", "url-pw!")
    assert "url-pw" not in repr(cfg)
    assert cfg.redact("header Basic ZGF2ZTp1cmwtcHch and url-pw!") == "header Basic *** and ***"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[dicomweb]\nurl = "ftp://x"\n', "http:// or https://"),
        ('[dicomweb]\nauth = "kerberos"\n', "unknown PACS auth type 'kerberos'"),
        ("[dimse]\nport = 70000\n", "not a TCP port"),
        ('[dimse]\ncalled_aet = "A_TITLE_FAR_TOO_LONG"\n', "not an AE title"),
        ('[dicomweb]\nurl = "http://x"\npasword = "typo"\n', "unknown key"),
        ('[pacs]\nurl = "http://x"\n', "unknown table"),
        ('[dicomweb\nurl = "http://x"\n', "not valid TOML"),
        ('[dicomweb]\nverify = "/no/such/ca.pem"\n', "no such CA bundle"),
    ],
)
def test_config_errors_name_the_problem(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "pacs.toml"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        load_pacs_config(path, env={})


def test_missing_credentials_are_reported_when_dicomweb_is_used() -> None:
    cfg = load_pacs_config(None, env={"MEDLENS_PACS_URL": "http://x/dw", "MEDLENS_PACS_USER": "erin"})
    with pytest.raises(InputError, match="needs a user name and a password"):
        DicomWebClient(cfg)


# ---- multipart ----------------------------------------------------------------------------------------------
def _parse(body: bytes, boundary: bytes, chunk: int) -> list[tuple[dict[str, str], bytes]]:
    parts: list[tuple[dict[str, str], bytes]] = []
    sinks: dict[int, tuple[dict[str, str], io.BytesIO]] = {}

    def open_part(headers: dict[str, str]) -> io.BytesIO:
        buf = io.BytesIO()
        sinks[id(buf)] = (headers, buf)
        return buf

    def close_part(fh: object) -> None:
        headers, buf = sinks[id(fh)]
        parts.append((headers, buf.getvalue()))

    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    n = parse_multipart(chunks, boundary, open_part, close_part)  # type: ignore[arg-type]
    assert n == len(parts)
    return parts


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    chunk=st.integers(min_value=1, max_value=97),
)
def test_multipart_round_trip_whatever_the_chunking(
    tmp_path_factory: pytest.TempPathFactory, payloads: list[bytes], chunk: int
) -> None:
    # bodies that contain CRLFs, dashes and near-boundaries must come back byte for byte
    payloads = [p + b"\r\n--medlens-b" + p[:5] for p in payloads]
    folder = tmp_path_factory.mktemp("mp")
    files = []
    for n, p in enumerate(payloads):
        (folder / f"{n}.bin").write_bytes(p)
        files.append(folder / f"{n}.bin")
    body = b"".join(multipart_body(files, "medlens-boundary"))
    parts = _parse(body, b"medlens-boundary", chunk)
    assert [p for _, p in parts] == payloads
    assert all(h == {"content-type": "application/dicom"} for h, _ in parts)


def test_multipart_cut_short_is_an_error() -> None:
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\nabcdef"
    with pytest.raises(PacsError, match="ended early"):
        _parse(body, b"b", 4)


# ---- DICOMweb against the fake server ------------------------------------------------------------------------
def test_push_then_pull_round_trip(series: dict[str, object], tmp_path: Path) -> None:
    with fake_pacs() as pacs:
        client = DicomWebClient(_config(pacs))
        result = client.store(dicom_files([Path(str(series["files"][0])).parent]))  # type: ignore[index]
        assert sorted(result.stored) == sorted(series["sops"])  # type: ignore[arg-type]
        assert client.search_series(str(series["study"]))[0]["00201209"]["Value"] == [12]
        files = client.retrieve(str(series["study"]), tmp_path / "out", series_uid=str(series["series"]))
    assert sorted(f.relative_to(tmp_path / "out").as_posix() for f in files) == sorted(
        f"{series['series']}/{sop}.dcm"
        for sop in series["sops"]  # type: ignore[attr-defined]
    )
    originals = {dcmread(f).SOPInstanceUID: Path(f).read_bytes() for f in series["files"]}  # type: ignore[attr-defined]
    for f in files:
        assert f.read_bytes() == originals[f.stem]
        assert stat.S_IMODE(f.stat().st_mode) & 0o044  # not left 0600 like a temporary
    assert not list((tmp_path / "out").rglob(".*"))  # no temporary left


def test_bearer_token_and_servers_refusing_any_transfer_syntax(
    series: dict[str, object], tmp_path: Path
) -> None:
    with fake_pacs(_loaded(FakePacs(token="tok-abc"), series)) as pacs:
        pacs.mode = "no-any-syntax"
        cfg = PacsConfig(url=pacs.url, auth="bearer", token="tok-abc", timeout=5.0)
        assert len(DicomWebClient(cfg).retrieve(str(series["study"]), tmp_path)) == 12
        assert sum(r.startswith("GET /dicom-web/studies/") for r in pacs.requests) == 2  # 406, then again


def test_wrong_password_says_check_credentials_and_never_shows_them(
    series: dict[str, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Wr0ng-Pa55word-$ecret"
    caplog.set_level(logging.DEBUG)  # every logger, urllib3 and requests included
    with fake_pacs(_loaded(FakePacs(), series)) as pacs:
        cfg = _config(pacs, password=secret)
        with pytest.raises(PacsAuthError) as err:
            DicomWebClient(cfg).retrieve(str(series["study"]), tmp_path)
        pacs.mode = (
            "echo-auth-500"  # a server that puts our Authorization header and password in its error page
        )
        with pytest.raises(PacsError) as err500:
            DicomWebClient(cfg).search_studies()
    message = str(err.value)
    assert "HTTP 401" in message and "check the user name and password" in message
    assert "HTTP 500" in str(err500.value)
    secrets = [secret, *cfg.secrets()]
    for text in (message, repr(err.value), str(err500.value), caplog.text, repr(cfg)):
        for s in secrets:
            assert s not in text


def test_unknown_study_is_not_found(series: dict[str, object], tmp_path: Path) -> None:
    with fake_pacs(_loaded(FakePacs(), series)) as pacs:
        client = DicomWebClient(_config(pacs))
        with pytest.raises(PacsNotFoundError, match=r"1\.2\.3\.4"):
            client.retrieve("1.2.3.4", tmp_path)
        with pytest.raises(PacsNotFoundError, match=r"study 1\.2\.3\.4 is not on the PACS"):
            client.search_series("1.2.3.4")
        with pytest.raises(InputError, match="not a DICOM UID"):
            client.retrieve("1.2.3/../../etc", tmp_path)


def test_unreachable_server() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = PacsConfig(url=f"http://127.0.0.1:{port}/dicom-web", timeout=2.0)
    with pytest.raises(PacsError, match=r"cannot reach the PACS .* check the URL"):
        DicomWebClient(cfg).search_studies()


def test_non_dicom_answers_are_refused(series: dict[str, object], tmp_path: Path) -> None:
    with fake_pacs(_loaded(FakePacs(), series)) as pacs:
        client = DicomWebClient(_config(pacs))
        pacs.mode = "html"
        with pytest.raises(PacsError, match=r"not DICOM JSON.*text/html"):
            client.search_studies()
        with pytest.raises(PacsError, match="not multipart/related DICOM"):
            client.retrieve(str(series["study"]), tmp_path / "a")
        pacs.mode = "truncated"
        with pytest.raises(PacsError, match="ended early"):
            client.retrieve(str(series["study"]), tmp_path / "b")
    assert not [p for p in (tmp_path / "b").rglob("*") if p.name.startswith(".")]  # no temporary left


def _instance_with(series: dict[str, object], **uids: str) -> bytes:
    from pydicom import config

    ds = dcmread(str(series["files"][0]))  # type: ignore[index]
    for key, value in uids.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.save_as(buf, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = old
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_server_cannot_choose_where_files_land(series: dict[str, object], tmp_path: Path) -> None:
    study = str(series["study"])
    out = tmp_path / "deep" / "out"
    evil = _instance_with(series, SOPInstanceUID="../../../escaped", SeriesInstanceUID="..")
    with fake_pacs() as pacs:
        pacs.instances["evil"] = (evil, study, "1.2")
        with pytest.raises(PacsError, match="not valid DICOM UIDs"):
            DicomWebClient(_config(pacs)).retrieve(study, out)
        other = _instance_with(series, StudyInstanceUID="1.2.999", SOPInstanceUID="1.2.999.1")
        pacs.instances = {"other": (other, study, "1.2")}
        with pytest.raises(PacsError, match=r"of study 1\.2\.999 when study .* was asked for"):
            DicomWebClient(_config(pacs)).retrieve(study, out)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_push_skips_non_dicom_in_folders_but_refuses_named_ones(
    series: dict[str, object], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "a.dcm").write_bytes(Path(str(series["files"][0])).read_bytes())  # type: ignore[index]
    assert dicom_files([tmp_path]) == [tmp_path / "a.dcm"]
    with pytest.raises(InputError, match="not a DICOM file"):
        dicom_files([tmp_path / "notes.txt"])
    with pytest.raises(InputError, match="no such file"):
        dicom_files([tmp_path / "missing"])


# ---- the command line ----------------------------------------------------------------------------------------
def test_cli_push_pull_and_auth_failure(
    series: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from medlens.cli import app

    runner = CliRunner()
    with fake_pacs() as pacs:
        monkeypatch.setenv("MEDLENS_PACS_URL", pacs.url)
        monkeypatch.setenv("MEDLENS_PACS_USER", pacs.user)
        monkeypatch.setenv("MEDLENS_PACS_PASSWORD", pacs.password)
        folder = str(Path(str(series["files"][0])).parent)  # type: ignore[index]
        res = runner.invoke(app, ["pacs", "push", folder])
        assert res.exit_code == 0, res.output
        assert "stored 12 of 12" in res.output
        res = runner.invoke(
            app, ["pacs", "pull", "--study", str(series["study"]), "--out", str(tmp_path / "o")]
        )
        assert res.exit_code == 0, res.output
        assert len(list((tmp_path / "o").rglob("*.dcm"))) == 12
        monkeypatch.setenv("MEDLENS_PACS_PASSWORD", "Cli-Wrong-Secret")
        res = runner.invoke(app, ["pacs", "find"])
        assert isinstance(res.exception, PacsAuthError)
        assert "Cli-Wrong-Secret" not in res.output + str(res.exception)


# ---- pacs run: pull, predict, write SEG/SR, push ----------------------------------------------------------------
def test_run_on_study_stores_seg_and_sr_in_the_study(
    seg_run: tuple[object, Path], series: dict[str, object], tmp_path: Path
) -> None:
    from medlens.serve.pacs_run import run_on_study

    _, run_dir = seg_run
    study, source = str(series["study"]), str(series["series"])
    with fake_pacs(_loaded(FakePacs(), series)) as pacs:
        result = run_on_study(run_dir, _config(pacs), study, work_dir=tmp_path / "work", device="cpu")
        stored = {sop: dcmread(io.BytesIO(data)) for sop, (data, _, _) in pacs.instances.items()}
    assert result.source_series_uid == source
    assert sorted(o.modality for o in result.results) == ["SEG", "SR"]
    for obj in result.results:
        ds = stored[obj.sop_instance_uid]  # arrived on the server
        assert ds.StudyInstanceUID == study and ds.SeriesInstanceUID not in (source, "")
        assert obj.path.parent == tmp_path / "work" / "results"
    seg = next(stored[o.sop_instance_uid] for o in result.results if o.modality == "SEG")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source


def test_run_on_study_asks_which_series_when_several(series: dict[str, object], tmp_path: Path) -> None:
    from medlens.serve.pacs_run import run_on_study

    second = write_mr_series(tmp_path / "second", shape=(8, 8, 3), study_uid=str(series["study"]), seed=1)
    with fake_pacs(_loaded(_loaded(FakePacs(), series), second)) as pacs:
        with pytest.raises(InputError, match=r"has 2 image series; choose one with --series"):
            run_on_study(tmp_path / "no-run", _config(pacs), str(series["study"]))
        with pytest.raises(PacsNotFoundError, match=r"series 1\.2\.3 of study"):
            run_on_study(tmp_path / "no-run", _config(pacs), str(series["study"]), series_uid="1.2.3")


def test_retrieval_past_the_byte_budget_stops_with_too_large(
    series: dict[str, object], tmp_path: Path
) -> None:
    from medlens.serve.pacs_run import pull
    from medlens.serve.security import TooLarge

    one = Path(str(series["files"][0])).stat().st_size  # type: ignore[index]
    with fake_pacs(_loaded(FakePacs(), series)) as pacs:
        with pytest.raises(TooLarge, match=r"the PACS at .* sent more than the limit"):
            pull(_config(pacs), str(series["study"]), tmp_path / "out", max_bytes=3 * one)
        assert len(pull(_config(pacs), str(series["study"]), tmp_path / "all", max_bytes=13 * one)) == 12
    landed = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(landed) <= 3 and not [
        p for p in landed if p.name.startswith(".")
    ]  # stopped, no temporary left
