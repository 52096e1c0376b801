"""Engines run under SCHED_BATCH unless configured otherwise: every thread of a real llama-server, and never
the daemon itself. Install and build steps always do."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from backends.process import run_step
from runnerd.config import Settings


def _policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of `pid`."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def _loaded_engine(make_daemon: Any, tiny_model: Path, env: dict[str, str]) -> tuple[int, int]:
    daemon = make_daemon({"tiny": tiny_model}, env=env)
    answer = daemon.post("/engines/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    (engine,) = daemon.engine_pids()
    return daemon.proc.pid, engine


def test_engine_threads_run_under_sched_batch_and_the_daemon_does_not(make_daemon: Any, tiny_model: Path) -> None:
    daemon, engine = _loaded_engine(make_daemon, tiny_model, {})
    assert _policies(engine) == {os.SCHED_BATCH}
    assert len(os.listdir(f"/proc/{engine}/task")) > 1  # its HTTP and compute threads, not just the first
    assert _policies(daemon) == {os.SCHED_OTHER}


def test_the_normal_policy_leaves_engines_under_the_default_one(make_daemon: Any, tiny_model: Path) -> None:
    _, engine = _loaded_engine(make_daemon, tiny_model, {"RUNNERD_ENGINE_CPU_POLICY": "normal"})
    assert _policies(engine) == {os.SCHED_OTHER}


def test_an_unknown_policy_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="engine_cpu_policy"):
        Settings(engine_cpu_policy="realtime")


@pytest.mark.anyio
async def test_install_steps_run_under_sched_batch() -> None:
    lines: list[str] = []
    await run_step([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"], on_line=lines.append)
    assert lines == [str(os.SCHED_BATCH)]
