"""Engine manifests without a daemon: parsing YAML and TOML, the refusals (each naming its field and
line), the callers' flag table, rendering argv, and a fuzz of the parser. Daemon-level tests (a real
llama-server defined by a manifest, hostile manifests over HTTP) are in test_manifest_engine.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.base import BackendConfiguration, EngineContext, Mode, ModelRef
from backends.endpoint import Endpoint, EndpointKind
from backends.flags import FlagError
from backends.manifest import ManifestError, backend_class, parse_manifest
from backends.manifest.template import render

BUILTINS = {"llama.cpp", "vllm"}


@pytest.fixture(scope="module")
def engine_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An executable in a directory only its owner may write (what a manifest may name)."""
    directory = tmp_path_factory.mktemp("engine-bin")
    directory.chmod(0o755)
    path = directory / "fake-engine"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def yaml_manifest(executable: Path | str, **overrides: str) -> str:
    fields = {
        "name": "demo-custom",
        "command": f'["{executable}", "--model", "{{model_path}}", "--host", "{{host}}", "--port", "{{port}}"]',
        "listen": "tcp",
        "extra": "",
    }
    fields.update(overrides)
    return (
        f"name: {fields['name']}\n"
        "description: a test engine\n"
        "capabilities: [chat, completions, streaming]\n"
        "versions:\n"
        "  v1:\n"
        f"    command: {fields['command']}\n"
        f"    listen: {fields['listen']}\n"
        "    readiness: {path: /health, timeout: 30}\n"
        "flags:\n"
        "  policy: allowlist\n"
        "  allow:\n"
        "    - {name: --temp, type: number, min: 0, max: 2}\n"
        "    - {name: --mlock, type: switch}\n"
        f"{fields['extra']}"
    )


def refusal(text: str, fmt: str = "yaml", reserved: set[str] = BUILTINS) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, fmt, reserved=reserved)  # type: ignore[arg-type]
    return info.value


def test_a_yaml_manifest_becomes_a_backend(engine_bin: Path) -> None:
    manifest, flags = parse_manifest(yaml_manifest(engine_bin), "yaml", reserved=BUILTINS)
    cls = backend_class(manifest, flags)
    assert (cls.name, cls.endpoint_kind, cls.readiness_path, cls.readiness_timeout) == \
        ("demo-custom", EndpointKind.TCP, "/health", 30)
    assert sorted(cls.capabilities) == ["chat", "completions", "streaming"]
    assert sorted(cls.native_apis) == ["chat_completions", "completions"]  # no Messages/Responses: translated
    backend = cls.create(EngineContext(cache_dir=engine_bin.parent, cpu_count=3), None)  # type: ignore[arg-type]
    model = ModelRef(name="my model", path=Path("/models/with space.gguf"))
    config = BackendConfiguration(runtime_flags=backend.validate_flags(["--temp", "0.5", "--mlock"]))
    argv = backend.argv(Endpoint.tcp(4321), model, Mode.COMPLETION, config)
    # One element per template element, whatever the values hold: never a shell string.
    assert argv == [str(engine_bin), "--model", "/models/with space.gguf", "--host", "127.0.0.1", "--port", "4321",
                    "--temp", "0.5", "--mlock"]
    assert backend.status().installed and backend.status().version == "v1"
    assert not backend.required_memory(model, Mode.COMPLETION, config).known  # memory: unknown by default


def test_the_same_manifest_in_toml(engine_bin: Path) -> None:
    text = (
        'name = "demo-custom"\n'
        'capabilities = ["embeddings"]\n'
        'modes = ["embedding"]\n'
        '[versions.v2]\n'
        f'command = "{engine_bin} --model {{model_path}} --uds {{socket}} --threads {{threads}}"\n'
        '[memory]\n'
        'kind = "fixed"\n'
        'ram_bytes = 1000\n'
    )
    manifest, flags = parse_manifest(text, "toml", reserved=BUILTINS)
    assert flags is None  # policy none: callers pass no flags
    assert manifest.version.command[3:] == ["--uds", "{socket}", "--threads", "{threads}"]
    backend = backend_class(manifest, flags).create(EngineContext(cache_dir=engine_bin.parent, cpu_count=2),
                                                    None)  # type: ignore[arg-type]
    with pytest.raises(FlagError, match="accepts no runtime flags"):
        backend.validate_flags(["--temp", "1"])
    assert backend.required_memory(ModelRef(name="m", path=engine_bin), Mode.EMBEDDING,
                                   BackendConfiguration()).ram_bytes == 1000


