"""Long operations (backend installs, later model pulls) as jobs that report progress.

A job runs as its own asyncio task, never tied to the HTTP request that started it: the caller may
hang up and watch again later. Jobs that do the same thing share one key, so a second request for
it joins the running job instead of starting another. Cancelling a job cancels its task (a build
then kills its process group and removes its temporary files). Finished jobs are kept, a bounded
number of them, so their outcome can still be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, computed_field

from backends.base import Progress, ProgressCallback

log = logging.getLogger("runnerd.jobs")

# How long DELETE waits for a cancelled job to finish cleaning up before answering.
_CANCEL_WAIT = 30.0


class JobState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Job(BaseModel):
    id: str
    kind: str
    target: str
    state: JobState = JobState.RUNNING
    phase: str = "starting"
    percent: float | None = None
    message: str = ""
    error: str | None = None
    created_at: float
    finished_at: float | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status_url(self) -> str:
        return f"/jobs/{self.id}"

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


JobWork = Callable[[ProgressCallback], Awaitable[str | None]]
"""What a job does: called with a progress callback; returns the final message (or None)."""


class JobNotFound(KeyError):
    pass


class JobManager:
    def __init__(self, keep_finished: int = 50) -> None:
        self.keep_finished = keep_finished
        self._jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._by_key: dict[str, str] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # --- reading ------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFound(job_id) from None

    def list(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def active(self, key: str) -> Job | None:
        job_id = self._by_key.get(key)
        return self._jobs[job_id] if job_id is not None else None

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then after each change (changes made meanwhile coalesce), until it ends."""
        while True:
            changed = self._changed.get(job_id)
            job = self.get(job_id)
            yield job
            if job.done or changed is None:
                return
            await changed.wait()

    # --- starting -----------------------------------------------------------------------------

    def start(self, kind: str, target: str, work: JobWork, key: str | None = None) -> tuple[Job, bool]:
        """Start a job, or return the running one with the same key. The flag says if it is new."""
        if key is not None and (running := self.active(key)) is not None:
            return running, False
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        job = Job(id=uuid.uuid4().hex[:16], kind=kind, target=target, created_at=time.time())
        self._jobs[job.id] = job
        self._changed[job.id] = asyncio.Event()
        if key is not None:
            self._by_key[key] = job.id
        task = asyncio.create_task(self._run(job.id, key, work), name=f"job {kind} {target}")
        self._tasks[job.id] = task
        log.info("job started id=%s kind=%s target=%s", job.id, kind, target)
        return job, True

    def finished(self, kind: str, target: str, message: str) -> Job:
        """Record a job that had nothing to do (e.g. installing what is installed)."""
        now = time.time()
        job = Job(id=uuid.uuid4().hex[:16], kind=kind, target=target, state=JobState.SUCCEEDED, phase="done",
                  percent=100.0, message=message, created_at=now, finished_at=now)
        self._jobs[job.id] = job
        self._prune()
        return job

    async def _run(self, job_id: str, key: str | None, work: JobWork) -> None:
        try:
            message = await work(self._reporter(job_id))
        except asyncio.CancelledError:
            self._finish(job_id, JobState.CANCELLED, error="cancelled")
            raise
        except Exception as exc:
            log.warning("job failed id=%s: %s", job_id, str(exc).splitlines()[0] if str(exc) else exc)
            self._finish(job_id, JobState.FAILED, error=str(exc) or type(exc).__name__)
        else:
            self._finish(job_id, JobState.SUCCEEDED, phase="done", percent=100.0,
                         message=message or self.get(job_id).message)
        finally:
            if key is not None and self._by_key.get(key) == job_id:
                del self._by_key[key]
            self._tasks.pop(job_id, None)

    # --- progress -----------------------------------------------------------------------------

    def _reporter(self, job_id: str) -> ProgressCallback:
        def report(progress: Progress) -> None:
            # Backends may report from worker threads; job state is only touched on the loop.
            if threading.get_ident() == self._loop_thread or self._loop is None:
                self._progress(job_id, progress)
            else:
                self._loop.call_soon_threadsafe(self._progress, job_id, progress)

        return report

    def _progress(self, job_id: str, progress: Progress) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.done:
            return
        percent = progress.percent
        if percent is None and progress.phase == job.phase:
            percent = job.percent  # a report without a number does not undo the phase's progress
        self._update(job_id, phase=progress.phase, message=progress.message, percent=percent)

    def _update(self, job_id: str, **changes: Any) -> None:
        self._jobs[job_id] = self._jobs[job_id].model_copy(update=changes)
        # Wake every watcher once; later watchers wait on a fresh event.
        old = self._changed.get(job_id)
        self._changed[job_id] = asyncio.Event()
        if old is not None:
            old.set()

    def _finish(self, job_id: str, state: JobState, **changes: Any) -> None:
        self._update(job_id, state=state, finished_at=time.time(), **changes)
        log.info("job %s id=%s", state, job_id)
        self._prune()

    def _prune(self) -> None:
        finished = [j for j in self.list() if j.done]
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._jobs[job.id]
            self._changed.pop(job.id, None)

    # --- stopping -----------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """Cancel a running job and wait (a bounded time) for it to clean up; returns its state."""
        job = self.get(job_id)
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_CANCEL_WAIT)
        return self.get(job_id) if job_id in self._jobs else job

    async def shutdown(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
