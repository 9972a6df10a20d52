"""Segmentation benchmark: medlens vs nnU-Net v2 vs the MONAI tutorial loop, same data, split and budget.

Usage (from the repository root; see README.md next to this file)::

    .venv/bin/python bench/segmentation/run.py --budget 10m
    .venv/bin/python bench/segmentation/run.py --budget 2m --peers nnunet,monai      # a quick end-to-end check

One run builds the ``brain-tissue`` sample dataset, takes fold 0 of medlens' 5-fold split
(``make_folds(dataset, 5, seed=0)``) as every peer's train/validation split, then runs the peers one after
another, each with the same wall-clock training budget, each in its own measured subprocesses; scores every
peer's predictions of the held-out ``test`` cases in their original geometry with the same function
(``medlens.evaluate.segmentation_metrics``); and prints one table with ratios to medlens. ``--record`` writes
the result into ``bench/RESULTS.md`` (its segmentation section).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report
import peer_medlens
import peer_monai
import peer_nnunet
from _common import Context, PeerResult, require
from _measure import run_measured

log = logging.getLogger("bench.segmentation")

REPO = Path(__file__).resolve().parents[2]
PEERS = ("medlens", "nnunet", "monai")
RESULTS_MD = REPO / "bench" / "RESULTS.md"
SECTION_START = "<!-- segmentation:start (written by bench/segmentation/run.py --record) -->"
SECTION_END = "<!-- segmentation:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--budget", default="10m", help="wall-clock training budget per peer (90s, 10m, 1h; default 10m)"
    )
    p.add_argument(
        "--subjects", type=int, default=24, help="simulated subjects (one in four is test; default 24)"
    )
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {', '.join(PEERS)}")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "_work", help="scratch folder (git-ignored)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--record", action="store_true", help="write the result into bench/RESULTS.md")
    p.add_argument(
        "--quiet-wait",
        default="0",
        help="before each peer, wait up to this long (e.g. 10m) for the 1-minute load to fall below --quiet-load",
    )
    p.add_argument(
        "--quiet-load", type=float, default=1.0, help="load average counted as quiet (default 1.0)"
    )
    p.add_argument("--nnunet-config", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument(
        "--nnunet-iters-per-epoch", type=int, default=2, help="training iterations per nnU-Net epoch"
    )
    p.add_argument("--nnunet-val-iters", type=int, default=1, help="pseudo-Dice iterations per nnU-Net epoch")
    p.add_argument("--nnunet-package", default="nnunetv2==2.8.1", help="pip requirement for nnU-Net")
    p.add_argument("--monai-workers", type=int, default=4, help="MONAI loop data workers (tutorial: 4)")
    args = p.parse_args(argv)
    args.peer_list = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in args.peer_list if s not in PEERS]
    if unknown or not args.peer_list:
        p.error(f"--peers {args.peers!r}: choose from {', '.join(PEERS)}")
    from medlens.errors import InputError
    from medlens.plan.budget import parse_budget

    for flag, value in (("--budget", args.budget), ("--quiet-wait", args.quiet_wait)):
        try:
            if not (flag == "--quiet-wait" and value in ("0", "")):
                parse_budget(value)
        except InputError as e:
            p.error(f"{flag}: {e}")
    if args.subjects < 8:
        p.error(
            f"--subjects {args.subjects}: at least 8 (5 folds need 5 training subjects, and 1 in 4 is test)"
        )
    return args


def build_dataset(args: argparse.Namespace, root: Path, medlens: str) -> tuple[Path, dict[str, Any]]:
    """Build (or reuse, when it was made with the same subjects and seed) the brain-tissue dataset."""
    data = root / "data"
    meta = data / "dataset.json"
    if meta.is_file():
        sample = json.loads(meta.read_text()).get("sample", {})
        if sample.get("subjects") == args.subjects and sample.get("seed") == args.seed:
            log.info("reusing the dataset %s", data)
            return data, {}
    m = require(
        run_measured(
            [
                medlens,
                "sample",
                "brain-tissue",
                "--out",
                str(data),
                "--subjects",
                str(args.subjects),
                "--seed",
                str(args.seed),
                "--overwrite",
            ],
            log_path=root / "logs" / "sample.log",
            timeout=1800,
        ),
        "medlens sample",
    )
    return data, {"sample": m.to_json()}


def make_context(args: argparse.Namespace, root: Path, data: Path, medlens: str) -> Context:
    from medlens.data.dataset import load_dataset
    from medlens.data.splits import make_folds
    from medlens.plan.budget import parse_budget

    ds = load_dataset(data)
    folds = make_folds(ds, 5, seed=0)
    f0 = folds[0]
    return Context(
        dataset_dir=data,
        work=root,
        budget_s=parse_budget(args.budget),
        budget_text=args.budget,
        train_ids=f0.train,
        val_ids=f0.val,
        folds=[{"train": list(f.train), "val": list(f.val)} for f in folds],
        test_ids=f0.test,
        labels=dict(ds.labels),
        python=sys.executable,
        medlens=medlens,
    )


def machine() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", lscpu, re.M)
            if m:
                info[key] = m.group(1).strip()
        info["avx512_bf16"] = "avx512_bf16" in lscpu
    except (OSError, subprocess.SubprocessError):
        pass
    info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    import monai
    import torch

    import medlens

    info["versions"] = {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "medlens": medlens.__version__,
    }
    return info


def wait_quiet(max_wait: float, threshold: float) -> None:
    """Wait (at most ``max_wait`` s) until the 1-minute load average is below ``threshold``."""
    import time

    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        log.info("load %.2f >= %.2f: waiting for a quieter machine", os.getloadavg()[0], threshold)
        time.sleep(min(30.0, max(deadline - time.monotonic(), 0.0)))


def run_peer(name: str, ctx: Context, args: argparse.Namespace) -> PeerResult:
    from medlens.plan.budget import parse_budget

    if args.quiet_wait not in ("0", ""):
        wait_quiet(parse_budget(args.quiet_wait), args.quiet_load)
    log.info("=== peer %s (load %.2f) ===", name, os.getloadavg()[0])
    if name == "medlens":
        return peer_medlens.run(ctx)
    if name == "nnunet":
        return peer_nnunet.run(
            ctx,
            configuration=args.nnunet_config,
            iters_per_epoch=args.nnunet_iters_per_epoch,
            val_iters=args.nnunet_val_iters,
            package=args.nnunet_package,
            venv=args.work / "nnunet-venv",
        )
    return peer_monai.run(ctx, workers=args.monai_workers)


def render(
    command: str,
    ctx: Context,
    info: dict[str, Any],
    results: list[PeerResult],
    scores: dict[str, dict[str, Any]],
    started: str,
) -> str:
    names = [n for n, v in sorted(ctx.labels.items(), key=lambda kv: kv[1]) if v != 0]
    rws = _report.rows(results, scores, len(ctx.test_ids))
    loads = "; ".join(
        f"{r.title}: training {r.train.load_mean:.1f} (max {r.train.load_max:.1f})"
        + (f", prediction {r.predict.load_mean:.1f} (max {r.predict.load_max:.1f})" if r.predict else "")
        for r in results
        if r.train is not None
    )
    lines = [
        f"Run {started}: budget {ctx.budget_text} ({ctx.budget_s:.0f} s) of training wall-clock per peer; "
        f"{len(ctx.train_ids)} training + {len(ctx.val_ids)} validation cases (fold 0 of "
        f"make_folds(dataset, 5, seed=0)), scored on {len(ctx.test_ids)} test cases.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs, {info.get('memory_gb', '?')} GiB, "
        f"{info.get('Hypervisor vendor', 'no')} hypervisor; versions {json.dumps(info.get('versions', {}))}. "
        "1-minute load average while each peer ran (its own 2 busy threads count about 2; more means other "
        f"work shared the cores): {loads or 'n/a'}.",
        "",
        _report.table(rws, names),
        "",
        _report.ratio_table(rws),
        "",
        "Targets (issue 3, section 7):",
        "",
        *[f"- {t}" for t in _report.targets(rws)],
        "",
        "Per peer:",
        "",
    ]
    for r in results:
        s = scores.get(r.peer, {})
        prep = ", ".join(f"{k} {m.seconds:.0f} s" for k, m in r.prepare.items())
        budget = r.extra.get("budget_s")
        given = f" (training budget {budget:.0f} s)" if isinstance(budget, float | int) else ""
        untimed = [f"untimed preparation: {prep}"] if prep else []
        lines.append(f"- {r.title}{given}: " + "; ".join([*r.notes, *untimed]))
        if s.get("hd95_undefined"):
            lines.append(
                f"  - HD95 undefined (a class missed entirely) in {s['hd95_undefined']} case-classes"
            )
        for problem in s.get("problems", []):
            lines.append(f"  - scoring problem: {problem}")
        if r.error:
            lines.append(f"  - FAILED: {r.error.splitlines()[0]}")
    return "\n".join(lines) + "\n"


def record(section_body: str) -> None:
    """Replace (or append) the segmentation section of bench/RESULTS.md."""
    from medlens._fs import atomic_write_text

    section = f"{SECTION_START}\n## Segmentation (bench/segmentation)\n\n{section_body}{SECTION_END}\n"
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Benchmark results\n\n"
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(RESULTS_MD, text)
    log.info("recorded in %s", RESULTS_MD)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.work.resolve() / "segmentation"
    root.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(root / "bench.log")],
    )
    started = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
    command = shlex.join(
        [os.path.relpath(sys.executable, REPO), os.path.relpath(__file__, REPO), *sys.argv[1:]]
    )
    medlens = str(Path(sys.executable).with_name("medlens"))
    info = machine()
    log.info("machine: %s; load %.2f", info.get("Model name"), os.getloadavg()[0])
    data, _ = build_dataset(args, root, medlens)
    ctx = make_context(args, root, data, medlens)
    log.info(
        "fold 0: %d train, %d val; %d test; budget %.0f s per peer",
        len(ctx.train_ids),
        len(ctx.val_ids),
        len(ctx.test_ids),
        ctx.budget_s,
    )
    results: list[PeerResult] = []
    scores: dict[str, dict[str, Any]] = {}
    base_ctx = ctx
    for name in args.peer_list:
        r = run_peer(name, ctx, args)
        r.extra["budget_s"] = ctx.budget_s
        results.append(r)
        if name == "medlens" and r.train is not None and r.train.seconds > ctx.budget_s:
            # medlens' budget bounds its fit loop; its command also builds the cache and exports ONNX. The
            # peers after it get the same wall-clock time it actually took, so the budget stays equal.
            r.notes.append(
                f"its training command took {r.train.seconds:.0f} s for a {ctx.budget_s:.0f} s budget; the peers "
                "after it were given that much time"
            )
            log.info("medlens took %.0f s to train: the next peers get as much", r.train.seconds)
            ctx = dataclasses.replace(ctx, budget_s=r.train.seconds)
        if r.error:
            log.error("peer %s failed: %s", name, r.error)
        scores[name] = _report.score(r, ctx.dataset_dir, ctx.test_ids, ctx.labels) if r.pred_dir else {}
        if scores[name].get("dice_mean") is not None:
            log.info("peer %s: mean test Dice %.3f", name, scores[name]["dice_mean"])
    body = render(command, base_ctx, info, results, scores, started)
    out = {
        "started": started,
        "command": command,
        "budget_s": base_ctx.budget_s,
        "machine": info,
        "split": {"train": ctx.train_ids, "val": ctx.val_ids, "test": ctx.test_ids},
        "peers": [r.to_json() for r in results],
        "scores": scores,
    }
    from medlens._fs import atomic_write_json, atomic_write_text

    atomic_write_json(root / "results.json", out)
    atomic_write_text(root / "results.md", body)
    print(body)
    if args.record:
        record(body)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