@pytest.mark.parametrize(("override", "field", "line", "fragment"), [
    ({"command": '["{bin}", "--port", "{{prot}}"]'}, "versions.v1.command[2]", 6, "unknown placeholder {prot}"),
    ({"command": '["fake-engine", "--port", "{{port}}"]'}, "versions.v1.command[0]", 6, "not an absolute path"),
    ({"command": '["/nonexistent/engine", "--port", "{{port}}"]'}, "versions.v1.command[0]", 6,
     "No such file"),
    ({"command": '["/tmp/../{bin}", "--port", "{{port}}"]'}, "versions.v1.command[0]", 6, "not a normalised path"),
    ({"name": "llama.cpp"}, "name", 1, "shadows the engine 'llama.cpp'"),
    ({"name": "vllm-custom"}, "name", 1, "shadows the engine 'vllm'"),
    ({"name": "Demo"}, "name", 1, "ending in '-custom'"),
    ({"command": '["{bin}", "--host", "0.0.0.0", "--port", "{{port}}"]'}, "versions.v1.command[1]", 6,
     "--host is the daemon's"),
    ({"command": '["{bin}", "--port", "{{port}}", "--api-key", "x"]'}, "versions.v1.command[3]", 6,
     "--api-key is the daemon's"),
    ({"command": '["{bin}", "--port={{port}}", "--model", "/etc/passwd"]'}, "versions.v1.command[2]", 6,
     "--model is the daemon's"),
    ({"command": '["{bin}", "--port", "{{port}}"]', "listen": "unix"}, "versions.v1.command", 6,
     "needs {socket}"),
    ({"command": '["{bin}", "--port", "{{port}}", "{{model_path!r}}"]'}, "versions.v1.command[3]", 6,
     "no format spec or conversion"),
    ({"command": '["{bin}", "--port", "{{port}}", "{{model_path.__class__}}"]'}, "versions.v1.command[3]", 6,
     "unknown placeholder"),
    ({"extra": "    - {name: --port, type: integer}\n"}, "flags.allow[2].name", 14,
     "set by runnerd or by the template"),
    ({"extra": "    - {name: --model, type: text}\n"}, "flags.allow[2].name", 14, "set by runnerd"),
    ({"extra": "    - {name: --hos, type: text}\n"}, "flags.allow[2].name", 14, "set by runnerd"),
    ({"command": '["{bin}", "--port", "{{port}}", "--hos", "0.0.0.0"]'}, "versions.v1.command[3]", 6,
     "--hos is the daemon's"),
    ({"extra": "memory: {kind: fixed}\n"}, "memory", 14, "needs ram_bytes or vram_bytes"),
    ({"listen": "tcp\n    environment: {LLAMA_ARG_HOST: 0.0.0.0}"}, "versions.v1.environment.LLAMA_ARG_HOST", 8,
     "the listen address and API keys are the daemon's"),
    ({"extra": "surprise: 1\n"}, "surprise", 14, "Extra inputs are not permitted"),
])
def test_refusals_name_the_field_and_line(engine_bin: Path, override: dict[str, str], field: str, line: int,
                                          fragment: str) -> None:
    # The cases write placeholders doubled, as in the f-string the manifest is made from.
    overrides = {k: v.replace("{bin}", str(engine_bin)).replace("{{", "{").replace("}}", "}")
                 for k, v in override.items()}
    error = refusal(yaml_manifest(engine_bin, **overrides))
    assert (error.field, error.line) == (field, line), str(error)
    assert fragment in str(error) and f"{field} (line {line})" in str(error)


@pytest.mark.parametrize("version", ["../up", "a/b", "..", "v1..2", ".hidden"])
def test_version_names_cannot_reach_outside_a_directory(engine_bin: Path, version: str) -> None:
    text = yaml_manifest(engine_bin).replace("  v1:\n", f"  '{version}':\n")
    error = refusal(text)
    assert error.field == f"versions.{version}" and error.line == 5 and "without '/' or '..'" in str(error)


def test_toml_refusals_name_the_line(engine_bin: Path) -> None:
    text = f'name = "t-custom"\ncapabilities = ["chat"]\n\n[versions.v1]\ncommand = ["{engine_bin}", "{{nope}}"]\n'
    error = refusal(text, "toml")
    assert error.field == "versions.v1.command[1]" and error.line == 5 and "unknown placeholder {nope}" in str(error)


def test_world_writable_places_are_refused(engine_bin: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    exe = shared / "engine"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert "writable by every user" in str(refusal(yaml_manifest(exe)))
    private = tmp_path / "private"
    private.mkdir(mode=0o755)
    loose = private / "engine"
    loose.write_text("#!/bin/sh\n")
    loose.chmod(0o757)
    assert stat.S_IMODE(os.stat(loose).st_mode) & stat.S_IWOTH
    assert "writable by every user" in str(refusal(yaml_manifest(loose)))


def test_yaml_aliases_are_refused(engine_bin: Path) -> None:
    text = yaml_manifest(engine_bin) + "default_args: &a [x]\nmore: *a\n"
    error = refusal(text)
    assert "aliases" in str(error) and error.line == 15


def test_capabilities_and_paths_must_agree(engine_bin: Path) -> None:
    text = yaml_manifest(engine_bin, extra="paths: [/v1/chat/completions, /v1/completions, /v1/messages]\n")
    manifest, _ = parse_manifest(text, "yaml", reserved=BUILTINS)
    assert "messages" in manifest.native_apis  # listed: the engine serves Anthropic Messages itself
    error = refusal(yaml_manifest(engine_bin, extra="paths: [/v1/chat/completions]\n"))
    assert error.field == "paths" and "completions" in str(error)
    assert "not a path runnerd sends" in str(refusal(yaml_manifest(engine_bin, extra="paths: [/admin]\n")))


def test_render_keeps_literal_braces() -> None:
    assert render(["{{literal}}", "--x={port}"], {"port": "1"}) == ["{literal}", "--x=1"]


_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | _TEXT | st.sampled_from(
        ["{port}", "{socket}", "{model_path}", "/bin/sh", "--host", "tcp", "unix", "chat", "gguf", "-custom"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "versions", "command", "listen", "capabilities", "flags", "allow", "policy",
                         "memory", "kind", "v1", "default_version", "paths", "mode_args", "environment", "x"]),
        inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=st.dictionaries(st.sampled_from(["name", "capabilities", "versions", "flags", "memory", "paths",
                                                 "default_args", "modes", "default_version"]), _VALUE, max_size=8),
       raw=_TEXT)
