"""Load test of ``medlens serve``: wrk drives concurrent NIfTI uploads at a small trained run on loopback.

It starts ``medlens serve`` on 127.0.0.1 (a free port, a random token), then runs ``wrk`` (Debian package
``wrk``) for a bounded time with N connections, each POSTing a 3D NIfTI volume to the synchronous
``/models/{name}/predict`` endpoint (upload, queue, sliding-window inference, label map written, JSON back).
A Lua script checks every answer: HTTP 200 *and* ``"state":"done"``; anything else is an error. It reports
throughput, p50/p99/max latency and errors, stops the server, and with ``--write`` records the numbers and the
command in its own section of bench/RESULTS.md (between ``<!-- serve-load -->`` markers).

Without ``--run`` it trains a tiny 3D blob run first (16x16x12 volumes, about 10 s) in bench/_work/serve_load/.
Traffic goes only to the loopback address; wrk stops by itself after ``--duration`` seconds. Not part of CI::

    apt-get install wrk
    .venv/bin/python bench/serve_load.py --duration 30 --connections 8 --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
WORK = HERE / "_work" / "serve_load"
START, END = "<!-- serve-load -->", "<!-- /serve-load -->"

LUA = r"""
-- POST one NIfTI volume to /predict; an answer counts only if it is HTTP 200 with "state":"done".
local f = assert(io.open("%(image)s", "rb"))
local body = f:read("*all")
f:close()
wrk.method = "POST"
wrk.path = "%(path)s"
wrk.body = body
wrk.headers["Authorization"] = "Bearer %(token)s"
wrk.headers["Content-Type"] = "application/octet-stream"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  bad = 0
end
function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"state":"done"', 1, true) then
    bad = bad + 1
  end
end
function done(summary, latency, requests)
  local total_bad = 0
  for _, t in ipairs(threads) do total_bad = total_bad + t:get("bad") end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_us": %%d, "bytes": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, ' ..
    '"max_us": %%d, "mean_us": %%.1f, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d, ' ..
    '"bad_answers": %%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout, total_bad))
