"""``medlens serve``: the inference service (FastAPI + uvicorn) with its web viewer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from medlens.cli._app import _echo, app

log = logging.getLogger("medlens")


@app.command()
def serve(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="Run directories to serve, each as RUN or NAME=RUN (default name: the folder's)."
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="MEDLENS_SERVE_TOKEN",
            help="API token clients send as 'Authorization: Bearer TOKEN' (better: set MEDLENS_SERVE_TOKEN; "
            "default: a new random token, printed once).",
            show_envvar=True,
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No authentication (allowed only on a loopback address).")
    ] = False,
    workers: Annotated[int, typer.Option(help="Worker threads running jobs.")] = 1,
    queue: Annotated[
        int, typer.Option(help="Jobs that may wait beyond the running ones (more: HTTP 429).")
    ] = 16,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads per job (default: cores minus one, shared by the workers)."),
    ] = None,
    backend: Annotated[str, typer.Option(help="auto, torch or onnx (ONNX Runtime).")] = "auto",
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, MB.")] = 512,
    max_unpacked_mb: Annotated[float, typer.Option(help="Largest unpacked zip/gzip content, MB.")] = 2048,
    work_dir: Annotated[
        Path | None, typer.Option(help="Folder for job files (default: a temporary folder removed at exit).")
    ] = None,
    pacs_config: Annotated[
        Path | None, typer.Option(help="PACS config file (TOML/JSON) for jobs that name a study.")
    ] = None,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve trained runs over HTTP: jobs on NIfTI/DICOM uploads or PACS studies, results, a web viewer.

    Example: MEDLENS_SERVE_TOKEN=... medlens serve runs/brain runs/lesion --port 8000
    """
    import uvicorn

    from medlens.errors import InputError
    from medlens.serve.api import create_app
    from medlens.serve.security import is_loopback, new_token

    paths, names = [], []
    for spec in runs:
        name, sep, path = spec.partition("=")
        paths.append(Path(path if sep else spec))
        names.append(name if sep else Path(spec).absolute().name)
    if no_auth:
        if token:
            raise InputError("--no-auth and a token (--token or MEDLENS_SERVE_TOKEN) contradict each other")
        if not is_loopback(host):
            raise InputError(
                f"--no-auth is allowed only on a loopback address (127.0.0.1, ::1), not {host!r}"
            )
        log.warning("authentication is OFF: anyone who can reach %s:%d can use the service", host, port)
    generated = not no_auth and not token
    api_token = None if no_auth else (token or new_token())
    application = create_app(
        paths,
        names=names,
        token=api_token,
        max_upload_mb=max_upload_mb,
        max_unpacked_mb=max_unpacked_mb,
        workers=workers,
        backend=backend,
        max_queue=queue,
        threads=threads,
        work_dir=work_dir,
        pacs_config=pacs_config,
    )
    if generated:
        _echo(f"API token (shown once; clients send 'Authorization: Bearer TOKEN'): {api_token}")
    shown = f"[{host}]" if ":" in host else host
    _echo(f"serving {', '.join(names)} on http://{shown}:{port} (schema: /openapi.json)")
    uvicorn.run(application, host=host, port=port, log_level="info", access_log=access_log)
