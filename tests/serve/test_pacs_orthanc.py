"""The PACS round trip against a real Orthanc (DICOMweb plugin, authentication on, loopback only).

Orthanc runs in a private network namespace (tests/serve/orthanc_harness.py); every client is a
``python -m medlens.cli pacs ...`` process inside that namespace. Skips, saying why, when Orthanc or the
namespace tools are missing or namespaces are not permitted.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from orthanc_harness import OrthancServer, orthanc, unavailable_reason
from pacs_series import write_mr_series
from pydicom import dcmread

pytestmark = pytest.mark.pacs

_REASON = unavailable_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc(tmp_path_factory.mktemp("orthanc")) as srv:
        yield srv


def _ok(proc: object) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"  # type: ignore[attr-defined]
    return str(proc.stdout)  # type: ignore[attr-defined]


def _by_modality(folder: Path) -> dict[str, list[object]]:
    found: dict[str, list[object]] = {}
    for f in folder.rglob("*.dcm"):
        ds = dcmread(f)
        found.setdefault(str(ds.Modality), []).append(ds)
    return found


def test_pacs_run_stores_seg_and_sr_referencing_the_source(
    server: OrthancServer, seg_run: tuple[object, Path], tmp_path: Path
) -> None:
    _, run_dir = seg_run
    src = write_mr_series(tmp_path / "mr")
    cfg = server.config_file(tmp_path)
    out = _ok(server.medlens("pacs", "push", str(tmp_path / "mr"), "--config", str(cfg)))
    assert "stored 12 of 12" in out

    out = _ok(
        server.medlens(
            "pacs", "run", str(run_dir), "--study", str(src["study"]), "--config", str(cfg), "--device", "cpu"
        )
    )
    printed = dict(re.findall(r"(SEG|SR) series [\d.]+ instance ([\d.]+)", out))
    assert set(printed) == {"SEG", "SR"}, out

    # What arrived in Orthanc: pull the whole study back and look at it.
    back = tmp_path / "back"
    _ok(
        server.medlens("pacs", "pull", "--study", str(src["study"]), "--out", str(back), "--config", str(cfg))
    )
    objects = _by_modality(back)
    assert len(objects["MR"]) == 12
    (seg,) = objects["SEG"]
    (sr,) = objects["SR"]
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == src["study"]  # joined the source study
        assert ds.SeriesInstanceUID != src["series"]
    assert seg.SOPInstanceUID == printed["SEG"] and sr.SOPInstanceUID == printed["SR"]
    # The SEG references the source series and its instances
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == src["series"]
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} <= set(src["sops"])  # type: ignore[arg-type]
    assert seg.SegmentSequence[0].SegmentLabel.lower() == "blob"
    # The SR references the source series (evidence) and the SEG
    evidence = {
        s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for s in item.ReferencedSeriesSequence
    }
    assert src["series"] in evidence
    assert evidence[src["series"]] <= set(src["sops"])  # type: ignore[arg-type]
    assert seg.SOPInstanceUID in {u for uids in evidence.values() for u in uids}


_DIMSE_SCRIPT = """
import json, sys
from dataclasses import replace
from medlens.serve.dimse import DimseClient
from medlens.serve.pacs_config import load_pacs_config
cfg = load_pacs_config(sys.argv[1])
study, series, out = sys.argv[2:5]
client = DimseClient(cfg)
client.echo()
found = {
    "studies": [str(s.StudyInstanceUID) for s in client.find("STUDY", PatientID="DIMSE-TEST")],
    "series": [(str(s.SeriesInstanceUID), int(s.NumberOfSeriesRelatedInstances)) for s in client.find_series(study)],
}
for method in ("get", "move"):
    files = DimseClient(replace(cfg, retrieve=method)).retrieve(study, f"{out}/{method}", series_uid=series)
    found[method] = [str(f) for f in files]
print(json.dumps(found))
"""


def test_dimse_store_find_and_retrieve(server: OrthancServer, tmp_path: Path) -> None:
    src = write_mr_series(tmp_path / "mr", seed=3, patient="DIMSE-TEST")
    cfg = server.config_file(tmp_path)
    out = _ok(
        server.medlens("pacs", "push", str(tmp_path / "mr"), "--config", str(cfg), "--protocol", "dimse")
    )
    assert "stored 12 of 12" in out  # C-STORE in

    # C-ECHO, C-FIND (study and series level), then C-GET and C-MOVE of the series, in one client process
    script = [
        sys.executable,
        "-c",
        _DIMSE_SCRIPT,
        str(cfg),
        str(src["study"]),
        str(src["series"]),
        str(tmp_path),
    ]
    found = json.loads(
        _ok(server.run(script, env={"MEDLENS_PACS_PASSWORD": server.password})).strip().splitlines()[-1]
    )
    assert found["studies"] == [src["study"]]
    assert found["series"] == [[src["series"], 12]]
    originals = {dcmread(f).SOPInstanceUID: dcmread(f).pixel_array for f in src["files"]}  # type: ignore[attr-defined]
    for method in ("get", "move"):
        files = [Path(f) for f in found[method]]
        assert {f.parent for f in files} == {tmp_path / method / str(src["series"])}
        assert {f.stem for f in files} == set(originals)
        for f in files:
            assert (dcmread(f).pixel_array == originals[f.stem]).all()


def test_wrong_password_is_refused_without_showing_it(server: OrthancServer, tmp_path: Path) -> None:
    cfg = server.config_file(tmp_path)
    wrong = "Wr0ng-S3cret-XYZ"
    proc = server.medlens("pacs", "find", "--config", str(cfg), password=wrong)
    assert proc.returncode == 3
    assert "HTTP 401" in proc.stderr and "check the user name and password" in proc.stderr
    # with --debug (DEBUG logs of medlens, requests and urllib3, and the traceback) neither appears either
    debug = server.medlens("--debug", "pacs", "find", "--config", str(cfg), password=wrong)
    assert debug.returncode != 0 and "PacsAuthError" in debug.stderr
    for text in (proc.stdout, proc.stderr, debug.stdout, debug.stderr):
        assert wrong not in text and server.password not in text
