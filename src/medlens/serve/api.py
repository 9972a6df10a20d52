"""The inference service: ``create_app(runs, token=...)`` is a FastAPI app serving one or more trained runs.

Endpoints (the OpenAPI schema at ``/openapi.json`` documents each; every one but ``/health`` needs
``Authorization: Bearer <token>`` unless the app was made with ``token=None``):

- ``GET /health``; ``GET /models``; ``GET /models/{name}/card``
- ``POST /models/{name}/jobs``: a NIfTI file (``.nii``/``.nii.gz``), one DICOM file or a zip of a DICOM series,
  sent as multipart form field ``file`` or as the raw body; or JSON ``{"study": UID, "series": UID}`` to fetch it
  from the PACS configured on the server. Answers 202 with the job; 413 past the size limits, 429 when the queue
  (running, queued and still-uploading jobs) is full.
- ``POST /models/{name}/predict``: the same, but waits for the result (for scripts and the load test); 413 also
  when a PACS study or a DICOM series' decoded pixel data turns out to pass the limit while the job runs.
- ``GET /jobs/{id}``; ``GET /jobs/{id}/files/{name}`` (only the names the job lists); ``POST /jobs/{id}/viewer``
  (a one-time link to the web viewer, :mod:`medlens.serve.viewer`).

The interactive docs (Swagger UI) are off: they load their scripts from a CDN, and the service never makes a
browser fetch anything from the internet.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from medlens.errors import InputError, MedlensError
from medlens.serve import schemas as s
from medlens.serve.jobs import RESULT_FILES, Job, JobManager, QueueFull
from medlens.serve.runner import (
    ServedModel,
    load_models,
    model_card,
    prepare_upload,
    result_media_type,
    run_job,
)
from medlens.serve.security import (
    BadUpload,
    Tickets,
    TooLarge,
    check_declared_length,
    save_body,
    save_multipart_file,
    token_matches,
)

log = logging.getLogger(__name__)

_UPLOAD_BODY = {
    "description": "The image: NIfTI (.nii or .nii.gz), one DICOM file, or a zip of one DICOM series; or JSON "
    "naming a study in the server's PACS. Client file names are ignored.",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"$ref": "#/components/schemas/PacsJobRequest"}},
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": s.Problem, "description": "Missing or wrong Bearer token."},
    404: {"model": s.Problem, "description": "No such model or job."},
}
_UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    400: {"model": s.Problem, "description": "Not an image the service reads."},
    413: {"model": s.Problem, "description": "The upload or its unpacked content is too large."},
    422: {"model": s.Problem, "description": "A parameter is invalid."},
    429: {"model": s.Problem, "description": "The job queue is full; retry after Retry-After seconds."},
}


def create_app(
    runs: list[Path],
    *,
    token: str | None,
    names: list[str] | None = None,
    max_upload_mb: float = 512,
    max_unpacked_mb: float = 2048,
    workers: int = 1,
    backend: str = "auto",
    max_queue: int = 16,
    threads: int | None = None,
    work_dir: Path | None = None,
    pacs_config: Path | None = None,
    keep_jobs: int = 200,
    viewer_modules: Path | None = None,
) -> FastAPI:
    """Build the service for ``runs`` (each served under its folder's name).

    Args:
        runs: trained run directories (loaded once, from safetensors and JSON only).
        names: the models' names in the API (default: the run folders' names).
        token: the Bearer token every request but /health must carry; None disables authentication (the CLI
            allows that only on a loopback address).
        max_upload_mb: largest accepted upload (streamed to disk and stopped there: HTTP 413).
        max_unpacked_mb: largest accepted unpacked content: of a zip or gzip upload, of the instances a PACS job
            retrieves, and of the decoded pixel data of a DICOM series (HTTP 413).
        workers: worker threads running jobs.
        backend: "auto", "torch" or "onnx" (ONNX Runtime).
        max_queue: jobs that may wait beyond the running ones (more: HTTP 429).
        threads: CPU threads per job for PyTorch and ONNX Runtime; default: the cores left after one for the
            web server, shared among the workers (two busy torch threads on two cores collapse as soon as
            anything else needs a core).
        work_dir: where job folders go (default: a temporary folder removed at shutdown).
        pacs_config: PACS config file (see :mod:`medlens.serve.pacs_config`) for jobs naming a study.
        keep_jobs: finished jobs kept before the oldest are deleted.
        viewer_modules: the viewer's ``node_modules`` (default: found next to the source tree, see
            :func:`medlens.serve.viewer.find_modules`).
    """
    from medlens.engine.runtime import available_cores, configure_threads
    from medlens.serve.viewer import add_viewer

    for label, value in (("max_upload_mb", max_upload_mb), ("max_unpacked_mb", max_unpacked_mb)):
        if not value > 0:
            raise InputError(f"{label} must be positive, got {value!r}")
    if token is not None and len(token) < 16:
        raise InputError("the API token must have at least 16 characters")
    n_threads = threads or max(1, (available_cores() - 1) // max(1, workers))
    configure_threads(n_threads)
    pacs = None
    if pacs_config is not None:
        from medlens.serve.pacs_config import load_pacs_config

        pacs = load_pacs_config(pacs_config)
    models = load_models([Path(r) for r in runs], names=names, backend=backend, threads=n_threads)
    own_dir = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="medlens-serve-")) if work_dir is None else Path(work_dir)
    jobs = JobManager(root, workers=workers, max_queue=max_queue, keep=keep_jobs)
    max_upload, max_unpacked = int(max_upload_mb * 2**20), int(max_unpacked_mb * 2**20)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.shutdown()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)

    app = FastAPI(
        title="medlens inference service",
        version="1",
        description=__doc__,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.jobs, app.state.models, app.state.tickets = jobs, models, Tickets()
    bearer_scheme = HTTPBearer(auto_error=False, description="The server's API token.")

    def authorised(creds: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> None:
        if token is None:
            return
        if creds is None or not token_matches(creds.credentials, token):
            raise HTTPException(401, "missing or wrong Bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorised)]

    def served(name: str) -> ServedModel:
        if name not in models:
            raise HTTPException(404, f"no model named {name!r} (GET /models lists them)")
        return models[name]

    def job_or_404(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    for exc_type, status in ((TooLarge, 413), (BadUpload, 400), (QueueFull, 429), (InputError, 422)):
        app.add_exception_handler(exc_type, partial(_problem, status))

    @app.get("/health", response_model=s.Health, summary="Liveness (no authentication)")
    def health() -> s.Health:
        return s.Health(
            status="ok", models=len(models), active_jobs=jobs.active, capacity=jobs.workers + jobs.max_queue
        )

    @app.get(
        "/models", response_model=s.ModelList, dependencies=auth, responses=_ERRORS, summary="Served models"
    )
    def list_models() -> s.ModelList:
        return s.ModelList(models=[_model_info(m) for m in models.values()])

    @app.get("/models/{name}/card", response_model=s.ModelCard, dependencies=auth, responses=_ERRORS,
             summary="A model's card")  # fmt: skip
    def card(name: str) -> s.ModelCard:
        data = model_card(served(name))
        return s.ModelCard(source=str(data.pop("source")), card=data)

    async def submit(request: Request, model: ServedModel, options: dict[str, Any]) -> tuple[Job, Any]:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        if media == "application/json":
            if pacs is None:
                raise InputError("this server has no PACS configured (start it with --pacs-config FILE)")
            check_declared_length(request.headers.get("content-length"), 65536)
            raw = await _read_small(request, 65536)
            try:
                req = s.PacsJobRequest.model_validate_json(raw)
            except ValidationError as exc:
                raise HTTPException(422, f"invalid PACS job request: {exc.errors()[0]['msg']}") from None
            from medlens.serve.pacs_config import check_uid

            options.update(study=check_uid(req.study, "study"), series=req.series)
            if req.series:
                check_uid(req.series, "series")
            job = jobs.new(model.name, "pacs", options)
        else:
            check_declared_length(request.headers.get("content-length"), max_upload)
            job = jobs.new(model.name, "upload", options)
            try:
                upload = job.input_dir / "upload.bin"
                if media == "multipart/form-data":
                    await save_multipart_file(request.stream(), ctype, upload, max_upload)
                else:
                    await save_body(request.stream(), upload, max_upload)
                job.kind = await run_in_threadpool(prepare_upload, job, upload, max_unpacked)
            except BaseException:
                jobs.discard(job)
                raise
        future = jobs.submit(job, partial(run_job, model=model, pacs=pacs, max_unpacked=max_unpacked))
        return job, future

    def job_options(
        tta: bool = Query(False, description="Mirroring test-time augmentation (slower)."),
        probabilities: bool = Query(
            False, description="Also write per-class probability maps (segmentation)."
        ),
        uncertainty: bool = Query(
            False, description="Also estimate uncertainty and the refer flag, if the model can."
        ),
        series: str | None = Query(
            None, description="SeriesInstanceUID to use from a zip holding several series."
        ),
    ) -> dict[str, Any]:
        if series is not None:
            from medlens.serve.pacs_config import check_uid

            check_uid(series, "series")
        return {"tta": tta, "probabilities": probabilities, "uncertainty": uncertainty, "series": series}

    async def start_job(name: str, request: Request, options: dict[str, Any], *, wait: bool) -> s.JobStatus:
        """Queue a job for model ``name``; with ``wait``, answer once it finished (413 if its input was too big)."""
        job, future = await submit(request, served(name), options)
        if wait:
            await asyncio.wrap_future(future)
            if job.failure is not None and issubclass(job.failure, TooLarge):
                raise TooLarge(job.error or "the job's input is larger than the server accepts")
        return _status(job)

    @app.post("/models/{name}/jobs", status_code=202, response_model=s.JobStatus, dependencies=auth,
              responses=_UPLOAD_ERRORS, openapi_extra={"requestBody": _UPLOAD_BODY},
              summary="Start a prediction job")  # fmt: skip
    async def create_job(
        name: str, request: Request, options: dict[str, Any] = Depends(job_options)
    ) -> s.JobStatus:
        return await start_job(name, request, options, wait=False)

    @app.post("/models/{name}/predict", response_model=s.JobStatus, dependencies=auth, responses=_UPLOAD_ERRORS,
              openapi_extra={"requestBody": _UPLOAD_BODY}, summary="Predict and wait for the result")  # fmt: skip
    async def predict(
        name: str, request: Request, options: dict[str, Any] = Depends(job_options)
    ) -> s.JobStatus:
        return await start_job(name, request, options, wait=True)

    @app.get("/jobs/{job_id}", response_model=s.JobStatus, dependencies=auth, responses=_ERRORS,
             summary="A job's state and results")  # fmt: skip
    def job_status(job_id: str) -> s.JobStatus:
        return _status(job_or_404(job_id))

    @app.get("/jobs/{job_id}/files/{name}", dependencies=auth, responses=_ERRORS, response_class=FileResponse,
             summary="Download a result file")  # fmt: skip
    def job_file(job_id: str, name: str) -> FileResponse:
        path = job_or_404(job_id).file(name)  # a lookup among the job's own results, never a path join
        if path is None:
            raise HTTPException(404, "no such result file")
        return FileResponse(path, media_type=result_media_type(name), filename=name)

    @app.post("/jobs/{job_id}/viewer", response_model=s.ViewerLink, dependencies=auth, responses=_ERRORS,
              summary="A one-time link to the job's web viewer")  # fmt: skip
    def viewer_link(job_id: str) -> s.ViewerLink:
        job = job_or_404(job_id)
        tickets: Tickets = app.state.tickets
        return s.ViewerLink(
            url=f"/viewer/{job.id}?ticket={tickets.ticket(job.id)}", expires_in=int(tickets.ticket_seconds)
        )

    add_viewer(app, jobs, app.state.tickets, auth_required=token is not None, modules=viewer_modules)
    return app


async def _read_small(request: Request, limit: int) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"a JSON request body is limited to {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _problem(status: int, request: Request, exc: Exception) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    message = str(exc) if isinstance(exc, MedlensError) else "error"
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _model_info(m: ServedModel) -> s.ModelInfo:
    ds = m.info.get("dataset") or {}
    names = list(getattr(m.predictor, "class_names", []) or [])
    return s.ModelInfo(
        name=m.name,
        task=m.task,
        backend=m.backend,
        labels=names,
        ndim=ds.get("ndim"),
        channels=[str(v) for _, v in sorted((ds.get("channels") or {}).items(), key=lambda kv: int(kv[0]))],
        uncertainty=m.supports_uncertainty,
    )


def _status(job: Job) -> s.JobStatus:
    results = None
    if job.state == "done":
        files = [
            s.ResultFile(
                name=n,
                url=f"/jobs/{job.id}/files/{n}",
                media_type=result_media_type(n),
                bytes=p.stat().st_size,
                description=RESULT_FILES.get(
                    n, ("", "DICOM result (SEG or SR) referencing the input series")
                )[1],
            )
            for n, p in job.files.items()
        ]
        r = job.result
        results = s.JobResults(
            files=files,
            label_map=f"/jobs/{job.id}/files/label.nii.gz" if "label.nii.gz" in job.files else None,
            **{k: r.get(k) for k in ("volumes_ml", "probabilities", "prediction", "labels", "grade", "threshold",
                                     "uncertainty", "refer", "seconds")},
        )  # fmt: skip
    return s.JobStatus(
        id=job.id,
        model=job.model,
        input=job.kind if job.kind in ("nifti", "dicom", "pacs") else "nifti",  # type: ignore[arg-type]
        state=job.state,  # type: ignore[arg-type]
        error=job.error,
        created=job.created,
        started=job.started,
        finished=job.finished,
        status_url=f"/jobs/{job.id}",
        results=results,
    )
