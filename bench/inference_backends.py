"""ONNX Runtime vs PyTorch: per-volume sliding-window inference seconds of trained medlens runs on the CPU.

Side by side in one process, on one validation case of each run (preprocessed grid, the plan's window, overlap,
sw_batch_size and mirroring): PyTorch fp32, PyTorch bf16 autocast, ONNX Runtime fp32 with all cores, with one
thread, and with thread spinning on (ONNX Runtime's own default; medlens turns it off). Every variant is warmed up once, then the timed rounds interleave the
variants (so a change in machine load touches all alike); the median is reported, with the load average.

Make the runs (about 5 minutes on 2 cores), then measure::

    .venv/bin/medlens sample brain-tissue --out /tmp/bt --subjects 8
    .venv/bin/medlens plan /tmp/bt --budget 1m
    .venv/bin/medlens train /tmp/bt --plan /tmp/bt/plan.json --out /tmp/bt-run
    .venv/bin/medlens train /tmp/bt --plan /tmp/bt/plan.json --configuration 3d_fullres --out /tmp/bt-run-full
    .venv/bin/python bench/inference_backends.py /tmp/bt-run /tmp/bt-run-full --repeats 7 --write

``--write`` replaces this benchmark's own section of bench/RESULTS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

SECTION = "## ONNX Runtime vs PyTorch inference (CPU)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ORDER = ("torch_fp32", "torch_bf16", "torch_bf16_1t", "onnx_fp32", "onnx_fp32_1t", "onnx_fp32_spin")


class OneThread:
    """A backend run with one torch thread (the FACTS.md remedy when other processes share the cores)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.device = backend.device

    def __call__(self, x: Any) -> Any:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.backend(x)
        finally:
            torch.set_num_threads(before)


