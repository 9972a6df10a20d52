"""``medlens serve`` PACS jobs against a real Orthanc (DICOMweb plugin, authentication on, loopback only).

Orthanc runs in a private network namespace (tests/serve/orthanc_harness.py). The service is started as
``python -m medlens.cli serve RUN --pacs-config CFG`` inside that namespace, and one client process there
uploads a generated MR series to Orthanc, waits for ``/health``, posts ``{"study", "series"}`` with the bearer
token, polls the job and downloads every result file. The assertions run here, on what the client brought back.
Skips, saying why, when Orthanc or the namespace tools are missing or namespaces are not permitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from orthanc_harness import OrthancServer, orthanc, unavailable_reason
from pacs_series import write_mr_series

pytestmark = pytest.mark.pacs

_REASON = unavailable_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

SERVE_PORT = 8765  # inside Orthanc's namespace: nothing else listens there
TOKEN = "serve-token-5d1e8b2a"
MODEL = "seg"

# argv: config, series folder, out folder, study, series, base URL, model, token. Prints one JSON line.
_CLIENT = """
import json, sys, time
from pathlib import Path
import httpx
from medlens.serve.pacs_config import load_pacs_config
from medlens.serve.pacs_run import push

cfg, mr, out, study, series, base, model, token = sys.argv[1:9]
report = {}
stored = push(load_pacs_config(cfg), [mr])
report["stored"], report["refused"] = len(stored.stored), len(stored.failed)
auth = {"Authorization": f"Bearer {token}"}
with httpx.Client(base_url=base, timeout=20) as http:
    deadline = time.monotonic() + 60
    while True:
        try:
            if http.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            sys.exit("the service did not answer /health within 60 s")
        time.sleep(0.1)
    report["no_token"] = http.post(f"/models/{model}/jobs", json={"study": study}).status_code
    r = http.post(f"/models/{model}/jobs", json={"study": study, "series": series}, headers=auth)
    report["submit"] = r.status_code
    report["submitted"] = r.json()
    job = r.json().get("id")
    deadline = time.monotonic() + 60
    while job:
        status = http.get(f"/jobs/{job}", headers=auth).json()
        if status["state"] in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    report["status"] = status if job else None
    report["downloads"] = {}
    for f in ((status or {}).get("results") or {}).get("files", []):
        got = http.get(f["url"], headers=auth)
        report["downloads"][f["name"]] = [got.status_code, got.headers.get("content-type", "")]
        if got.status_code == 200:
            Path(out, f["name"]).write_bytes(got.content)
    if job:
        report["unlisted"] = http.get(f"/jobs/{job}/files/image.nii", headers=auth).status_code
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc(tmp_path_factory.mktemp("orthanc")) as srv:
        yield srv


def _serve(server: OrthancServer, run_dir: Path, cfg: Path, work: Path, log: Path) -> subprocess.Popen[bytes]:
    """``medlens serve`` inside Orthanc's namespace (nsenter -n execs it: the Popen pid is the server's)."""
    command = [
        "nsenter", "-t", str(server.pid), "-n",
        sys.executable, "-m", "medlens.cli", "serve", f"{MODEL}={run_dir}",
        "--host", "127.0.0.1", "--port", str(SERVE_PORT), "--token", TOKEN,
        "--pacs-config", str(cfg), "--work-dir", str(work), "--threads", "1",
    ]  # fmt: skip
    env = {"MEDLENS_PACS_PASSWORD": server.password, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    with open(log, "wb") as fh:
        return subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env})


def _client(
    server: OrthancServer, argv: list[str], service: subprocess.Popen[bytes], stem: Path, timeout: float = 150
) -> tuple[int, str, str]:
    """Run the client in the namespace; stopped early (and said so) if the service dies."""
    env = {**os.environ, "MEDLENS_PACS_PASSWORD": server.password, "OMP_NUM_THREADS": "1"}
    out, err = stem.with_suffix(".out"), stem.with_suffix(".err")
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            ["nsenter", "-t", str(server.pid), "-n", *argv], stdout=fo, stderr=fe, env=env
        )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and service.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        _stop(proc)
    died = "" if service.poll() is None else f"\nthe service exited early (code {service.returncode})"
    return int(proc.returncode), out.read_text(errors="replace"), err.read_text(errors="replace") + died


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn shuts down cleanly), SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_serve_pacs_job_returns_label_map_seg_and_sr(
    server: OrthancServer, seg_run: tuple[object, Path], tmp_path: Path
) -> None:
    from pydicom import dcmread

    from medlens.io import read_image
    from medlens.io.dicom import read_dicom_series

    _, run_dir = seg_run
    src = write_mr_series(tmp_path / "mr")
    sops = {str(uid) for uid in src["sops"]}  # type: ignore[attr-defined]
    cfg = server.config_file(tmp_path)
    out = tmp_path / "downloads"
    out.mkdir()
    log = tmp_path / "serve.log"
    client_argv = [sys.executable, "-c", _CLIENT, str(cfg), str(tmp_path / "mr"), str(out)]
    client_argv += [str(src["study"]), str(src["series"]), f"http://127.0.0.1:{SERVE_PORT}", MODEL, TOKEN]
    service = _serve(server, run_dir, cfg, tmp_path / "jobs", log)
    try:  # the client uploads the series while the service starts
        code, stdout, stderr = _client(server, client_argv, service, tmp_path / "client")
    finally:
        _stop(service)
    served = log.read_text(errors="replace")[-3000:]
    assert code == 0, f"client exit {code}: {stderr[-3000:]}\nservice log: {served}"
    report = json.loads(stdout.strip().splitlines()[-1])

    assert report["stored"] == 12 and report["refused"] == 0
    assert report["no_token"] == 401
    assert report["submit"] == 202 and report["submitted"]["input"] == "pacs", report["submitted"]
    status = report["status"]
    assert status["state"] == "done", f"{status}\nservice log: {served}"
    results = status["results"]
    names = {f["name"] for f in results["files"]}
    assert {"label.nii.gz", "result_seg.dcm", "result_sr.dcm"} <= names
    assert all(code == 200 for code, _ in report["downloads"].values()), report["downloads"]
    assert report["downloads"]["result_seg.dcm"][1] == "application/dicom"
    assert report["unlisted"] == 404

    # The label map has the source series' geometry; the reported volume is the one of the downloaded map.
    source = read_dicom_series(tmp_path / "mr")
    label = read_image(out / "label.nii.gz")
    assert results["label_map"].endswith("/files/label.nii.gz")
    assert label.spatial_shape == source.spatial_shape == (16, 16, 12)
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
    voxels = int((np.asarray(label.array) == 1).sum())
    assert voxels > 0 and results["volumes_ml"]["blob"] > 0
    assert results["volumes_ml"]["blob"] == pytest.approx(voxels * 1.5 * 1.5 * 2.0 / 1000, abs=1e-3)

    # SEG and SR join the source study in new series and reference the source series and its instances.
    seg, sr = dcmread(out / "result_seg.dcm"), dcmread(out / "result_sr.dcm")
    assert (seg.Modality, sr.Modality) == ("SEG", "SR")
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == src["study"]
        assert ds.SeriesInstanceUID != src["series"]
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == src["series"]
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} <= sops
    assert seg.SegmentSequence[0].SegmentLabel.lower() == "blob"
    assert int(np.asarray(seg.pixel_array).sum()) == voxels  # the SEG holds the same voxels as the label map
    evidence = {
        s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for s in item.ReferencedSeriesSequence
    }
    assert src["series"] in evidence and evidence[src["series"]] <= sops
    assert seg.SOPInstanceUID in {u for uids in evidence.values() for u in uids}
