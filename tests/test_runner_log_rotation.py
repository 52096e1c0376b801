"""Runner logs rotate by size: a real engine-like process printing far more than the cap leaves the
current file and the configured number of older ones, none past the cap, the newest output kept. They
are written by a thread: a stalled log disk holds neither the engine's output nor the event loop."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import anyio
import pytest
from pydantic import ValidationError

from backends.base import RunnerError, RunnerOutput
from backends.endpoint import Endpoint
from backends.process import LogWriter, RotatingLog, run_process
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


class _StalledDisk:
    """A stand-in for a log disk that stops taking writes: RotatingLog.write waits until `release`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = RotatingLog.write

        def write(log: RotatingLog, chunk: bytes) -> None:
            self.entered.set()
            assert self.release.wait(30)
            real(log, chunk)

        monkeypatch.setattr(RotatingLog, "write", write)


@pytest.mark.anyio
async def test_a_stalled_log_disk_does_not_hold_the_engine_output(tmp_path: Path, monkeypatch) -> None:
    disk = _StalledDisk(monkeypatch)
    path = tmp_path / "engine.log"
    output = RunnerOutput(path)
    script = "import sys\nfor i in range(2000): print('line %04d' % i, flush=i % 100 == 0)\nsys.exit(3)\n"
    run = asyncio.create_task(run_process([sys.executable, "-c", script], env={"PATH": "/usr/bin:/bin"},
                                          endpoint=Endpoint.unix(tmp_path / "e.sock"), output=output))
    # The tail (what the daemon reads on its loop) gets every line while the log's first write waits.
    for _ in range(500):
        if output.tail and output.tail[-1] == "line 1999":
            break
        await asyncio.sleep(0.02)
    assert output.tail[-1] == "line 1999"
    assert disk.entered.is_set() and not run.done()
    disk.release.set()
    with pytest.raises(RunnerError):
        await run
    assert path.read_text().splitlines() == [f"line {i:04d}" for i in range(2000)]


def test_output_past_the_backlog_is_dropped_and_the_drop_noted(tmp_path: Path, monkeypatch) -> None:
    disk = _StalledDisk(monkeypatch)
    path = tmp_path / "engine.log"
    writer = LogWriter(path, max_bytes=None, keep=0, backlog=100)
    writer.write(b"first\n")
    assert disk.entered.wait(10)  # the writer thread holds "first" and waits on the disk
    for i in range(30):
        writer.write(b"%02d-------\n" % i)  # 10 of these fill the backlog; 20 are dropped
    disk.release.set()
    writer.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "first" and lines[1:11] == [f"{i:02d}-------" for i in range(10)]
    assert "[runnerd: 200 bytes of output dropped: the log disk did not keep up]" in lines


def test_a_chatty_engine_costs_a_few_log_writes_a_second(tmp_path: Path, monkeypatch) -> None:
    """An engine that logs every request prints lines a millisecond apart under load: they reach the file
    in a few batches, not a disk write (and a thread wake-up) each."""
    writes: list[int] = []
    real_write = RotatingLog.write

    def counted(self: RotatingLog, chunk: bytes) -> None:
        writes.append(len(chunk))
        real_write(self, chunk)

    monkeypatch.setattr(RotatingLog, "write", counted)
    path = tmp_path / "r.log"
    writer = LogWriter(path, max_bytes=None, keep=0, period=0.1)
    lines = [b"request %03d\n" % i for i in range(200)]
    for line in lines:
        writer.write(line)
        threading.Event().wait(0.001)
    writer.close()
    assert path.read_bytes() == b"".join(lines)
    assert len(writes) <= 8, writes  # about 0.25 s of lines; one write per line before batching


@pytest.mark.anyio
async def test_output_that_keeps_coming_is_read_from_the_pipe_in_gulps() -> None:
    """Lines written to the engine's output pipe a millisecond apart are read a few times, not once per
    line; none is lost or split, and a line after a quiet spell is read at once."""
    from backends.process import OutputPipe, _output_pipe

    read_end, write_end = _output_pipe()
    output = RunnerOutput()
    reads: list[bytes] = []

    class Counting:
        def write(self, chunk: bytes) -> None:
            reads.append(chunk)

    _, pipe = await asyncio.get_running_loop().connect_read_pipe(
        lambda: OutputPipe(output, Counting()), os.fdopen(read_end, "rb", buffering=0))  # type: ignore[arg-type]
    try:
        with anyio.fail_after(10):
            os.write(write_end, b"listening\n")
            await output.activity.wait()  # the first line after a quiet spell: no gulp's pause
            assert list(output.tail) == ["listening"] and len(reads) == 1
            for i in range(150):
                os.write(write_end, b"line %03d\n" % i)
                await asyncio.sleep(0.001)
            os.write(write_end, b"no newline at the end")
            os.close(write_end)
            await pipe.ended
    finally:
        pipe.close()
    assert list(output.tail)[1:] == [*(f"line {i:03d}" for i in range(150)), "no newline at the end"]
    assert len(reads) <= 20, len(reads)  # a read per line without gulps
