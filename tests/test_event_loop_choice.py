"""Which event loop the daemon runs on: uvloop by default, asyncio on request, a clear refusal otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import uvloop

from runnerd.config import ConfigError
from runnerd.server import event_loop_factory


def test_uvloop_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNNERD_EVENT_LOOP", raising=False)
    assert event_loop_factory() is uvloop.new_event_loop


@pytest.mark.parametrize("value", ["asyncio", " ASYNCIO "])
def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("RUNNERD_EVENT_LOOP", value)
    assert event_loop_factory() is None


def test_an_unknown_loop_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNERD_EVENT_LOOP", "tokio")
    with pytest.raises(ConfigError, match="RUNNERD_EVENT_LOOP='tokio': expected one of uvloop, asyncio"):
        event_loop_factory()


def test_serve_with_an_unknown_loop_stops_before_it_starts(tmp_path: os.PathLike[str]) -> None:
    env = {**os.environ, "RUNNERD_EVENT_LOOP": "trio", "RUNNERD_RUNTIME_DIR": f"{tmp_path}/run",
           "RUNNERD_DATA_DIR": f"{tmp_path}/data"}
    done = subprocess.run([sys.executable, "-m", "runnerd.cli", "serve"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "RUNNERD_EVENT_LOOP='trio'" in done.stderr
    assert not os.path.exists(f"{tmp_path}/run/runnerd.sock")
