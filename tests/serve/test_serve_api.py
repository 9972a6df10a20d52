"""The inference service through its HTTP API: results equal the library's, and each defence holds (token,
size limits, zip bombs, zip-slip, path traversal, a bounded queue, PACS jobs only through server-side config)."""

from __future__ import annotations

import gzip
import io
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from medlens.io import read_image, write_image
from medlens.serve.api import create_app

TOKEN = "api-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve_jobs")


@pytest.fixture(scope="module")
def client(seg_run: tuple[Any, Path], cls_run: tuple[Any, Path], work: Path) -> Iterator[TestClient]:
    """Two models at once (a segmentation and a classification run); small limits; capacity 2 jobs."""
    app = create_app(
        [seg_run[1], cls_run[1]],
        names=["blobs", "lesion"],
        token=TOKEN,
        max_upload_mb=0.25,
        max_unpacked_mb=0.5,
        workers=1,
        max_queue=1,
        threads=1,
        work_dir=work,
    )
    with TestClient(app) as c:
        yield c


def seg_image(seg_run: tuple[Any, Path], k: int = 0) -> Path:
    ds = seg_run[0]
    return Path(ds.root) / ds.test[k].image[0]


def wait(client: TestClient, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = client.get(f"/jobs/{job_id}", headers=AUTH).json()
        if status["state"] in ("done", "failed"):
            return dict(status)
        time.sleep(0.02)
    raise TimeoutError(job_id)


def download(client: TestClient, url: str, tmp_path: Path, name: str) -> Path:
    r = client.get(url, headers=AUTH)
    assert r.status_code == 200, r.text
    path = tmp_path / name
    path.write_bytes(r.content)
    return path


# ---- authentication -------------------------------------------------------------------------------------------
def test_every_route_but_health_needs_the_token(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    for method, url in (("get", "/models"), ("get", "/models/blobs/card"), ("post", "/models/blobs/jobs"),
                        ("post", "/models/blobs/predict"), ("get", "/jobs/" + "0" * 32),
                        ("get", f"/jobs/{'0' * 32}/files/label.nii.gz"), ("post", f"/jobs/{'0' * 32}/viewer")):  # fmt: skip
        missing = client.request(method, url)
        assert missing.status_code == 401, url
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.request(method, url, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"})
        assert wrong.status_code == 401, url
        assert client.request(method, url, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    models = client.get("/models", headers=AUTH).json()["models"]
    assert {(m["name"], m["task"]) for m in models} == {
        ("blobs", "segmentation"),
        ("lesion", "classification"),
    }


def test_openapi_schema_documents_the_api(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/health", "/models", "/models/{name}/card", "/models/{name}/jobs", "/jobs/{job_id}",
                 "/jobs/{job_id}/files/{name}", "/jobs/{job_id}/viewer"):  # fmt: skip
        assert path in paths, path
    upload = paths["/models/{name}/jobs"]["post"]
    assert set(upload["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/octet-stream",
        "application/json",
    }
    assert {"401", "413", "429"} <= set(upload["responses"])
    predict = paths["/models/{name}/predict"]["post"]
    for op in (upload, predict):  # one set of options for both routes
        assert {p["name"] for p in op["parameters"]} == {
            "name",
            "tta",
            "probabilities",
            "uncertainty",
            "series",
        }
    job = schema["components"]["schemas"]["JobResults"]["properties"]
    assert "refer" in job and job["refer"]["description"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "/viewer/{job_id}" not in paths  # browser routes are not part of the API


# ---- results ---------------------------------------------------------------------------------------------------
def test_nifti_job_gives_the_predictors_label_map(
    client: TestClient, seg_run: tuple[Any, Path], tmp_path: Path
) -> None:
    src = seg_image(seg_run)
    r = client.post("/models/blobs/jobs", headers=AUTH, files={"file": ("../../x.nii.gz", src.read_bytes())})
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running", "done")
    status = wait(client, r.json()["id"])
    assert status["state"] == "done", status["error"]
    assert status["input"] == "nifti"
    results = status["results"]
    label = read_image(download(client, results["label_map"], tmp_path, "label.nii.gz"))
    image = read_image(src)
    assert label.spatial_shape == image.spatial_shape and np.allclose(label.affine, image.affine)
    expected = client.app.state.models["blobs"].predictor.predict(image).label  # type: ignore[attr-defined]
    assert np.array_equal(label.array, expected.array)
    assert 0 < label.array.sum() < label.array.size
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
    assert results["volumes_ml"]["blob"] == pytest.approx(float(label.array.sum()) * voxel_ml, abs=1e-3)
    assert {f["name"] for f in results["files"]} == {"image.nii.gz", "label.nii.gz", "result.json"}


def test_uncertainty_and_raw_body_upload(
    client: TestClient, seg_run: tuple[Any, Path], tmp_path: Path
) -> None:
    body = seg_image(seg_run, 1).read_bytes()
    r = client.post("/models/blobs/predict", params={"uncertainty": True, "probabilities": True}, headers=AUTH,
                    content=body)  # fmt: skip
    status = r.json()
    assert r.status_code == 200 and status["state"] == "done", status
    res = status["results"]
    assert 0.0 <= res["uncertainty"] <= 1.0 and res["refer"] in (None, True, False)
    names = {f["name"] for f in res["files"]}
    assert {"uncertainty.nii.gz", "probabilities.nii.gz"} <= names
    umap = read_image(
        download(client, f"/jobs/{status['id']}/files/uncertainty.nii.gz", tmp_path, "u.nii.gz")
    )
    assert (
        umap.spatial_shape == read_image(seg_image(seg_run, 1)).spatial_shape and float(umap.array.max()) > 0
    )


def test_classification_model_served_alongside(
    client: TestClient, cls_run: tuple[Any, Path], tmp_path: Path
) -> None:
    ds = cls_run[0]
    image = read_image(Path(ds.root) / ds.test[0].image[0])
    src = write_image(image, tmp_path / "x.nii.gz")
    status = client.post(
        "/models/lesion/predict", headers=AUTH, files={"file": ("a", src.read_bytes())}
    ).json()
    assert status["state"] == "done", status
    expected = client.app.state.models["lesion"].predictor.predict(read_image(src))  # type: ignore[attr-defined]
    assert status["results"]["prediction"] == expected.prediction
    assert status["results"]["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
    assert status["results"]["label_map"] is None


def test_dicom_zip_job_is_zip_slip_safe_and_returns_seg_and_sr(
    client: TestClient, seg_run: tuple[Any, Path], work: Path, tmp_path: Path
) -> None:
    import pydicom

    import dicom_synth

    files = dicom_synth.write_mr_series(read_image(seg_image(seg_run)), tmp_path / "series")
    hostile = ["../../escaped_{}.dcm", "/tmp/absolute_{}.dcm", "..\\..\\win_{}.dcm", "ok/../../../up_{}.dcm"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, f in enumerate(files):
            zf.writestr(hostile[n % len(hostile)].format(n), f.read_bytes())
    status = client.post(
        "/models/blobs/predict", headers=AUTH, files={"file": ("s.zip", buf.getvalue())}
    ).json()
    assert status["state"] == "done", status["error"]
    assert status["input"] == "dicom"
    job_dir = work / status["id"]
    extracted = sorted(p.name for p in (job_dir / "input" / "dicom").iterdir())
    assert extracted == [f"{n:05d}.dcm" for n in range(len(files))]  # generated names only
    for root in (work, work.parent, tmp_path, Path("/tmp")):
        assert (
            not list(root.glob("escaped_*"))
            and not list(root.glob("absolute_*"))
            and not list(root.glob("up_*"))
        )
    names = {f["name"] for f in status["results"]["files"]}
    assert {"result_seg.dcm", "result_sr.dcm"} <= names
    seg = pydicom.dcmread(download(client, f"/jobs/{status['id']}/files/result_seg.dcm", tmp_path, "seg.dcm"))
    source = pydicom.dcmread(files[0])
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


# ---- limits --------------------------------------------------------------------------------------------------------
def _jobs_in(work: Path) -> set[str]:
    return {p.name for p in work.iterdir()}


def test_oversized_upload_is_refused_with_413(client: TestClient, work: Path) -> None:
    before = _jobs_in(work)
    big = np.random.default_rng(0).bytes(300 * 1024)
    assert client.post("/models/blobs/jobs", headers=AUTH, content=big).status_code == 413
    r = client.post("/models/blobs/jobs", headers=AUTH, files={"file": ("a.nii", big)})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting while streaming can stop it
        for _ in range(30):
            yield b"\0" * 16384

    assert client.post("/models/blobs/jobs", headers=AUTH, content=chunks()).status_code == 413
    assert _jobs_in(work) == before  # refused uploads leave nothing behind


def _bomb(member_bytes: int, lie: bool) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * member_bytes)
    data = bytearray(buf.getvalue())
    if lie:  # claim 1 kB in both the local and the central header
        local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
        struct.pack_into("<I", data, local + 22, 1000)
        struct.pack_into("<I", data, central + 24, 1000)
    return bytes(data)


def test_zip_and_gzip_bombs_are_stopped(client: TestClient, work: Path) -> None:
    before = _jobs_in(work)
    honest = _bomb(4 * 2**20, lie=False)  # 4 MB of zeros in a few kB
    assert len(honest) < 0.25 * 2**20
    r = client.post("/models/blobs/jobs", headers=AUTH, files={"file": ("b.zip", honest)})
    assert r.status_code == 413 and "unpacks" in r.json()["detail"]
    liar = client.post("/models/blobs/jobs", headers=AUTH, content=_bomb(4 * 2**20, lie=True))
    assert liar.status_code in (400, 413)  # stopped at the declared size (bad CRC) or at the limit
    gz = gzip.compress(b"\0" * (4 * 2**20))
    r = client.post("/models/blobs/jobs", headers=AUTH, files={"file": ("b.nii.gz", gz)})
    assert r.status_code == 413 and "inflates" in r.json()["detail"]
    assert client.post("/models/blobs/jobs", headers=AUTH, content=b"just text").status_code == 400
    assert _jobs_in(work) == before


def test_files_endpoint_serves_only_the_jobs_own_results(
    client: TestClient, seg_run: tuple[Any, Path]
) -> None:
    status = client.post(
        "/models/blobs/predict", headers=AUTH, content=seg_image(seg_run).read_bytes()
    ).json()
    job = status["id"]
    assert client.get(f"/jobs/{job}/files/result.json", headers=AUTH).status_code == 200
    for name in ("..%2F..%2Finput%2Fimage.nii", "..%2Fresults%2Flabel.nii.gz", "%2Fetc%2Fpasswd", "image.nii",
                 "input", "%2E%2E", "result.json%00", "probabilities.nii.gz"):  # fmt: skip
        assert client.get(f"/jobs/{job}/files/{name}", headers=AUTH).status_code == 404, name
    assert client.get(f"/jobs/{job}/files/../../health", headers=AUTH).status_code in (401, 404)
    assert client.get(f"/jobs/{job.upper()}", headers=AUTH).status_code == 404
    assert client.get("/jobs/..%2F..%2Fetc", headers=AUTH).status_code == 404
    assert client.get("/models/nope/card", headers=AUTH).status_code == 404


def test_full_queue_answers_429(client: TestClient, seg_run: tuple[Any, Path]) -> None:
    body = seg_image(seg_run).read_bytes()
    lock = client.app.state.models["blobs"].lock  # type: ignore[attr-defined]
    with lock:  # the worker blocks on the model: one job runs, one waits, the queue is full
        first = client.post("/models/blobs/jobs", headers=AUTH, content=body)
        second = client.post("/models/blobs/jobs", headers=AUTH, content=body)
        third = client.post("/models/blobs/jobs", headers=AUTH, content=body)
        assert (first.status_code, second.status_code, third.status_code) == (202, 202, 429)
        assert third.headers["retry-after"] == "1"
    assert wait(client, second.json()["id"])["state"] == "done"


def test_pacs_jobs_need_a_server_side_pacs_and_valid_uids(client: TestClient) -> None:
    r = client.post("/models/blobs/jobs", headers=AUTH, json={"study": "1.2.840.1"})
    assert r.status_code == 422 and "no PACS configured" in r.json()["detail"]
    assert (
        client.post("/models/blobs/jobs", headers=AUTH, params={"series": "../x"}, content=b"x").status_code
        == 422
    )


def test_model_card_prefers_model_card_json(client: TestClient, tmp_path: Path) -> None:
    import json
    import shutil

    from medlens.serve.runner import model_card

    served = client.app.state.models["blobs"]  # type: ignore[attr-defined]
    # the endpoint serves what model_card() builds for the served run (other tests may have evaluated it)
    data = model_card(served)
    assert client.get("/models/blobs/card", headers=AUTH).json() == {
        "source": data.pop("source"),
        "card": data,
    }
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(served.run_dir / "run.json", bare / "run.json")
    card = model_card(type(served)(**{**served.__dict__, "run_dir": bare}))
    assert card["source"] == "run.json" and card["task"] == "segmentation"
    assert card["dataset"]["labels"] == {"background": 0, "blob": 1}
    assert "root" not in card["dataset"]  # no server paths
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(served.run_dir / "run.json", copy / "run.json")
    (copy / "model_card.json").write_text(json.dumps({"intended_use": "tests"}))
    served_copy = type(served)(**{**served.__dict__, "run_dir": copy})
    assert model_card(served_copy) == {"source": "model_card.json", "intended_use": "tests"}


def test_onnx_backend_serves_the_same_labels(seg_run: tuple[Any, Path], tmp_path: Path) -> None:
    body = seg_image(seg_run, 2).read_bytes()
    labels = {}
    for backend in ("torch", "onnx"):
        app = create_app(
            [seg_run[1]], names=["m"], token=None, backend=backend, threads=1, work_dir=tmp_path / backend
        )
        with TestClient(app) as c:
            assert c.get("/models").json()["models"][0]["backend"] == backend
            status = c.post("/models/m/predict", content=body).json()
            assert status["state"] == "done", status
            labels[backend] = read_image(
                download(c, status["results"]["label_map"], tmp_path, f"{backend}.nii.gz")
            )
    assert np.array_equal(labels["torch"].array, labels["onnx"].array)


def test_cli_refuses_no_auth_off_loopback() -> None:
    from typer.testing import CliRunner

    from medlens.cli import app
    from medlens.serve.security import is_loopback

    result = CliRunner().invoke(app, ["serve", "r", "--no-auth", "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "loopback" in str(result.exception)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


def test_viewer_tickets_are_signed_bound_single_use_and_expire() -> None:
    from medlens.serve.security import Tickets

    tickets = Tickets()
    a, b = "a" * 32, "b" * 32
    t = tickets.ticket(a)
    assert not tickets.redeem(b, t)  # bound to its job
    expires, nonce, sig = t.split(".")
    assert not tickets.redeem(a, f"{int(expires) + 1000}.{nonce}.{sig}")  # the expiry is signed
    assert tickets.redeem(a, t) and not tickets.redeem(a, t)  # single use
    assert tickets.session_ok(a, tickets.session(a)) and not tickets.session_ok(b, tickets.session(a))
    assert not tickets.session_ok(a, t)  # a ticket is not a session
    assert not Tickets().session_ok(a, tickets.session(a))  # another server's key
    expired = Tickets(ticket_seconds=-1, session_seconds=-1)
    assert not expired.redeem(a, expired.ticket(a)) and not expired.session_ok(a, expired.session(a))


def test_pacs_job_fetches_through_the_server_config(
    seg_run: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PACS transfer itself is tested against a real Orthanc in test_pacs_orthanc.py; here, the service's side:
    the client names only UIDs, the server uses its own config, and the results reference the pulled series."""
    import pydicom

    import dicom_synth
    from medlens.serve import pacs_run

    files = dicom_synth.write_mr_series(read_image(seg_image(seg_run)), tmp_path / "pacs")
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    calls: list[tuple[Any, ...]] = []

    def fake_pull(
        config: Any,
        study_uid: str,
        out_dir: Path,
        *,
        series_uid: Any = None,
        protocol: str = "",
        max_bytes: int | None = None,
    ) -> list[Path]:
        calls.append((config.url, study_uid, series_uid, protocol, max_bytes))
        out = []
        for f in files if study_uid == study else [huge_header(tmp_path / "huge.dcm", study_uid)]:
            out.append(Path(out_dir) / "series" / f.name)
            out[-1].parent.mkdir(parents=True, exist_ok=True)
            out[-1].write_bytes(f.read_bytes())
        return out

    monkeypatch.setattr(pacs_run, "pull", fake_pull)
    config = tmp_path / "pacs.toml"
    config.write_text('[dicomweb]\nurl = "http://127.0.0.1:9/dicom-web"\n')
    app = create_app(
        [seg_run[1]],
        names=["m"],
        token=None,
        threads=1,
        work_dir=tmp_path / "jobs",
        pacs_config=config,
        max_unpacked_mb=1,
    )
    with TestClient(app) as c:
        for bad in ({"study": "../../etc"}, {"study": study, "series": "1.2.x"}, {"series": "1.2"}):
            assert c.post("/models/m/jobs", json=bad).status_code == 422, bad
        r = c.post("/models/m/jobs", json={"study": study})
        assert r.status_code == 202 and r.json()["input"] == "pacs"
        status = wait_plain(c, r.json()["id"])
        # a study whose header claims gigabytes of (compressed) pixels: refused before decoding, 413 when waiting
        huge = c.post("/models/m/predict", json={"study": "1.2.3.4"})
        assert huge.status_code == 413 and "decoded pixel data" in huge.json()["detail"]
    assert status["state"] == "done", status["error"]
    assert calls == [
        ("http://127.0.0.1:9/dicom-web", study, None, "dicomweb", 2**20),  # the server's size budget
        ("http://127.0.0.1:9/dicom-web", "1.2.3.4", None, "dicomweb", 2**20),
    ]
    assert {"label.nii.gz", "result_seg.dcm", "result_sr.dcm"} <= {
        f["name"] for f in status["results"]["files"]
    }


def wait_plain(client: TestClient, job_id: str) -> dict[str, Any]:
    for _ in range(1500):
        status = client.get(f"/jobs/{job_id}").json()
        if status["state"] in ("done", "failed"):
            return dict(status)
        time.sleep(0.02)
    raise TimeoutError(job_id)


def huge_header(path: Path, study_uid: str | None = None) -> Path:
    """A header-only JPEG 2000 MR file claiming 65535 x 65535 pixels x 1000 frames x 2 bytes (about 8 TB)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEG2000Lossless, MRImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_claiming_huge_pixel_data_is_refused_with_413(
    client: TestClient, work: Path, tmp_path: Path
) -> None:
    before = _jobs_in(work)
    body = huge_header(tmp_path / "huge.dcm").read_bytes()
    r = client.post("/models/blobs/jobs", headers=AUTH, content=body)
    assert (
        r.status_code == 413 and "decoded pixel data" in r.json()["detail"] and "limit" in r.json()["detail"]
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.dcm", body)
    assert (
        client.post("/models/blobs/jobs", headers=AUTH, files={"file": ("s.zip", buf.getvalue())}).status_code
        == 413
    )
    assert _jobs_in(work) == before


def test_uploads_in_progress_hold_their_place_in_the_queue(client: TestClient, work: Path) -> None:
    """Capacity 2 (1 worker + max_queue 1): two uploads still arriving fill it; a third is refused at once."""
    import asyncio

    import httpx

    jobs = client.app.state.jobs  # type: ignore[attr-defined]
    before = _jobs_in(work)

    async def scenario() -> tuple[int, list[int], int]:
        gate = asyncio.Event()

        async def slow_body() -> Any:
            yield b"\0" * 1024
            await gate.wait()
            yield b"\0" * 1024

        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            uploads = [
                asyncio.create_task(ac.post("/models/blobs/jobs", headers=AUTH, content=slow_body()))
                for _ in range(2)
            ]
            for _ in range(500):  # until both uploads have their job folder (they are arriving)
                if len(_jobs_in(work) - before) == 2:
                    break
                await asyncio.sleep(0.01)
            third = await ac.post("/models/blobs/jobs", headers=AUTH, content=b"just text")
            gate.set()
            done = await asyncio.gather(*uploads)
            after = await ac.post("/models/blobs/jobs", headers=AUTH, content=b"just text")
        return third.status_code, [d.status_code for d in done], after.status_code

    third, uploads, after = asyncio.run(scenario())
    assert third == 429  # two uploads in progress already hold the capacity
    assert uploads == [400, 400]  # they finished (not an image) ...
    assert after == 400 and jobs.pending == 0  # ... and freed their places


def test_viewer_colour_range_reaches_the_largest_label_value(client: TestClient) -> None:
    """Labels {1, 5}: the overlay's range must end at 5, not at the number of classes (2)."""
    from functools import partial
    from types import SimpleNamespace

    from medlens.io import Image
    from medlens.serve.runner import ServedModel, run_job

    arr = np.zeros((1, 6, 5, 4), np.uint8)
    arr[0, :2], arr[0, 4:] = 1, 5

    class Predictor:
        def __init__(self) -> None:
            self.labels = {"background": 0, "liver": 1, "tumour": 5}

        def predict(self, image: Any, tta: bool = False, probabilities: bool = False) -> Any:
            return SimpleNamespace(label=image.with_array(arr), probabilities=None, seconds=0.0)

    model = ServedModel("fake", Path("."), "segmentation", Predictor(), {}, "torch")
    jobs = client.app.state.jobs  # type: ignore[attr-defined]
    job = jobs.new("blobs", "nifti")
    write_image(Image(np.ones((1, 6, 5, 4), np.float32), np.eye(4)), job.input_dir / "image.nii")
    jobs.submit(job, partial(run_job, model=model)).result(timeout=30)
    assert job.state == "done", job.error
    link = client.post(f"/jobs/{job.id}/viewer", headers=AUTH).json()["url"]
    client.get(link, follow_redirects=False)  # the ticket becomes the viewer cookie
    info = client.get(f"/viewer/{job.id}/status").json()
    assert info["state"] == "done" and info["max_label"] == 5
