"""Background index jobs for the server: one writer at a time, progress by polling.

A job indexes one folder in a thread with an engine of its own (its own
database session; the encoder is shared with the searching engines), so
searches keep answering from the indexes loaded before the job. When the job
ends, the searching engines of its model are reopened and see the new vectors.

Progress is read from the store, not from the indexing loop: the job
checkpoints every :data:`CHECKPOINT_SECONDS`, and ``done`` counts the images
under the folder that are durably indexed (or recorded as failed).

One writer: an in-process lock refuses a second job while one runs.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import CrossfindError

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine

LOG = logging.getLogger(__name__)

#: Seconds between the checkpoints of a server-run index job (progress granularity).
CHECKPOINT_SECONDS = 2.0


class JobBusy(CrossfindError):
    """An index job is already running for this library."""


@dataclass
class Job:
    """An index job and what it has done."""

    id: int
    path: str  # absolute folder (or file) being indexed
    model: str  # model spec
    state: str = "running"  # running, done or failed
    started: float = field(default_factory=time.time)
    finished: float | None = None
    report: dict[str, Any] | None = None  # index --json's object, when done
    error: str | None = None  # why it failed
    baseline: int | None = None  # images already indexed under path when the job started

    def to_json(self, progress: dict[str, int] | None = None) -> dict[str, Any]:
        """``{"id", "path", "model", "state", "started", "finished", "done", "total", "failed", "rate", "report", "error"}``."""
        p = progress or {"done": 0, "total": 0, "failed": 0}
        end = self.finished or time.time()
        new = max(p["done"] - (self.baseline or 0), 0)
        return {
            "id": self.id, "path": self.path, "model": self.model, "state": self.state,
            "started": dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat(timespec="seconds"),
            "finished": None if self.finished is None else dt.datetime.fromtimestamp(self.finished, dt.timezone.utc).isoformat(timespec="seconds"),
            "done": p["done"], "total": p["total"], "failed": p["failed"],
            "rate": round(new / max(end - self.started, 1e-6), 2),
            "report": self.report, "error": self.error,
        }


class JobRunner:
    """Runs index jobs one at a time.

    ``open_engine(spec)`` builds the job's engine; ``done(spec)`` is called
    after each job (successful or not) so the caller can reload that model's
    indexes. At merge: the job must also hold the library's writer lock, so a
    CLI ``crossfind index`` and a server job never write at once.
    """

    def __init__(self, open_engine: Callable[[str], Engine], done: Callable[[str], None]) -> None:
        self._open_engine = open_engine
        self._done = done
        self._lock = threading.Lock()  # one writer at a time
        self._jobs: dict[int, Job] = {}
        self._threads: list[threading.Thread] = []
        self._next = 1

    def start(self, path: str, model: str, baseline: int) -> Job:
        """Start indexing ``path``; :class:`JobBusy` while another job runs."""
        if not self._lock.acquire(blocking=False):
            running = self.running()
            raise JobBusy(f"an index job is already running (job {running.id if running else '?'}); one writer at a time")
        try:
            job = Job(self._next, path, model, baseline=baseline)
            self._next += 1
            self._jobs[job.id] = job
            t = threading.Thread(target=self._run, args=(job,), name=f"index-job-{job.id}", daemon=True)
            self._threads.append(t)
            t.start()
        except BaseException:
            self._lock.release()
            raise
        return job

    def _run(self, job: Job) -> None:
        eng = None
        try:
            eng = self._open_engine(job.model)
            rep = eng.index_folder([job.path], checkpoint_seconds=CHECKPOINT_SECONDS)
            job.report = rep.to_json()
            job.state = "done"
        except CrossfindError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # a job must never take the server down
            LOG.exception("index job %d failed", job.id)
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            if eng is not None:
                try:
                    eng.close()
                except Exception:  # pragma: no cover
                    LOG.exception("closing the engine of job %d", job.id)
            try:
                self._done(job.model)
            finally:
                job.finished = time.time()
                self._lock.release()

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """Every job of this server, newest first."""
        return sorted(self._jobs.values(), key=lambda j: -j.id)

    def running(self) -> Job | None:
        return next((j for j in self._jobs.values() if j.state == "running"), None)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the jobs' threads (tests, shutdown)."""
        for t in list(self._threads):
            t.join(timeout)
