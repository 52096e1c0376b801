"""The keep-alive timer of a runner that goes idle after every request: one timer across many idle spells,
moved rather than restarted, replaced when a shorter keep-alive is asked for, and never expiring a runner
that a request holds. Real scheduler, real llama-server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from backends.base import BackendConfiguration, Mode, ModelRef
from backends.llamacpp import LaunchOptions, LlamaCppBackend
from runnerd.admission import Budget
from runnerd.config import MemorySettings
from runnerd.scheduler import RunnerKey, RunnerState, Scheduler

pytestmark = [pytest.mark.engine, pytest.mark.anyio]


async def _timer_ended(runner) -> None:
    while runner._expiry is not None:
        await asyncio.sleep(0.01)


async def test_one_timer_serves_many_idle_spells_and_a_shorter_keep_alive_replaces_it(llama_server, tiny_model,
                                                                                    tmp_path):
    backend = LlamaCppBackend(cache_dir=tmp_path, binary=llama_server, launch=LaunchOptions(threads=1))
    scheduler = Scheduler({backend.name: backend}, runtime_dir=Path("/tmp") / f"rd-ka-{os.getpid()}",
                          log_dir=None, default_keep_alive=300.0, budget=Budget(MemorySettings()))
    key = RunnerKey(backend.name, "tiny:latest", Mode.COMPLETION)
    ref = ModelRef(name="tiny:latest", path=tiny_model)
    timers = 0
    spawn = scheduler.spawn

    def counting_spawn(work, *args):  # the scheduler's own spawn, counted for the runner's timer
        nonlocal timers
        timers += getattr(work, "__name__", "") == "_expire_later"
        spawn(work, *args)

    scheduler.spawn = counting_spawn  # type: ignore[method-assign]
    async with scheduler.running():
        first = await scheduler.acquire(key, ref, BackendConfiguration())
        runner = first.runner
        runner.spawn = counting_spawn  # type: ignore[method-assign]
        first.release()
        for _ in range(50):  # each request leaves the runner idle again; the timer runs in between
            await asyncio.sleep(0)
            (await scheduler.acquire(key, ref, BackendConfiguration())).release()
        await asyncio.sleep(0)
        assert runner.state is RunnerState.READY and runner.expires_at is not None
        assert timers == 1, f"{timers} keep-alive timers for 51 idle spells"

        # A shorter keep-alive than the sleeping timer's: a timer of its own replaces it.
        (await scheduler.acquire(key, ref, BackendConfiguration(), 0.2)).release()
        assert timers == 2
        # A request holds the runner past that deadline: the timer wakes, finds it busy and ends.
        held = await scheduler.acquire(key, ref, BackendConfiguration())
        assert runner.expires_at is None
        await asyncio.wait_for(_timer_ended(runner), 20)
        assert runner.state is RunnerState.READY

        # Idle again: its keep-alive (0.2 s) runs from the release, on a new timer, and stops it.
        held.release()
        assert timers == 3 and runner.expires_at is not None
        await asyncio.wait_for(runner.wait_exited(), 20)
        assert runner.stop_reason == "idle"