def measure_run(run_dir: Path, fold: int, repeats: int) -> dict[str, Any]:
    """Time every backend variant on the first validation case of ``fold``."""
    import numpy as np
    import torch

    from medlens.engine.runtime import configure_threads, cpu_supports_bf16
    from medlens.models import count_parameters
    from medlens.plan.cache import Cache
    from medlens.plan.plan import Plan
    from medlens.serve.backends import OnnxBackend, TorchBackend, measure_backends
    from medlens.serve.run_export import example_shape_for, fold_model, onnx_for_fold, validation_cases
    from medlens.tasks.run import read_run

    info = read_run(run_dir)
    name = str(info["configuration"])
    config = Plan.load(run_dir / "plan.json").configuration(name)
    fold_dir = run_dir / f"fold_{fold}"
    model = fold_model(info, config, fold_dir)
    cache = Cache(run_dir / "cache" / name)
    case = validation_cases(info, fold)[0]
    data = torch.from_numpy(np.asarray(cache.data(case), dtype=np.float32))
    shape = example_shape_for(config, int(data.shape[0]))
    onnx_path = onnx_for_fold(fold_dir, model, shape)
    threads = configure_threads(None)
    inf = config.get("inference", {})
    m = measure_backends(
        model,
        data,
        list(shape[2:]),
        onnx_path=onnx_path,
        precision="bf16" if cpu_supports_bf16() else "fp32",
        overlap=float(inf.get("overlap", 0.25)),
        sw_batch_size=int(inf.get("sw_batch_size", 4)),
        mirror_axes=list(inf.get("mirror_axes", [])),
        repeats=repeats,
        onnx_threads=(None, 1),
        extra_variants={
            "torch_bf16_1t": OneThread(TorchBackend(model, "bf16")),
            "onnx_fp32_spin": OnnxBackend(onnx_path, allow_spinning=True),
        },
    )
    net = config["network"]
    return {
        "run": str(run_dir),
        "configuration": name,
        "network": f"{net.get('name', 'unet')} {list(net.get('channels', []))} "
        f"({count_parameters(model) / 1e6:.2f} M params)",
        "case": f"{case} {list(data.shape[1:])}",
        "window": f"{list(shape[2:])} x{shape[0]}",
        "torch_threads": threads,
        "m": m,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: median seconds per volume per variant, and its speed-up over PyTorch bf16."""
    head = (
        "| run (configuration) | network | case (preprocessed) | window x batch | "
        + " | ".join(ORDER)
        + " | argmax agreement ORT vs torch fp32 | max abs prob diff | choice |"
    )
    out = [head, "|" + "---|" * (7 + len(ORDER))]
    for r in rows:
        m = r["m"]
        base = m.seconds.get("torch_bf16", m.seconds["torch_fp32"])
        cells = [
            f"{m.seconds[k]:.3f} s ({base / m.seconds[k]:.2f}x)" if k in m.seconds else "n/a" for k in ORDER
        ]
        out.append(
            f"| {Path(r['run']).name} ({r['configuration']}) | {r['network']} | {r['case']} | {r['window']} | "
            + " | ".join(cells)
            + f" | {m.argmax_agreement:.5f} | {m.max_abs_diff:.1e} | {m.choice} |"
        )
    return "\n".join(out)


def verdict(row: dict[str, Any]) -> str:
    """Best PyTorch variant against ONNX Runtime as medlens runs it, for one run."""
    m = row["m"]
    torch_best = min((k for k in m.seconds if k.startswith("torch")), key=m.seconds.__getitem__)
    t, o = m.seconds[torch_best], m.seconds["onnx_fp32"]
    faster = f"ONNX Runtime {t / o:.2f}x faster" if o < t else f"PyTorch {o / t:.2f}x faster"
    return (
        f"{Path(row['run']).name}: best PyTorch variant `{torch_best}` {t:.3f} s vs `onnx_fp32` {o:.3f} s "
        f"per volume ({faster}); training's rule picked `{m.choice}` ({m.reason})."
    )


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu)
        cpu = model.group(1).strip() if model else platform.processor()
    except (OSError, subprocess.SubprocessError):
        cpu = platform.processor()
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving every other section alone."""
    from medlens._fs import atomic_write_text

    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    atomic_write_text(path, new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories from 'medlens train'")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant (median reported)")
    parser.add_argument("--write", action="store_true", help=f"update the section of {RESULTS}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import onnxruntime
    import torch

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = [measure_run(run, args.fold, args.repeats) for run in args.runs]
    load_after = os.getloadavg()
    result = table(rows)
    print(result)
    for r in rows:
        print(verdict(r))
    note = (
        f"{SECTION}\n\n"
        f"Command: `.venv/bin/python bench/inference_backends.py {' '.join(str(r) for r in args.runs)} "
        f"--repeats {args.repeats} --write` (runs made as in the script's docstring: brain-tissue sample, "
        f"8 subjects, `medlens plan --budget 1m`, fold 0).\n\n"
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {machine()}; torch {torch.__version__} ({rows[0]['torch_threads']} threads), "
        f"onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}. "
        f"Load average (1/5/15 min) {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} before and "
        f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} after ({time.perf_counter() - t0:.0f} s): "
        "other engineers' tests and benchmarks shared the 2 cores, so absolute times are noisy; the variants "
        "were interleaved round by round, so the ratios are the fairer reading.\n\n"
        "Median seconds of sliding-window inference (Gaussian blending, the plan's window, overlap 0.25, "
        "sw_batch_size and mirroring) over one preprocessed validation volume, and in brackets the speed-up "
        "over PyTorch bf16 autocast (what `medlens predict` uses on this CPU without ONNX). `onnx_fp32`: ONNX "
        "Runtime as medlens runs it (all graph optimisations, intra-op threads = cores, thread spinning off); "
        "`_1t`: one thread (torch or ORT); `onnx_fp32_spin`: spinning on, ONNX Runtime's default. The choice column is the rule training applies (`inference_backend` in run.json): ONNX "
        "only if faster than PyTorch at the run's precision and in agreement on >= 99.9% of voxels.\n\n"
        f"{result}\n\n" + "".join(f"- {verdict(r)}\n" for r in rows)
    )
    if args.write:
        write_section(note)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
