"""Jobs of the inference service: a bounded queue, a small worker pool, and one folder per job.

A job is created by the API once its input is safely on disk (``JOB/input/``); a worker thread reads the image,
runs the model and writes the results to ``JOB/results/`` under fixed names (``label.nii.gz``,
``probabilities.nii.gz``, ``uncertainty.nii.gz``, ``result.json``, and DICOM SEG/SR when the input was DICOM).
Only the names a job itself recorded in :attr:`Job.files` can be downloaded.

Threads, not processes: the models are loaded once and shared, and PyTorch and ONNX Runtime release the GIL
while they compute. One lock per model serialises predictions on the same model (a predictor that switches
dropout on for MC-dropout uncertainty must not be used by two jobs at once), so extra workers help when several
models are served or while jobs read and write files. The queue holds at most ``max_queue`` waiting jobs beyond
the ones running; a submission past that is refused (:class:`QueueFull`, HTTP 429) instead of piling up. A job
whose upload is still arriving (made by :meth:`JobManager.new`, not yet submitted) holds its place too, so
uploads in progress cannot outnumber the capacity (each one fills the disk).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlens.errors import MedlensError

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

#: Result file name -> (media type, description). The only names a job can ever publish.
RESULT_FILES = {
    "image.nii.gz": ("application/gzip", "the input image as NIfTI (what the viewer shows)"),
    "label.nii.gz": ("application/gzip", "predicted label map, in the input's exact geometry"),
    "probabilities.nii.gz": ("application/gzip", "per-class probabilities (channel k = class k)"),
    "uncertainty.nii.gz": ("application/gzip", "voxel-wise uncertainty map"),
    "result.json": ("application/json", "the job's results as JSON"),
}


class QueueFull(MedlensError):
    """The job queue is full; the client should retry later (HTTP 429)."""


@dataclass
class Job:
    """One prediction request and, once done, its results.

    Attributes:
        id: 32 hex digits (random); also the job's folder name.
        model: the served model's name.
        kind: input kind: "nifti", "dicom" or "pacs".
        dir: the job's folder (``input/`` and ``results/`` inside).
        options: prediction options (tta, probabilities, uncertainty, series, study).
        state: "queued", "running", "done" or "failed".
        error: the one-line reason when failed.
        failure: the type of the medlens error that failed the job (the API maps TooLarge to HTTP 413).
        files: result name -> path (only these can be downloaded).
        result: the JSON-able results (probabilities, uncertainty, refer, volumes ...).
    """

    id: str
    model: str
    kind: str
    dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    state: str = "queued"
    error: str | None = None
    failure: type[MedlensError] | None = field(default=None, repr=False)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    files: dict[str, Path] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def input_dir(self) -> Path:
        return self.dir / "input"

    @property
    def results_dir(self) -> Path:
        return self.dir / "results"

    def file(self, name: str) -> Path | None:
        """The path of result ``name`` if this job published it, else None (never built from ``name``)."""
        return self.files.get(name) if self.state == "done" else None


class JobManager:
    """Create, queue, run and forget jobs.

    Args:
        work_dir: where job folders are made.
        workers: worker threads.
        max_queue: jobs that may wait beyond the running ones.
        keep: finished jobs kept (with their folders); older ones are deleted.
    """

    def __init__(self, work_dir: Path, *, workers: int = 1, max_queue: int = 16, keep: int = 200) -> None:
        from medlens.errors import InputError

        for name, value in (("workers", workers), ("max_queue", max_queue), ("keep", keep)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "max_queue" else 1)
            ):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.workers, self.max_queue, self.keep = workers, max_queue, keep
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medlens-job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._active = 0
        self._pending: set[str] = set()  # made by new(), neither submitted nor discarded yet
        self._lock = threading.Lock()

    # ---- bookkeeping ----------------------------------------------------------------------------------------
    def new(self, model: str, kind: str, options: dict[str, Any] | None = None) -> Job:
        """Make a job and its folder (not yet queued) and reserve its place in the queue.

        The place is held until :meth:`submit` or :meth:`discard`, so uploads still arriving count against the
        capacity.

        Raises:
            QueueFull: running, queued and pending jobs already fill the capacity.
        """
        job_id = uuid.uuid4().hex
        with self._lock:
            self._check_capacity()
            self._pending.add(job_id)
        job = Job(job_id, model, kind, self.work_dir / job_id, dict(options or {}))
        try:
            job.input_dir.mkdir(parents=True)
            job.results_dir.mkdir()
        except BaseException:
            self.discard(job)
            raise
        return job

    def discard(self, job: Job) -> None:
        """Delete a job that was never submitted (its upload was refused) and free its place."""
        with self._lock:
            self._pending.discard(job.id)
        shutil.rmtree(job.dir, ignore_errors=True)

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None (also for anything that is not a job id)."""
        if not _JOB_ID.match(job_id):
            return None
        with self._lock:
            return self._jobs.get(job_id)

    @property
    def active(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._active

    @property
    def pending(self) -> int:
        """Jobs made but not yet submitted (their upload is arriving or being unpacked)."""
        with self._lock:
            return len(self._pending)

    def _check_capacity(self) -> None:
        """Raise :class:`QueueFull` when no place is left (call with the lock held)."""
        used = self._active + len(self._pending)
        if used >= self.workers + self.max_queue:
            raise QueueFull(
                f"{self._active} jobs are queued or running and {len(self._pending)} uploads are arriving "
                f"(limit {self.workers + self.max_queue}); retry later"
            )

    # ---- running --------------------------------------------------------------------------------------------
    def submit(self, job: Job, work: Callable[[Job], None]) -> Future[None]:
        """Queue ``job``; a worker calls ``work(job)`` and records success or the error.

        Raises:
            QueueFull: the queue is full (the job's folder is deleted).
        """
        with self._lock:
            reserved = job.id in self._pending
            self._pending.discard(job.id)
            full = not reserved and self._active + len(self._pending) >= self.workers + self.max_queue
            if not full:
                self._active += 1
                self._jobs[job.id] = job
        if full:
            self.discard(job)
            raise QueueFull(f"the job queue is full (limit {self.workers + self.max_queue}); retry later")
        self._prune()
        return self._pool.submit(self._run, job, work)

    def _run(self, job: Job, work: Callable[[Job], None]) -> None:
        job.state, job.started = "running", time.time()
        try:
            work(job)
            job.state = "done"
        except MedlensError as exc:
            job.state, job.error, job.failure = "failed", _scrub(str(exc), job.dir), type(exc)
            log.info("job %s failed: %s", job.id, job.error)
        except Exception:  # a bug, not the user's fault: log it, tell the client without internals
            job.state, job.error = "failed", "internal error while predicting (see the server log)"
            log.exception("job %s crashed", job.id)
        finally:
            job.finished = time.time()
            with self._lock:
                self._active -= 1
            job.done.set()

    def _prune(self) -> None:
        """Forget the oldest finished jobs beyond :attr:`keep` and delete their folders."""
        drop: list[Job] = []
        with self._lock:
            finished = [j for j in self._jobs.values() if j.done.is_set()]
            for job in finished[: max(0, len(finished) - self.keep)]:
                drop.append(self._jobs.pop(job.id))
        for job in drop:
            shutil.rmtree(job.dir, ignore_errors=True)

    def shutdown(self) -> None:
        """Stop accepting work and wait for running jobs."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _scrub(message: str, job_dir: Path) -> str:
    """Remove server paths from an error message sent to a client."""
    return message.replace(str(job_dir / "input"), "upload").replace(str(job_dir), "job")
