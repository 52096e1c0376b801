"""Runner logs rotate by size: a real engine-like process printing far more than the cap leaves the
current file and the configured number of older ones, none past the cap, the newest output kept."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from backends.base import RunnerError, RunnerOutput
from backends.endpoint import Endpoint
from backends.process import RotatingLog, run_process
from runnerd.config import Settings


def _logs(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + "*"))


def test_rotation_keeps_the_newest_bytes_in_order(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    log = RotatingLog(path, max_bytes=100, keep=2)
    written = b"".join(b"%04d\n" % i for i in range(200))  # 1000 bytes in 5-byte lines
    for i in range(0, len(written), 5):
        log.write(written[i:i + 5])
    log.close()
    assert [p.name for p in _logs(path)] == ["r.log", "r.log.1", "r.log.2"]
    kept = (path.with_name("r.log.2").read_bytes() + path.with_name("r.log.1").read_bytes() + path.read_bytes())
    assert all(p.stat().st_size <= 100 for p in _logs(path))
    assert written.endswith(kept) and len(kept) >= 200


def test_a_log_reopened_counts_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.write_bytes(b"x" * 90)
    log = RotatingLog(path, max_bytes=100, keep=1)
    log.write(b"y" * 20)
    log.close()
    assert path.read_bytes() == b"y" * 20
    assert path.with_name("r.log.1").read_bytes() == b"x" * 90


def test_keep_zero_truncates_in_place(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    log = RotatingLog(path, max_bytes=10, keep=0)
    for _ in range(5):
        log.write(b"abcdefgh")
    log.close()
    assert [p.name for p in _logs(path)] == ["r.log"]
    assert path.read_bytes() == b"abcdefgh"


@pytest.mark.anyio
async def test_an_engine_process_output_rotates(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "engine.log"
    output = RunnerOutput(path)
    output.log_max_bytes = 16 << 10
    output.log_files = 2
    script = "import sys\nfor i in range(4000): sys.stdout.write('line %05d of the engine\\n' % i)\nsys.exit(3)\n"
    with pytest.raises(RunnerError):
        await run_process([sys.executable, "-c", script], env={"PATH": "/usr/bin:/bin"},
                          endpoint=Endpoint.unix(tmp_path / "e.sock"), output=output)
    assert [p.name for p in _logs(path)] == ["engine.log", "engine.log.1", "engine.log.2"]
    assert all(p.stat().st_size <= 16 << 10 for p in _logs(path))
    assert path.read_text().splitlines()[-1] == "line 03999 of the engine"
    assert output.tail[-1] == "line 03999 of the engine"


def test_the_cap_is_validated() -> None:
    with pytest.raises(ValidationError, match="runner_log_max_bytes"):
        Settings(runner_log_max_bytes=10)
    with pytest.raises(ValidationError, match="runner_log_files"):
        Settings(runner_log_files=-1)
