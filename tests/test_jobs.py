"""The job manager: progress, shared jobs, failure, cancellation, watching and retention."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from backends.base import Progress
from runnerd.jobs import JobManager, JobNotFound, JobState


@pytest.mark.anyio
async def test_progress_then_success():
    with anyio.fail_after(10):
        jobs = JobManager()
        release = asyncio.Event()

        async def work(progress):
            progress(Progress(phase="build", percent=40, message="[ 40%] Building"))
            progress(Progress(phase="build", message="still building"))  # no number: keeps 40
            await release.wait()
            return "installed v1"

        job, new = jobs.start("install-backend", "x", work, key="install:x")
        assert new and job.state is JobState.RUNNING
        await asyncio.sleep(0.01)
        seen = jobs.get(job.id)
        assert (seen.phase, seen.percent, seen.message) == ("build", 40, "still building")
        again, new = jobs.start("install-backend", "x", work, key="install:x")
        assert again.id == job.id and not new
        release.set()
        states = [j async for j in jobs.watch(job.id)]

    final = states[-1]
    assert (final.state, final.phase, final.percent, final.message) == (JobState.SUCCEEDED, "done", 100, "installed v1")
    assert final.finished_at is not None and final.status_url == f"/jobs/{job.id}"
    assert jobs.active("install:x") is None, "a finished job no longer absorbs new requests"


@pytest.mark.anyio
async def test_failure_is_recorded():
    with anyio.fail_after(10):
        jobs = JobManager()

        async def work(progress):
            raise RuntimeError("cmake failed with exit code 2\nlast lines...")

        job, _ = jobs.start("install-backend", "x", work)
        final = [j async for j in jobs.watch(job.id)][-1]

    assert final.state is JobState.FAILED and final.error.startswith("cmake failed with exit code 2")


@pytest.mark.anyio
async def test_progress_from_a_worker_thread():
    with anyio.fail_after(10):
        jobs = JobManager()

        async def work(progress):
            await asyncio.to_thread(progress, Progress(phase="download", percent=12))
            await asyncio.sleep(0.05)
            return None

        job, _ = jobs.start("pull", "m", work)
        snapshots = [j async for j in jobs.watch(job.id)]

    assert any(s.phase == "download" and s.percent == 12 for s in snapshots)
    assert snapshots[-1].state is JobState.SUCCEEDED


@pytest.mark.anyio
async def test_cancel_cancels_the_task():
    with anyio.fail_after(10):
        jobs = JobManager()
        cleaned = asyncio.Event()

        async def work(progress):
            try:
                await asyncio.sleep(60)
            finally:
                cleaned.set()
            return None

        job, _ = jobs.start("install-backend", "x", work, key="k")
        await asyncio.sleep(0)
        cancelled = await jobs.cancel(job.id)
        was_cleaned, active, again = cleaned.is_set(), jobs.active("k"), await jobs.cancel(job.id)

    assert cancelled.state is JobState.CANCELLED and cancelled.error == "cancelled"
    assert was_cleaned and active is None
    assert again.state is JobState.CANCELLED


@pytest.mark.anyio
async def test_finished_jobs_are_kept_up_to_a_bound():
    jobs = JobManager(keep_finished=3)  # nothing awaited: no timeout needed
    ids = [jobs.finished("install-backend", f"b{i}", "already installed").id for i in range(5)]
    assert [j.id for j in jobs.list()] == ids[-3:]
    with pytest.raises(JobNotFound):
        jobs.get(ids[0])


@pytest.mark.anyio
async def test_shutdown_cancels_running_jobs():
    with anyio.fail_after(10):
        jobs = JobManager()

        async def work(progress):
            await asyncio.sleep(60)
            return None

        job, _ = jobs.start("install-backend", "x", work)
        await asyncio.sleep(0)
        await jobs.shutdown()
        final = jobs.get(job.id)

    assert final.state is JobState.CANCELLED
