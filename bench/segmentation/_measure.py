"""Run one benchmark command as a subprocess: bounded by a timeout, timed, and its peak memory measured.

Memory is the peak over time of the summed PSS (proportional set size) of the process and all its
descendants, polled every ``poll`` seconds with psutil. PSS counts a page shared by k processes as 1/k
in each, so forked data-loader or augmentation workers are not double counted (summing RSS would be).
A spike shorter than the poll interval can be missed; the processes measured here hold their memory for
seconds at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("bench.segmentation")


@dataclass
class Measured:
    """What one command did.

    Attributes:
        cmd: the command line.
        seconds: wall-clock time from start to exit (or to the kill on timeout).
        returncode: the exit status (``None`` when killed on timeout).
        timed_out: the command ran past its timeout and was killed.
        peak_mb: peak summed PSS of the process tree, in MB (10^6 bytes).
        log: file holding the command's stdout and stderr.
        load_before: the 1-minute load average just before the command started.
        load_mean / load_max: the 1-minute load average while the command ran (mean and maximum of the
            samples); the command itself adds about its number of busy threads (2 here) to it.
    """

    cmd: list[str]
    seconds: float
    returncode: int | None
    timed_out: bool
    peak_mb: float
    log: str
    load_before: float
    load_mean: float = float("nan")
    load_max: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def failure(self) -> str:
        """One line saying how the command failed, with the last lines of its log."""
        what = "timed out" if self.timed_out else f"exited with status {self.returncode}"
        tail = _tail(Path(self.log), 15)
        return f"{' '.join(self.cmd[:3])} ... {what} after {self.seconds:.0f} s; see {self.log}\n{tail}"


def run_measured(
    cmd: Sequence[str],
    *,
    log_path: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    poll: float = 0.25,
) -> Measured:
    """Run ``cmd``, measure its wall time and peak tree PSS, kill its process group after ``timeout`` s.

    The command runs in a new session (its own process group), so a timeout ends exactly the processes it
    started, including its workers, and nothing else.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    load = os.getloadavg()[0]
    log.info("running: %s", " ".join(cmd))
    with open(log_path, "wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True
        )
        sampler = _PeakSampler(proc.pid, poll)
        sampler.start()
        timed_out = False
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            returncode = None
        seconds = time.monotonic() - start
        sampler.stop()
    m = Measured(
        cmd=list(cmd),
        seconds=seconds,
        returncode=returncode,
        timed_out=timed_out,
        peak_mb=sampler.peak / 1e6,
        log=str(log_path),
        load_before=load,
        load_mean=sum(sampler.loads) / len(sampler.loads) if sampler.loads else float("nan"),
        load_max=max(sampler.loads, default=float("nan")),
    )
    log.info(
        "  -> %s in %.1f s, peak %.0f MB, load %.1f (max %.1f)",
        "ok" if m.ok else "FAILED",
        m.seconds,
        m.peak_mb,
        m.load_mean,
        m.load_max,
    )
    return m


class _PeakSampler(threading.Thread):
    """Polls the summed PSS of a process tree until stopped; keeps the maximum."""

    def __init__(self, pid: int, poll: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.poll = poll
        self.peak = 0.0
        self.loads: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop_event.is_set():
            total = 0.0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.AccessDenied:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                except psutil.Error:  # exited between listing and reading
                    pass
            self.peak = max(self.peak, total)
            self.loads.append(os.getloadavg()[0])
            self._stop_event.wait(self.poll)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the command's own process group, then SIGKILL what is left after 15 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait()


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # progress bars rewrite a line with carriage returns; keep the last state of each line
    rows = [r.rsplit("\r", 1)[-1] for r in text.splitlines() if r.strip()]
    return "\n".join("    " + r for r in rows[-lines:])
