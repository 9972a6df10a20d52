"""The service's web viewer: a job's image with its segmentation and uncertainty overlays, drawn by NiiVue.

NiiVue (``@niivue/niivue`` from npm) is installed by ``make install`` into ``viewer/node_modules`` beside the
source tree and served by the app from ``/static/niivue/niivue.umd.js``: a browser never fetches anything from
the internet. The page (``index.html``, ``viewer.js``, ``viewer.css`` in this folder) loads only from this
server, which a Content-Security-Policy enforces.

Authentication: a browser cannot add a Bearer header to a link, and a long-lived token in a URL would end up in
histories and access logs. So an API client asks ``POST /jobs/{id}/viewer`` (with its token) for a link carrying a
ticket that is single-use, valid two minutes and bound to that job; opening it sets an HttpOnly, SameSite=Lax
cookie for that job's viewer only (path ``/viewer/{id}``, one hour) and redirects to the bare URL, so the ticket
leaves the address bar at once. The viewer's own routes (page, status, image files) accept only that cookie and
only read. (Lax, not Strict: a link opened from another site, e.g. a PACS front end, is a cross-site navigation,
and a Strict cookie set on its redirect would not be sent with the redirected request.)
"""

from __future__ import annotations

import os
from pathlib import Path
from string import Template
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from medlens.serve.jobs import Job, JobManager
from medlens.serve.security import Tickets

HERE = Path(__file__).parent
COOKIE = "medlens_viewer"
#: The only files the viewer may fetch (and only those a job published).
VIEWABLE = ("image.nii.gz", "label.nii.gz", "uncertainty.nii.gz")
STATIC = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
NIIVUE = "@niivue/niivue/dist/niivue.umd.js"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self' blob: data:; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def find_modules(explicit: Path | None = None) -> Path | None:
    """The ``node_modules`` folder holding NiiVue: ``explicit``, ``$MEDLENS_VIEWER_MODULES``, or ``viewer/
    node_modules`` in the source tree (where ``make install`` runs ``npm ci``); None when none has it."""
    candidates = [explicit] if explicit is not None else []
    if os.environ.get("MEDLENS_VIEWER_MODULES"):
        candidates.append(Path(os.environ["MEDLENS_VIEWER_MODULES"]))
    candidates.append(HERE.parents[3] / "viewer" / "node_modules")
    for c in candidates:
        if c is not None and (c / NIIVUE).is_file():
            return c
    return None


def add_viewer(
    app: FastAPI, jobs: JobManager, tickets: Tickets, *, auth_required: bool, modules: Path | None = None
) -> None:
    """Register the viewer's routes on ``app`` (hidden from the OpenAPI schema: they are for browsers)."""
    niivue = find_modules(modules)
    page = Template((HERE / "index.html").read_text(encoding="utf-8"))

    def job_for_browser(request: Request, job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        if auth_required and not tickets.session_ok(job.id, request.cookies.get(COOKIE)):
            raise HTTPException(401, f"open the viewer with a link from POST /jobs/{job.id}/viewer")
        return job

    @app.get("/viewer/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def viewer_page(request: Request, job_id: str, ticket: str | None = None) -> Response:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        if auth_required and ticket is not None:
            if not tickets.redeem(job.id, ticket):
                raise HTTPException(
                    401, "this viewer link has expired or was already used; ask for a new one"
                )
            response: Response = RedirectResponse(f"/viewer/{job.id}", status_code=303)
            response.set_cookie(
                COOKIE,
                tickets.session(job.id),
                max_age=int(tickets.session_seconds),
                path=f"/viewer/{job.id}",
                httponly=True,
                samesite="lax",
                secure=request.url.scheme == "https",
            )
            return response
        job_for_browser(request, job_id)
        if niivue is None:
            raise HTTPException(
                503, "the viewer's NiiVue is not installed: run 'make install' (npm ci in viewer/)"
            )
        html = page.substitute(job=job.id)  # a validated 32-hex id: nothing to escape
        return HTMLResponse(html, headers=_headers())

    @app.get("/viewer/{job_id}/status", include_in_schema=False)
    def viewer_status(request: Request, job_id: str) -> JSONResponse:
        job = job_for_browser(request, job_id)
        info: dict[str, Any] = {"state": job.state, "model": job.model, "error": job.error, "files": []}
        if job.state == "done":
            info["files"] = [n for n in VIEWABLE if n in job.files]
            info["max_label"] = max_label(job.result)
            info["refer"] = job.result.get("refer")
        return JSONResponse(info, headers=_headers())

    @app.get("/viewer/{job_id}/files/{name}", include_in_schema=False)
    def viewer_file(request: Request, job_id: str, name: str) -> FileResponse:
        job = job_for_browser(request, job_id)
        path = job.file(name) if name in VIEWABLE else None
        if path is None:
            raise HTTPException(404, "no such file")
        return FileResponse(path, media_type="application/gzip", headers=_headers())

    @app.get("/static/viewer/{name}", include_in_schema=False)
    def viewer_static(name: str) -> FileResponse:
        if name not in STATIC:
            raise HTTPException(404, "no such file")
        return FileResponse(HERE / name, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/static/niivue/niivue.umd.js", include_in_schema=False)
    def niivue_js() -> FileResponse:
        if niivue is None:
            raise HTTPException(503, "NiiVue is not installed: run 'make install' (npm ci in viewer/)")
        return FileResponse(niivue / NIIVUE, media_type="text/javascript")


def max_label(result: dict[str, Any]) -> int:
    """The largest label value of a job's label map (the top of the overlay's colour range), at least 1.

    The job records it (``max_label``); the count of named classes is no substitute: labels {1, 5} would put
    label 5 past a colour range ending at 2. Results from before that was recorded fall back to the count.
    """
    value = result.get("max_label")
    if isinstance(value, int) and not isinstance(value, bool):
        return max(1, value)
    return max(1, len(result.get("volumes_ml") or {}))


def _headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