def test_fuzz_the_parser_only_ever_answers_manifest_error(document: dict[str, object], raw: str) -> None:
    import json

    import yaml

    for text, fmt in ((yaml.safe_dump(document), "yaml"), (json.dumps(document), "yaml"), (raw, "yaml"),
                      (raw, "toml")):
        try:
            manifest, _ = parse_manifest(text, fmt, reserved=BUILTINS)  # type: ignore[arg-type]
        except ManifestError as exc:
            assert str(exc)
            assert exc.line is None or exc.line >= 1
        else:  # whatever passed keeps the rules: a suffixed name, placeholders known, listen address templated
            assert manifest.name.endswith("-custom")
            assert any("{port}" in e or "{socket}" in e for e in manifest.version.command)


_ELEMENTS = st.sampled_from([
    "{port}", "{socket}", "{host}", "{model_path}", "{model_name}", "{ctx}", "{threads}", "{gpu_ids}", "{nope}",
    "--host", "--port", "--model", "--api-key", "--alias", "--uds", "--port={port}", "--host=0.0.0.0", "--",
    "-m", "x", "0.0.0.0", "{{", "}}", "{", "{port!r}", "--temp", "-1", "/etc/passwd", "--threads",
]) | _TEXT


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(command=st.lists(_ELEMENTS, max_size=8), listen=st.sampled_from(["tcp", "unix"]),
       allow=st.lists(st.sampled_from(["--temp", "--port", "--host", "--threads", "--model", "--x", "-m"]),
                      max_size=3, unique=True),
       default_args=st.lists(_ELEMENTS, max_size=3))
def test_fuzz_whatever_passes_keeps_the_rules(engine_bin: Path, command: list[str], listen: str, allow: list[str],
                                              default_args: list[str]) -> None:
    """Near-valid manifests: a real executable and random argv elements. Whatever is accepted keeps the
    daemon's rules; whatever is refused is refused with a ManifestError naming a field."""
    from backends.manifest.checks import template_options
    from backends.manifest.daemon_options import DAEMON_OPTIONS

    document = {
        "name": "fuzz-custom", "capabilities": ["chat"],
        "versions": {"v1": {"command": [str(engine_bin), *command], "listen": listen}},
        "default_args": default_args,
        "flags": {"policy": "allowlist", "allow": [{"name": n, "type": "number"} for n in allow]},
    }
    import json

    try:
        manifest, flags = parse_manifest(json.dumps(document), "yaml", reserved=BUILTINS)
    except ManifestError as exc:
        assert exc.field and exc.line is not None
        return
    argv = manifest.version.command
    assert ("{port}" if listen == "tcp" else "{socket}") in " ".join(argv)
    for i, element in enumerate(argv[1:], 1):
        option = element.partition("=")[0]
        if option in DAEMON_OPTIONS:
            value = element.partition("=")[2] if "=" in element else (argv[i + 1] if i + 1 < len(argv) else None)
            assert value in DAEMON_OPTIONS[option]
    accepted = flags.allowed_spellings if flags is not None else frozenset()
    assert not accepted & (set(DAEMON_OPTIONS) | template_options(manifest))
    backend = backend_class(manifest, flags).create(EngineContext(cache_dir=engine_bin.parent), None)  # type: ignore[arg-type]
    endpoint = Endpoint.tcp(1234) if listen == "tcp" else Endpoint.unix(Path("/run/x.sock"))
    rendered = backend.argv(endpoint, ModelRef(name="m", path=Path("/m.gguf")), Mode.COMPLETION,
                            BackendConfiguration())
    assert rendered[0] == str(engine_bin) and len(rendered) == len(argv) + len(default_args)


def test_the_readme_example_is_a_valid_manifest() -> None:
    """The complete manifest in README's "An engine defined by a manifest" (its executable is not on this
    host, so files are not checked)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("#### An engine defined by a manifest"):]
    example = section[section.index("```yaml\n") + len("```yaml\n"):]
    example = example[:example.index("```")]
    manifest, flags = parse_manifest(example, "yaml", reserved=BUILTINS, check_files=False)
    assert manifest.name == "llama-server-custom" and manifest.memory.kind == "gguf"
    assert flags is not None and "--temp" in flags.allowed_spellings and "--port" not in flags.allowed_spellings
    assert manifest.native_apis == {"chat_completions", "completions", "embeddings"}
