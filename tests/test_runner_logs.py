"""Runner logs after rotation: GET /logs serves the rotated files too, oldest first, within its byte
cap; a model's runner logs are kept after its runner exits and removed with the model. A real daemon
and llama-server, whose start-up output alone is larger than the smallest rotation cap."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.process import RotatingLog, rotated_logs
from runnerd.runner_logs import model_logs, read_end
from tests.conftest import Daemon

pytestmark = pytest.mark.engine

CAP = 4096  # the smallest runner_log_max_bytes allowed


@pytest.fixture(scope="module")
def logged(llama_server: Path, tiny_model: Path) -> Iterator[Daemon]:
    root = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    d = Daemon(Path(root), llama_server, {"tiny": tiny_model, "other": tiny_model},
               {"RUNNERD_RUNNER_LOG_MAX_BYTES": str(CAP), "RUNNERD_RUNNER_LOG_FILES": "3"}, [])
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _files(d: Daemon) -> list[Path]:
    return sorted((d.root / "data" / "logs").iterdir())


def _lines_on_disk(current: Path) -> list[str]:
    return b"".join(p.read_bytes() for p in rotated_logs(current)).decode("utf-8", "replace").splitlines()


def _current_log(d: Daemon) -> Path:
    [current] = [p for p in _files(d) if p.name.startswith("llama.cpp-completion-") and p.suffix == ".log"]
    return current


def test_logs_serve_the_rotated_files_oldest_first(logged: Daemon) -> None:
    client = logged.openai()
    client.completions.create(model="tiny", prompt="x", max_tokens=1)
    current = _current_log(logged)
    # llama-server writes a few lines per request: enough requests fill three files and the current one.
    for _ in range(300):
        if len(rotated_logs(current)) == 4:
            break
        client.completions.create(model="tiny", prompt="x", max_tokens=1)
    logged.post("/engines/unload", {"models": ["tiny"]})
    logged.wait_for(lambda: logged.ps() == [], what="the runner to stop")
    files = rotated_logs(current)
    assert len(files) == 4 and all(p.stat().st_size <= CAP for p in files)

    served = logged.http.get("/logs", params={"runner": "tiny", "tail": 10_000}).text.splitlines()
    on_disk = _lines_on_disk(current)
    # Every file is read whole while they fit the 1 MiB cap: the lines are the files' own, oldest first.
    assert served == on_disk
    oldest = files[0].read_bytes().decode("utf-8", "replace").splitlines()
    assert oldest[1] in served[:len(oldest)]
    assert served[-3:] == logged.http.get("/logs", params={"runner": "tiny", "tail": 3}).text.splitlines()


def test_a_removed_models_runner_logs_go_with_it(logged: Daemon) -> None:
    logged.openai().completions.create(model="other", prompt="x", max_tokens=1)
    logged.openai().completions.create(model="tiny", prompt="x", max_tokens=1)
    logged.post("/engines/unload", {"models": ["other", "tiny"]})
    logged.wait_for(lambda: logged.ps() == [], what="the runners to stop")
    before = _files(logged)
    others = set(model_logs(logged.root / "data" / "logs", ["llama.cpp"], "other:latest"))
    assert others and others < set(before)
    # Kept after its runner exited: readable for a post-mortem.
    assert logged.http.get("/logs", params={"runner": "other"}).status_code == 200

    assert logged.http.delete("/models/other").status_code == 200
    assert _files(logged) == sorted(set(before) - others)
    assert logged.http.get("/logs", params={"runner": "other"}).status_code == 404
    assert logged.http.get("/logs", params={"runner": "tiny", "tail": 5}).text.strip()


def test_read_end_joins_lines_split_by_rotation(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    log = RotatingLog(path, max_bytes=100, keep=3)
    written = b"".join(b"line %03d\n" % i for i in range(60))  # 540 bytes, written in 7-byte pieces
    for i in range(0, len(written), 7):
        log.write(written[i:i + 7])
    log.close()
    kept = b"".join(p.read_bytes() for p in rotated_logs(path))
    assert len(rotated_logs(path)) == 4 and written.endswith(kept)

    whole, cut, end = read_end(path, 10_000)
    assert (whole, cut, end) == (kept, False, path.stat().st_size)

    part, cut, end = read_end(path, 150)  # more than the current file, less than all of them
    assert part == kept[-150:] and cut and end == path.stat().st_size


def test_read_end_without_a_current_file(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    path.with_name("r.log.2").write_bytes(b"a\n")
    path.with_name("r.log.1").write_bytes(b"b\n")
    path.with_name("r.log.x").write_bytes(b"not a rotation\n")
    assert read_end(path, 100) == (b"a\nb\n", False, 0)
