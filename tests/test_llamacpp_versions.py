"""Two llama.cpp builds side by side: models pinned to each answer at once through a real daemon, and a
version in use is not removed from under its models.

The builds are the real ones `make engine` keeps in the user cache: the pinned llama-cpp-python source and
an older one (the Makefile's LLAMACPP_OLD). Each test daemon gets its own cache directory whose build
entries are symlinks to those, so removing a version here removes the symlink, never the shared build.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from backends.base import InstallError
from backends.flags import FlagError
from backends.llamacpp import LlamaCppBackend
from backends.llamacpp.install import (
    SOURCE_VERSION,
    build_key,
    build_llama_server,
    check_source_version,
    cmake_options,
    installed_builds,
    remove_build,
)
from runnerd.config import load_settings
from tests.conftest import Daemon
from tests.tinymodels import write_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
CPU = cmake_options(cuda=False)


def _makefile_old_version() -> str:
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("LLAMACPP_OLD :="):
            return line.split(":=", 1)[1].strip()
    raise AssertionError("the Makefile names no LLAMACPP_OLD")


@pytest.fixture(scope="module")
def other_build() -> tuple[str, Path]:
    """A cached build of another source version than the pinned one; built now if missing (as `make test`
    builds it first), never skipped."""
    cache = load_settings().cache_dir
    builds = {v: b for v, b in installed_builds(cache, CPU).items() if v != SOURCE_VERSION}
    if not builds:
        version = _makefile_old_version()
        builds[version] = asyncio.run(build_llama_server(cache, cuda=False, source_version=version))
    version = max(builds, key=lambda v: tuple(int(p) for p in v.split(".")))
    return version, builds[version]


def _link_build(cache: Path, version: str, binary: Path) -> None:
    entry = cache / "llama.cpp" / build_key(version, CPU)
    entry.mkdir(parents=True)
    (entry / "bin").symlink_to(binary.resolve().parent, target_is_directory=True)


@pytest.fixture(scope="module")
def two_builds_daemon(llama_server: Path, other_build: tuple[str, Path], smollm2_model: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    """`old` is SmolLM2 (the older build's server refuses, with a 500, the random bytes a tiny model writes),
    `new` the tiny model."""
    models = tmp_path_factory.mktemp("versions")
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    _link_build(root / "cache", SOURCE_VERSION, llama_server)
    _link_build(root / "cache", other_build[0], other_build[1])
    d = Daemon(root, llama_server, {"new": write_tiny_llama(models / "new.gguf"),
                                    "old": smollm2_model},
               {"RUNNERD_LLAMACPP__CUDA": "off"}, [])
    yield d, other_build[0]
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _versions(d: Daemon) -> list[str]:
    """The cached builds: the listing's versions without the binary the test daemon names in its settings."""
    backends = d.http.get("/engines/backends").json()
    llamacpp = next(b for b in backends if b["name"] == "llama.cpp")
    named = llamacpp["named_binary"]
    assert named is not None and llamacpp["versions"][-1] == named["version"]
    return list(llamacpp["versions"][:-1])


def _switches_only_in(new: Path, old: Path, cache: Path) -> dict[str, str]:
    """For each build, a flag without a value that its own option list has and the other's lacks."""
    reader = LlamaCppBackend(cache_dir=cache, cuda=False)
    tables = {"new": reader.build_flags(new), "old": reader.build_flags(old)}
    found = {}
    for build, other in (("new", "old"), ("old", "new")):
        for flag in sorted(tables[build].allowed_spellings - tables[other].allowed_spellings):
            try:
                reader.validate_flags([flag], tables[build])
            except FlagError:
                continue  # it takes a value
            found[build] = flag
            break
    assert set(found) == {"new", "old"}, f"no switch tells these builds apart: {tables}"
    return found


def _runner_exe(d: Daemon, model: str) -> str:
    runner = next(r for r in d.ps() if r["model"].startswith(model))
    return psutil.Process(runner["pid"]).exe()


def test_two_versions_answer_at_once_and_a_pinned_one_is_not_removed(two_builds_daemon, llama_server, other_build,
                                                                     tmp_path):
    d, old = two_builds_daemon
    assert _versions(d) == sorted([SOURCE_VERSION, old], key=lambda v: tuple(map(int, v.split("."))))

    # A version that is not installed cannot be pinned: nothing is stored.
    missing = d.post("/engines/llama.cpp/_configure", {"model": "old", "options": {"backend_version": "0.0.1"}})
    assert missing.status_code == 400 and "llama.cpp 0.0.1 is not installed" in missing.text
    bad = d.post("/engines/llama.cpp/_configure", {"model": "old", "options": {"backend_version": "../0.3"}})
    assert bad.status_code == 400 and "backend_version" in bad.text
    assert all(not c["model"].startswith("old") for c in d.http.get("/engines/_configure").json()["configurations"])

    # Flags follow the pinned build at configure time, as at the runner's start: a switch only one build has
    # is accepted for the model pinned to it and refused, with nothing stored, for the one pinned to the other.
    only = _switches_only_in(llama_server, other_build[1], tmp_path)
    for model, version, own, other in (("new", SOURCE_VERSION, only["new"], only["old"]),
                                       ("old", old, only["old"], only["new"])):
        refused = d.post("/engines/llama.cpp/_configure", {"model": model, "options": {"backend_version": version},
                                                          "runtime_flags": [other]})
        assert refused.status_code == 400 and f"'{other}' refused" in refused.text, refused.text
        assert all(not c["model"].startswith(model) for c in d.http.get("/engines/_configure").json()["configurations"])
        ok = d.post("/engines/llama.cpp/_configure", {"model": model, "options": {"backend_version": version},
                                                     "runtime_flags": [own]})
        assert ok.status_code in (200, 202), ok.text
        estimate = d.http.get(f"/models/{model}/estimate").json()
        assert (estimate["backend"], estimate["backend_version"], estimate["known"]) == ("llama.cpp", version, True)

    # Both runners loaded at the same time, each from its own build, answering requests sent together.
    def chat(model: str) -> str:
        answer = d.openai().chat.completions.create(model=model, max_tokens=4,
                                                    messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        return answer.model.split(":")[0]

    for _ in range(2):
        with ThreadPoolExecutor(2) as pool:
            assert sorted(pool.map(chat, ["old", "new"])) == ["new", "old"]
    running = {r["model"].split(":")[0]: r for r in d.ps() if r["state"] != "exited"}
    assert set(running) == {"old", "new"} and all(psutil.pid_exists(r["pid"]) for r in running.values())
    assert _runner_exe(d, "old") == str(other_build[1].resolve())
    assert _runner_exe(d, "new") == str(llama_server.resolve())

    # In use (pinned and running): refused, naming the model; nothing is removed.
    refused = d.post("/engines/uninstall-backend", {"backend": "llama.cpp", "version": old})
    assert refused.status_code == 409, refused.text
    message = refused.json()["error"]["message"]
    assert "pinned by old:latest (completion); running old:latest (completion)" in message and "new" not in message
    assert old in _versions(d)
    old_pid = next(r["pid"] for r in d.ps() if r["model"].startswith("old"))
    assert psutil.pid_exists(old_pid)

    # The CLI says the same and exits non-zero.
    cli = [sys.executable, "-m", "runnerd.cli", "backends"]
    run = subprocess.run([*cli, "rm", f"llama.cpp@{old}", "--socket", str(d.socket)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert run.returncode != 0 and "old:latest (completion)" in run.stderr

    # Forced: the runner on that build is stopped first, the other one keeps serving.
    new_pid = next(r["pid"] for r in d.ps() if r["model"].startswith("new"))
    forced = subprocess.run([*cli, "rm", f"llama.cpp@{old}", "--force", "--socket", str(d.socket)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert forced.returncode == 0, forced.stderr
    assert "stopped 1 runner(s)" in forced.stdout and f"removed llama.cpp {old}" in forced.stdout
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert [r["model"].split(":")[0] for r in d.ps() if r["state"] != "exited"] == ["new"]
    assert psutil.pid_exists(new_pid)
    assert _versions(d) == [SOURCE_VERSION]
    assert other_build[1].is_file()  # the shared build behind the symlink is untouched

    # The configuration stays pinned to the removed version: its runner is refused with the reason.
    gone = d.http.post("/engines/v1/chat/completions",
                       json={"model": "old", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert gone.status_code >= 400 and f"llama.cpp {old} is not installed" in gone.text


def test_the_version_listing_and_install_answer_without_building(two_builds_daemon):
    d, _ = two_builds_daemon
    listed = subprocess.run([sys.executable, "-m", "runnerd.cli", "backends", "ls", "--socket", str(d.socket)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert listed.returncode == 0 and SOURCE_VERSION in listed.stdout
    done = d.post("/engines/install-backend", {"backend": "llama.cpp", "version": SOURCE_VERSION})
    assert done.status_code == 200 and done.json()["state"] == "succeeded"
    assert "already installed" in done.json()["message"]
    for bad in ("0.3.30 --index-url http://x", "../../etc", "latest"):
        refused = d.post("/engines/install-backend", {"backend": "llama.cpp", "version": bad})
        assert refused.status_code == 400 and "release number" in refused.text, refused.text
        assert refused.json()["error"]["param"] == "version"


_OPTION_COLUMN = re.compile(r"(?:^|,\s+)(-{1,2}[A-Za-z0-9][A-Za-z0-9_.-]*)")


def _engine_spellings(binary: Path) -> set[str]:
    """Every spelling a build's `--help` lists, read with a regex of this test's own (not runnerd's parser)."""
    done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60, check=True,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_LIBRARY_PATH": str(binary.parent)})
    return {name for line in (done.stdout + done.stderr).splitlines() if line.startswith("-")
            and not line.startswith("---") for name in _OPTION_COLUMN.findall(re.split(r"(?<![,\s])\s{2,}", line)[0])}


def test_each_versions_allowlist_is_its_own_builds_options(llama_server, other_build, tmp_path):
    cache = tmp_path / "cache"
    _link_build(cache, SOURCE_VERSION, llama_server)
    _link_build(cache, other_build[0], other_build[1])
    backend = LlamaCppBackend(cache_dir=cache, cuda=False)
    tables = {}
    for version in backend.installed_versions():
        binary = backend.version_binary(version)
        spellings = _engine_spellings(binary)
        tables[version] = backend.build_flags(binary).allowed_spellings
        assert tables[version] and tables[version] <= spellings, sorted(tables[version] - spellings)
        # Whatever a build calls them (the older one has --hf-repo-v <user>/<model>), fetch flags stay refused.
        assert not {s for s in tables[version] if "hf" in s.split("-")}, version
    assert set(tables) == {SOURCE_VERSION, other_build[0]}


def test_cached_builds_are_listed_by_release_for_these_options_only(tmp_path):
    def build(name: str, binary: bool = True) -> None:
        (tmp_path / "llama.cpp" / name / "bin").mkdir(parents=True)
        if binary:
            (tmp_path / "llama.cpp" / name / "bin" / "llama-server").write_text("")

    build(build_key("0.3.36", CPU))
    build(build_key("0.3.9", CPU))
    build(build_key("0.3.30", cmake_options(cuda=True)))  # another flavour: not this backend's
    build(build_key("0.3.28", CPU), binary=False)  # a tree without its binary is not installed
    build(f".build-{build_key('0.3.31', CPU)}-x")  # a build under way
    build("evil;x" + build_key("", CPU))
    assert list(installed_builds(tmp_path, CPU)) == ["0.3.9", "0.3.36"]
    remove_build(tmp_path, "0.3.9", CPU)
    assert list(installed_builds(tmp_path, CPU)) == ["0.3.36"]
    assert not any(p.name.startswith(".removing") for p in (tmp_path / "llama.cpp").iterdir())
    for bad in ("0.3.30 --index-url=http://x", "../0.3", "0.3.30; rm", "latest", "1"):
        with pytest.raises(InstallError, match="release number"):
            check_source_version(bad)