end
"""


def tiny_run(root: Path) -> tuple[Path, Path]:
    """Train a small 3D segmentation run on synthetic blobs; returns (run dir, one test volume)."""
    import numpy as np
    import torch

    from medlens.data.dataset import Case, Dataset
    from medlens.data.fingerprint import compute_fingerprint
    from medlens.io import Image, write_image
    from medlens.plan.plan import Plan
    from medlens.plan.planner import make_plan
    from medlens.tasks.run import train

    torch.set_num_threads(1)
    run = root / "run"
    test_image = root / "test.nii.gz"
    if (run / "run.json").is_file() and test_image.is_file():
        return run, test_image
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    shape = (16, 16, 12)
    grid = np.indices(shape).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    cases = []
    for k in range(13):
        centre = [rng.uniform(0.35 * s, 0.65 * s) for s in shape]
        d = sum(((g - c) / (0.25 * s)) ** 2 for g, c, s in zip(grid, centre, shape, strict=True))
        label = (d <= 1.0).astype(np.uint8)
        image = rng.normal(0.0, 0.3, shape).astype(np.float32) + 100.0 + 2.0 * label
        if k == 12:
            write_image(Image(image[None], affine, modality="MR"), test_image)
            break
        write_image(
            Image(image[None], affine, modality="MR"), root / "ds" / "imagesTr" / f"case{k:02d}.nii.gz"
        )
        write_image(Image(label[None], affine), root / "ds" / "labelsTr" / f"case{k:02d}.nii.gz")
        cases.append(
            Case(
                id=f"case{k:02d}",
                image=[f"imagesTr/case{k:02d}.nii.gz"],
                label=f"labelsTr/case{k:02d}.nii.gz",
            )
        )
    ds = Dataset(root=root / "ds", name="blobs", task="segmentation", labels={"background": 0, "blob": 1},
                 channels={0: "T1"}, modalities={0: "MR"}, training=cases, test=[], ndim=3)  # fmt: skip
    ds.save()
    plan = make_plan(compute_fingerprint(ds), task="segmentation", budget="2m", measure=False,
                     overrides={"configurations": ["3d_fullres"], "iterations": 24, "precision": "fp32", "threads": 1})  # fmt: skip
    data = plan.to_dict()
    config = data["configurations"]["3d_fullres"]
    config["network"].update(channels=[8, 16, 32], strides=[2, 2])
    config["training"].update(val_every=24, checkpoint_every=24)
    plan_path = Plan.from_dict(data).save(root / "plan.json")
    train(ds.root, plan_path, run, fold=0, n_folds=3, progress=False, device="cpu")
    return run, test_image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"medlens serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("medlens serve did not become healthy")


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if args.run is None:
        run, image = tiny_run(WORK)
    else:
        run, image = Path(args.run), Path(args.image)
    token = secrets.token_urlsafe(24)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    medlens = Path(sys.executable).parent / "medlens"
    cmd = [str(medlens), "--quiet", "serve", f"bench={run}", "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(args.workers), "--backend", args.backend]  # fmt: skip
    env = {**os.environ, "MEDLENS_SERVE_TOKEN": token}
    WORK.mkdir(parents=True, exist_ok=True)
    log = open(WORK / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(base, server)
        script = WORK / "predict.lua"
        script.write_text(LUA % {"image": image.resolve(), "path": "/models/bench/predict", "token": token})
        warm = urllib.request.Request(base + "/models/bench/predict", data=image.read_bytes(), method="POST",
                                      headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        with urllib.request.urlopen(
            warm, timeout=60
        ) as r:  # first request: lazy imports, ONNX session warm-up
            if json.loads(r.read())["state"] != "done":
                raise SystemExit("the warm-up request did not finish its job")
        load_before = os.getloadavg()
        wrk = [
            "wrk", "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{args.duration}s",
            "--timeout", "20s", "-s", str(script), base,
        ]  # fmt: skip
        out = subprocess.run(
            wrk, capture_output=True, text=True, timeout=args.duration + 60, check=True
        ).stdout
        load_after = os.getloadavg()
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            health = json.loads(r.read())
        backend = _backend(base, token)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    match = re.search(r"^RESULT (\{.*\})$", out, re.M)
    if match is None:
        raise SystemExit(f"wrk printed no result:\n{out}")
    res = json.loads(match.group(1))
    errors = sum(res[k] for k in ("connect", "read", "write", "status", "timeout", "bad_answers"))
    return {
        **res,
        "errors": errors,
        "rps": res["requests"] / (res["duration_us"] / 1e6),
        "wrk_command": " ".join([*wrk[:-3], "-s", "predict.lua", base]),
        "server_command": " ".join(["medlens", "serve", "bench=RUN", *cmd[4:]]),
        "image_bytes": image.stat().st_size,
        "backend": backend,
        "load_before": load_before,
        "load_after": load_after,
        "health_after": health,
        "args": vars(args),
    }


def _backend(base: str, token: str) -> str:
    try:
        req = urllib.request.Request(base + "/models", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return str(json.loads(r.read())["models"][0]["backend"])
    except OSError:
        return "?"


def section(r: dict[str, Any], command: str) -> str:
    import torch

    ms = {k: r[k] / 1000 for k in ("p50_us", "p90_us", "p99_us", "max_us", "mean_us")}
    la, lb = r["load_before"], r["load_after"]
    return (
        f"{START}\n## Inference service under load (bench/serve_load.py)\n\n"
        f"Command: `{command}`\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; torch {torch.__version__}, Python {platform.python_version()}. Load average "
        f"{la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} before and {lb[0]:.1f}/{lb[1]:.1f}/{lb[2]:.1f} after (other engineers' "
        "work shared the 2 cores, and wrk itself runs on them).\n\n"
        f"Server: `{r['server_command']}` (loopback only, token auth on, {r['backend']} backend, torch/ORT threads "
        f"= cores - 1). Client: `{r['wrk_command']}`: every request uploads a {r['image_bytes']} B 16x16x12 NIfTI "
        "volume to the synchronous `POST /models/bench/predict` (stream to disk, queue, sliding-window inference "
        "with a 2-level 3D U-Net, label map + result.json written, JSON answer); an answer counts only if it is "
        'HTTP 200 with `"state":"done"`.\n\n'
        "| connections | duration | requests | throughput | p50 | p90 | p99 | max | errors |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| {r['args']['connections']} | {r['duration_us'] / 1e6:.1f} s | {r['requests']} | {r['rps']:.1f} req/s | "
        f"{ms['p50_us']:.1f} ms | {ms['p90_us']:.1f} ms | {ms['p99_us']:.1f} ms | {ms['max_us']:.1f} ms | "
        f"{r['errors']} |\n\n"
        f"Errors counted: socket connect/read/write {r['connect']}/{r['read']}/{r['write']}, timeouts {r['timeout']}, "
        f"non-2xx {r['status']}, answers without a finished job {r['bad_answers']}. With one worker the jobs run one "
        "at a time (one lock per model), so latency is mostly queueing: about connections / throughput.\n"
        f"{END}\n"
    )


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace this benchmark's section of RESULTS.md (between its markers), or append it."""
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END) + 1 :]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="A trained segmentation run (default: train a tiny one).")
    parser.add_argument("--image", help="The NIfTI volume to upload (with --run).")
    parser.add_argument("--duration", type=int, default=30, help="Seconds of load.")
    parser.add_argument("--connections", type=int, default=8, help="Concurrent connections.")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads.")
    parser.add_argument("--workers", type=int, default=1, help="Server worker threads.")
    parser.add_argument("--backend", default="auto", help="auto, torch or onnx.")
    parser.add_argument("--write", action="store_true", help="Record the result in bench/RESULTS.md.")
    args = parser.parse_args()
    if args.run and not args.image:
        parser.error("--run needs --image")
    result = run_load(args)
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=2, default=str))
    command = "python bench/serve_load.py " + " ".join(sys.argv[1:])
    if args.write:
        write_section(section(result, command.replace("python ", ".venv/bin/python ", 1)))
        print(f"wrote {RESULTS}")
    if result["errors"]:
        raise SystemExit(f"{result['errors']} errors under load")


if __name__ == "__main__":
    main()
