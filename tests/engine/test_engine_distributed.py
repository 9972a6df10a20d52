"""DDP: two CPU processes launched by torch.distributed.run train one model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from medlens.engine.distributed import DistContext

SCRIPT = Path(__file__).with_name("engine_ddp_script.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_single_process_context_is_a_no_op(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = DistContext.from_env(torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    assert ctx.is_main and not ctx.enabled and ctx.wrap(model) is model
    assert ctx.broadcast({"a": 1}) == {"a": 1} and ctx.gather(3) == [3] and ctx.mean(2.5) == 2.5


def test_two_processes_end_with_identical_improved_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(run),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    w0, w1 = load_file(run / "rank0.safetensors"), load_file(run / "rank1.safetensors")
    assert w0.keys() == w1.keys()
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], rtol=0, atol=0)
    best = load_file(run / "model.safetensors")  # both ranks end holding the best weights
    torch.testing.assert_close(best, w0, rtol=0, atol=0)

    r0, r1 = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # rank 0's validation results reached rank 1
    assert r0["iterations"] == 40 and r0["best_score"] >= 0.85  # chance is 0.5
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["rng"][0] != state["rng"][1]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
