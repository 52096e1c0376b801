"""llama.cpp's runtime-flag allowlist follows the installed build: it is made from that build's own
`llama-server --help`, read once per binary, then runnerd's refusals apply (paths, URLs, hosts,
daemon-owned flags). The real pinned build is read here; one test reads a stand-in help text of an
older build (named so below), since only one build is installed on these machines."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from backends.base import BackendConfiguration, Mode
from backends.flags import FlagError
from backends.llamacpp import LlamaCppBackend
from backends.llamacpp.argv import build_env
from backends.llamacpp.flags import LLAMACPP_DAEMON_FLAGS, LLAMACPP_FLAGS, version_flags
from backends.llamacpp.help import help_options, parse_help
from backends.llamacpp.memory import settings_from_config

_OPTION_COLUMN = re.compile(r"(?:^|,\s+)(-{1,2}[A-Za-z0-9][A-Za-z0-9_.-]*)")
# Placeholders and words of options that name a file, a directory or a place on the network.
_PLACE = re.compile(r"FNAME|FILE|PATH|DIR|URL|HOST|PORT|SERVERS|REPO", re.I)


@pytest.fixture(scope="module")
def help_text(llama_server: Path) -> str:
    done = subprocess.run([str(llama_server), "--help"], capture_output=True, text=True, timeout=60,
                          env=build_env(llama_server), check=True)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def engine_spellings(help_text: str) -> set[str]:
    """Every spelling the engine lists, read here with a regex of its own (not runnerd's parser)."""
    return {name for line in help_text.splitlines() if line.startswith("-") and not line.startswith("---")
            for name in _OPTION_COLUMN.findall(re.split(r"(?<![,\s])\s{2,}", line)[0])}


@pytest.fixture(scope="module")
def backend(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> LlamaCppBackend:
    return LlamaCppBackend(cache_dir=tmp_path_factory.mktemp("cache"), binary=llama_server)


def test_every_accepted_flag_is_one_of_the_builds_own(backend, engine_spellings):
    table = backend.build_flags()
    assert table is not LLAMACPP_FLAGS and backend.flags is table
    accepted = table.allowed_spellings
    assert len(accepted) > 200 and len(engine_spellings) > 250
    assert accepted <= engine_spellings, sorted(accepted - engine_spellings)
    # Flags of this build that the pinned table did not type are accepted now, with their types checked.
    assert backend.validate_flags(["--video-fps", "2.5", "--defrag-thold", "0.1", "--lora-init-without-apply"]) \
        == ["--video-fps", "2.5", "--defrag-thold", "0.1", "--lora-init-without-apply"]
    assert backend.validate_flags(["-j", '{"type": "object"}']) == ["--json-schema", '{"type": "object"}']
    for bad, reason in ((["--video-fps", "fast"], "must be a number"), (["--video-timestamp-interval", "1.5"],
                                                                       "must be an integer"),
                        (["--grammar", "/etc/passwd"], "names a path")):
        with pytest.raises(FlagError, match=reason):
            backend.validate_flags(bad)


def test_paths_urls_and_daemon_flags_stay_refused(backend, help_text, engine_spellings):
    table = backend.build_flags()
    places = [option for option in parse_help(help_text)
              if (option.value and _PLACE.search(option.value)) or re.search(r"\bfile\b", option.description, re.I)]
    assert len(places) > 20
    for option in places:
        for spelling in option.all_spellings:
            with pytest.raises(FlagError):
                table.validate([spelling, "x"])
    owned = sorted(LLAMACPP_DAEMON_FLAGS & engine_spellings)
    assert {"--host", "--port", "--model", "--api-key", "--ctx-size"} <= set(owned)
    for spelling in owned:
        with pytest.raises(FlagError, match="set by runnerd"):
            table.validate([spelling, "1"])
    for spelling in ("--override-tensor", "--override-kv", "--spec-ngram-size-n", "--rpc", "--hf-repo"):
        assert spelling in engine_spellings
        with pytest.raises(FlagError, match="refused"):
            table.validate([spelling, "x"])


def test_the_option_list_is_read_once_per_binary(llama_server, tmp_path):
    env = build_env(llama_server)
    first = help_options(llama_server, env)
    assert help_options(llama_server, env) is first
    # Another binary (a copy of the build's launcher script here) is read on its own.
    copy = tmp_path / "llama-server"
    copy.write_text(f"#!/bin/sh\nexec {llama_server} \"$@\"\n")
    copy.chmod(0o755)
    again = help_options(copy, env)
    assert again == first and again is not first


# A stand-in: the option lines an older llama-server printed (before --load-mode), as common/arg.cpp laid them out.
OLDER_BUILD_HELP = """\
----- common params -----

-t,    --threads N                      number of threads to use during generation (default: -1)
--mlock                                 force system to keep model in RAM rather than swapping or compressing
--mmap, --no-mmap                       whether to memory-map model (if disabled, slower load but may reduce
                                        pageouts if not using mlock) (default: enabled)
-m,    --model FNAME                    model path to load
--host HOST                             ip address to listen, or bind to an UNIX socket if the address ends
                                        with .sock (default: 127.0.0.1)
"""


def test_an_older_build_gets_its_own_flags_and_the_estimate_counts_them():
    table = version_flags(parse_help(OLDER_BUILD_HELP))
    assert table.validate(["--no-mmap", "--mlock", "-t", "2"]) == ["--no-mmap", "--mlock", "--threads", "2"]
    with pytest.raises(FlagError, match=r"not on the llama\.cpp allowlist"):
        table.validate(["--load-mode", "none"])  # this build has no such flag
    for spelling in ("--model", "--host"):
        with pytest.raises(FlagError, match="set by runnerd"):
            table.validate([spelling, "x"])
    mapped = settings_from_config(Mode.COMPLETION, BackendConfiguration(), 512, False)
    read = settings_from_config(Mode.COMPLETION, BackendConfiguration(runtime_flags=["--no-mmap", "--mlock"]), 512,
                                False)
    assert mapped.use_mmap and not read.use_mmap


def test_a_flag_only_this_build_knows_runs_the_real_engine(daemon):
    assert daemon.http.get("/engines/status").status_code == 200  # reads the build's option list
    flags = ["--video-fps", "2", "--defrag-thold", "0.1", "--load-mode", "none"]
    configured = daemon.post("/engines/_configure", {"model": "tiny", "runtime_flags": flags})
    assert configured.status_code == 202, configured.text
    done = daemon.post("/engines/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert done.status_code == 200, done.text
    runner = next(r for r in daemon.ps() if r["model"].startswith("tiny"))
    assert runner["backend"] == "llama.cpp"
    daemon.post("/engines/unload", {"all": True})
    daemon.http.request("DELETE", "/engines/_configure", params={"model": "tiny"})
