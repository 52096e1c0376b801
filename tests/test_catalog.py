"""The engine catalog: its format and refusals, the meta entry's resolution to this host's variant, and, through
a real daemon, listing, installing a pip plan into a private environment (a real pip install of a small
pure-Python package from PyPI), upgrading, and a removal refused while a manifest engine runs from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from backends.catalog import CatalogError, Variant, host_variants, parse_catalog, resolve, shipped_catalog
from backends.catalog.model import version_order
from backends.llamacpp.install import SOURCE_VERSION, build_key, cmake_options
from runnerd.catalog import CatalogItem, load_catalog, upgrades
from tests.conftest import Daemon

ROOT = Path(__file__).resolve().parent.parent

# --- format ----------------------------------------------------------------------------------------------


def test_the_shipped_catalog_offers_the_pinned_llamacpp_for_every_host():
    catalog = shipped_catalog()
    llama = catalog.engine("llama.cpp")
    assert llama is not None and llama.newest == SOURCE_VERSION
    for engine in catalog.engines:
        for version, spec in engine.versions.items():
            assert Variant.CPU in spec.variants, f"{engine.name} {version} has no CPU build"


ENGINE = """
engines:
  - name: thing
    versions:
      "1.0":
        variants:
          cpu: {kind: pip, packages: ["thing==1.0"]}
"""


@pytest.mark.parametrize(("old", "new", "field"), [
    ('["thing==1.0"]', '["thing @ https://evil.example/x.whl"]', "packages"),
    ('["thing==1.0"]', '["--index-url=https://evil.example", "thing==1.0"]', "packages"),
    ('["thing==1.0"]', '["thing>=1.0"]', "packages"),
    ('["thing==1.0"]', '["../thing"]', "packages"),
    ('["thing==1.0"]', "[]", "packages"),
    ("{kind: pip, packages: [\"thing==1.0\"]}", "{kind: source-build, source_version: '1.0', "
     "cmake_options: ['-DX=$(touch /tmp/x)']}", "cmake_options"),
    ("{kind: pip, packages: [\"thing==1.0\"]}", "{kind: source-build, source_version: 'main', cmake_options: []}",
     "source_version"),
    ("{kind: pip, packages: [\"thing==1.0\"]}", "{kind: binary, path: bin/thing}", "path"),
    ("{kind: pip, packages: [\"thing==1.0\"]}", "{kind: binary, path: /opt/../etc/thing}", "path"),
    ("{kind: pip, packages: [\"thing==1.0\"]}", "{kind: shell, command: 'curl x | sh'}", "cpu"),
    ('"1.0":', '"../1.0":', "versions"),
    ('"1.0":', '"a/b":', "versions"),
    ("name: thing", "name: Thing Engine", "name"),
    ("cpu:", "tpu:", "tpu"),
    ("    versions:", "    default_version: '9'\n    versions:", "default_version"),
    ("    versions:", "    run_after_install: yes\n    versions:", "run_after_install"),
])
def test_hostile_entries_are_refused_naming_the_field(old, new, field):
    text = ENGINE.replace(old, new)
    assert text != ENGINE
    with pytest.raises(CatalogError) as refused:
        parse_catalog(text, "op.yaml")
    assert field in str(refused.value) and str(refused.value).startswith("op.yaml: "), str(refused.value)


def test_duplicates_aliases_and_size_are_refused():
    twice = ENGINE + ENGINE.split("engines:\n", 1)[1]
    with pytest.raises(CatalogError, match=r"engines\.1\.name|listed twice"):
        parse_catalog(twice, "op.yaml")
    with pytest.raises(CatalogError, match="YAML aliases"):
        parse_catalog("engines:\n  - &a {name: x, versions: {}}\n  - *a\n", "op.yaml")
    with pytest.raises(CatalogError, match="larger than"):
        parse_catalog("#" * (2 << 20), "op.yaml")


# --- variants: the meta entry resolves to this host's build ------------------------------------------------

def test_host_variants_follow_the_inventory(tmp_path):
    absent = tmp_path / "kfd"
    assert host_variants([], rocm_device=absent, platform="linux") == [Variant.CPU]
    assert host_variants([None], rocm_device=absent, platform="linux") == [Variant.CPU]
    assert host_variants(["12.4"], rocm_device=absent, platform="linux") == [Variant.CUDA12, Variant.CPU]
    # A CUDA 13 driver runs CUDA 12 builds too: 13 first, 12 next.
    assert host_variants(["13.0", "12.8"], rocm_device=absent, platform="linux") == [
        Variant.CUDA13, Variant.CUDA12, Variant.CPU]
    assert host_variants(["11.8"], rocm_device=absent, platform="linux") == [Variant.CPU]
    absent.touch()
    assert host_variants([], rocm_device=absent, platform="linux") == [Variant.ROCM, Variant.CPU]
    assert host_variants([], rocm_device=tmp_path / "none", platform="darwin") == [Variant.METAL, Variant.CPU]


def test_the_meta_entry_resolves_to_the_best_offered_variant():
    spec = parse_catalog(ENGINE.replace('cpu: {kind: pip, packages: ["thing==1.0"]}',
                                        'cpu: {kind: pip, packages: ["thing==1.0"]}\n'
                                        '          cuda12: {kind: pip, packages: ["thing-cu12==1.0"]}'),
                         "x").engines[0].versions["1.0"]
    chosen = resolve(spec, [Variant.CUDA13, Variant.CUDA12, Variant.CPU])
    assert chosen is not None and chosen[0] is Variant.CUDA12
    cpu = resolve(spec, [Variant.CPU])
    assert cpu is not None and cpu[0] is Variant.CPU
    assert resolve(spec, [Variant.METAL]) is None


def test_the_operator_catalog_adds_and_replaces_engines_by_name(tmp_path):
    operator = tmp_path / "catalog.yaml"
    operator.write_text(ENGINE + """
  - name: llama.cpp
    versions:
      "0.3.36":
        variants:
          cpu: {kind: binary, path: /opt/llama/bin/llama-server}
""")
    merged = load_catalog(shipped_catalog(), operator)
    assert [e.name for e in merged.engines][-2:] == ["thing", "llama.cpp"]
    llama = merged.engine("llama.cpp")
    assert llama is not None and llama.versions["0.3.36"].variants[Variant.CPU].kind == "binary"
    operator.write_text(ENGINE.replace("name: thing", "name: Thing"))
    with pytest.raises(CatalogError, match=r"catalog.yaml: engines\.0\.name"):
        load_catalog(shipped_catalog(), operator)


def test_upgrades_compare_installed_versions_with_the_catalog_default():
    def item(engine: str, version: str, default: bool, installed: bool) -> CatalogItem:
        return CatalogItem(engine=engine, version=version, default=default, variant=Variant.CPU,
                           variants=[Variant.CPU], kind="pip", installed=installed)

    items = [item("a", "1.10", True, False), item("a", "1.9", False, True),
             item("b", "2.0", True, True), item("b", "1.0", False, True),
             item("c", "3.0", True, False)]
    found = upgrades(items)
    assert [(u.engine, u.installed, u.available) for u in found] == [("a", ["1.9"], "1.10")]
    assert version_order("0.3.10") > version_order("0.3.9")


# --- through a real daemon --------------------------------------------------------------------------------

OPERATOR = """
engines:
  - name: tinypip
    description: a small pure-Python package, installed the way a pip-planned engine is
    default_version: "2.0"
    versions:
      "1.0":
        variants:
          cpu: {kind: pip, packages: ["six==1.16.0"], check_module: six}
      "2.0":
        variants:
          cpu: {kind: pip, packages: ["six==1.17.0"], check_module: six}
  - name: llama-cpp-python
    description: llama-cpp-python's server on the llama.cpp libraries of runnerd's own build (no compile)
    versions:
      "0.3.36":
        variants:
          cpu: {kind: pip, packages: ["llama-cpp-python[server]==0.3.36"],
                build_environment: {CMAKE_ARGS: "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}}
  - name: gpuonly
    versions:
      "1.0":
        variants:
          cuda12: {kind: binary, path: /opt/gpuonly/bin/serve}
  - name: system-true
    versions:
      "1":
        variants:
          cpu: {kind: binary, path: /bin/true}
"""


@pytest.fixture(scope="module")
def catalog_daemon(llama_server: Path, smollm2_model: Path) -> Iterator[Daemon]:
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    (root / "catalog.yaml").write_text(OPERATOR)
    # The pinned build, as this daemon's cache holds it (a symlink to the shared build).
    entry = root / "cache" / "llama.cpp" / build_key(SOURCE_VERSION, cmake_options(False))
    entry.mkdir(parents=True)
    (entry / "bin").symlink_to(llama_server.resolve().parent, target_is_directory=True)
    d = Daemon(root, llama_server, {"smol": smollm2_model}, {"RUNNERD_CATALOG_FILE": str(root / "catalog.yaml"),
                                        "RUNNERD_LLAMACPP__CUDA": "off"}, [])
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runnerd.cli", "backends", *args, "--socket", str(d.socket)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def _items(d: Daemon) -> dict[tuple[str, str], dict[str, Any]]:
    found = d.http.get("/engines/backends/catalog").json()
    assert found["host_variants"][-1] == "cpu"
    return {(i["engine"], i["version"]): i for i in found["items"]}


def test_catalog_listing_known_and_installed(catalog_daemon):
    d = catalog_daemon
    items = _items(d)
    assert items[("llama.cpp", SOURCE_VERSION)]["installed"] is True
    assert items[("llama.cpp", SOURCE_VERSION)]["default"] is True
    assert items[("llama.cpp", SOURCE_VERSION)]["kind"] == "source-build"
    assert items[("tinypip", "2.0")]["installed"] is False and items[("tinypip", "2.0")]["default"] is True
    assert items[("system-true", "1")]["installed"] is True  # an existing binary that is there
    # This host has no CUDA 12 GPU: the GPU-only entry is known, not offered.
    assert ("gpuonly", "1.0") not in items
    known = d.http.get("/engines/backends/known").json()
    assert {"llama.cpp", "vllm"} <= set(known["registered"])
    assert next(e for e in known["catalog"] if e["engine"] == "gpuonly")["versions"] == {"1.0": ["cuda12"]}
    listed = _cli(d, "catalog")
    assert listed.returncode == 0 and "tinypip" in listed.stdout and "gpuonly" not in listed.stdout
    refused = d.post("/engines/backends/catalog/install", {"engine": "gpuonly"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "variant"
    refused = d.post("/engines/backends/catalog/install", {"engine": "tinypip", "version": "9.9"})
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "version"
    # The pinned build through the catalog: the daemon's own build, already there.
    odd = d.post("/engines/backends/catalog/install", {"engine": "llama.cpp", "variant": "cpu",
                                                       "version": SOURCE_VERSION})
    assert odd.status_code == 200 and "already installed" in odd.json()["message"]
    # Removals that cannot happen are refused at once, not as a failed job.
    absent = d.post("/engines/backends/catalog/uninstall", {"engine": "llama.cpp", "version": "0.3.30"})
    assert absent.status_code == 404 and absent.json()["error"]["code"] == "version_not_installed", absent.text
    binary = d.post("/engines/backends/catalog/uninstall", {"engine": "system-true", "version": "1"})
    assert binary.status_code == 400 and binary.json()["error"]["code"] == "not_installed_by_runnerd"
    # No catalog_url set: nothing to fetch now.
    refresh = d.post("/engines/backends/catalog/refresh")
    assert refresh.status_code == 409 and refresh.json()["error"]["code"] == "no_catalog_url", refresh.text


def _finish(d: Daemon, job: dict[str, Any]) -> dict[str, Any]:
    with d.http.stream("GET", job["status_url"], params={"follow": "true"}) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    return lines[-1]


def test_install_upgrade_and_remove_a_pip_engine(catalog_daemon, tmp_path):
    d = catalog_daemon
    started = d.post("/engines/backends/catalog/install", {"engine": "tinypip", "version": "1.0"})
    assert started.status_code == 202, started.text
    final = _finish(d, started.json())
    assert final["state"] == "succeeded", final
    python = d.root / "cache" / "catalog" / "tinypip" / "1.0-cpu" / "venv" / "bin" / "python"
    version = subprocess.run([str(python), "-c", "import six; print(six.__version__)"], capture_output=True,
                             text=True, timeout=60, check=True)
    assert version.stdout.strip() == "1.16.0"
    assert _items(d)[("tinypip", "1.0")]["installed"] is True

    assert d.http.get("/engines/backends/upgrades").json() == [
        {"engine": "tinypip", "installed": ["1.0"], "available": "2.0", "variant": "cpu"}]
    upgraded = _cli(d, "upgrade", "tinypip", "--quiet")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "installed tinypip 2.0 (cpu)" in upgraded.stdout
    assert d.http.get("/engines/backends/upgrades").json() == []
    assert _cli(d, "upgrade", "tinypip").returncode != 0  # nothing newer now

    # A manifest engine runs from the 2.0 environment: removing it is refused, naming that engine.
    env_python = d.root / "cache" / "catalog" / "tinypip" / "2.0-cpu" / "venv" / "bin" / "python"
    manifest = f"""
name: tinypip-custom
model_formats: [gguf]
modes: [completion]
capabilities: [completions]
versions:
  pinned:
    command: [{env_python}, -m, http.server, "{{port}}", --bind, "{{host}}"]
    listen: tcp
flags: {{policy: none}}
memory: {{kind: unknown}}
"""
    defined = d.http.post("/engines/backends", content=manifest, headers={"Content-Type": "application/yaml"})
    assert defined.status_code == 201, defined.text
    jobs_before = {j["id"] for j in d.http.get("/jobs").json()}
    refused = _cli(d, "rm", "tinypip@2.0")
    assert refused.returncode != 0 and "tinypip-custom" in refused.stderr and "409" in refused.stderr
    assert env_python.exists()
    # Refused before any job is started.
    assert {j["id"] for j in d.http.get("/jobs").json()} == jobs_before

    # A removal is a job with a status URL, like an install.
    removing = d.post("/engines/backends/catalog/uninstall", {"engine": "tinypip", "version": "1.0"})
    assert removing.status_code == 202, removing.text
    job = removing.json()
    assert job["kind"] == "uninstall-backend" and job["target"] == "tinypip@1.0:cpu"
    assert removing.headers["Location"] == job["status_url"]
    final = _finish(d, job)
    assert final["state"] == "succeeded" and final["message"] == "removed tinypip 1.0 (cpu)", final
    assert not python.parent.parent.parent.exists()
    again = d.post("/engines/backends/catalog/uninstall", {"engine": "tinypip", "version": "1.0"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "version_not_installed"
    # The CLI waits for the job: the environment is gone when it returns.
    forced = _cli(d, "rm", "tinypip@2.0", "--force", "--quiet")
    assert forced.returncode == 0, forced.stderr
    assert "removed tinypip 2.0 (cpu)" in forced.stdout and not env_python.exists()
    d.http.delete("/engines/backends/tinypip-custom")
    items = _items(d)
    assert not items[("tinypip", "1.0")]["installed"] and not items[("tinypip", "2.0")]["installed"]


def test_a_second_engine_from_pypi_runs_from_a_manifest(catalog_daemon, llama_server):
    """llama-cpp-python's server, installed by the catalog into a private environment and defined by a
    manifest: TCP only, no /health (readiness on /v1/models), no embeddings in this manifest (501). The
    operator's recipe skips compiling llama.cpp (CMAKE_ARGS) and the manifest points the bindings at the
    libraries of runnerd's pinned build, the same llama.cpp release the bindings were written for."""
    d = catalog_daemon
    started = d.post("/engines/backends/catalog/install", {"engine": "llama-cpp-python"})
    assert started.status_code == 202, started.text
    final = _finish(d, started.json())
    assert final["state"] == "succeeded", final
    env_python = d.root / "cache" / "catalog" / "llama-cpp-python" / "0.3.36-cpu" / "venv" / "bin" / "python"
    libs = llama_server.resolve().parent
    manifest = f"""
name: llama-cpp-python-custom
description: python -m llama_cpp.server from the catalog's private environment
model_formats: [gguf]
modes: [completion]
capabilities: [chat, completions, streaming]
versions:
  "0.3.36":
    command: [{env_python}, -m, llama_cpp.server, --model, "{{model_path}}", --model_alias, "{{model_name}}",
              --host, "{{host}}", --port, "{{port}}", --n_ctx, "{{ctx}}", --n_threads, "1"]
    environment: {{LLAMA_CPP_LIB_PATH: "{libs}", LD_LIBRARY_PATH: "{libs}"}}
    listen: tcp
    readiness: {{path: /v1/models, timeout: 120}}
flags: {{policy: none}}
memory: {{kind: gguf}}
"""
    defined = d.http.post("/engines/backends", content=manifest, headers={"Content-Type": "application/yaml"})
    assert defined.status_code == 201, defined.text
    client = d.openai("/engines/llama-cpp-python-custom/v1")
    answer = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.content
    chunks = list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True))
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    runner = next(r for r in d.ps() if r["backend"] == "llama-cpp-python-custom")
    assert psutil.Process(runner["pid"]).cmdline()[:3] == [str(env_python), "-m", "llama_cpp.server"]
    missing = d.http.post("/engines/llama-cpp-python-custom/v1/embeddings", json={"model": "smol", "input": "x"})
    assert missing.status_code == 501, missing.text
    # The environment is in use by the manifest engine: not removed unless forced.
    refused = d.post("/engines/backends/catalog/uninstall", {"engine": "llama-cpp-python", "version": "0.3.36"})
    assert refused.status_code == 409 and "llama-cpp-python-custom" in refused.text
    unloaded = d.post("/engines/unload", {"all": True})
    assert unloaded.status_code == 200


def test_the_readme_examples_stay_valid():
    """README's "The catalog": the catalog example, the operator entry and the manifest that runs it."""
    from backends.manifest import parse_manifest
    from runnerd.engines import BUILTIN

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("#### The catalog"):readme.index("### Make targets")]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    assert len(blocks) == 3
    first, operator = parse_catalog(blocks[0], "README"), parse_catalog(blocks[1], "README")
    assert [e.name for e in first.engines] == ["tinypip", "llama.cpp"]
    assert operator.engines[0].versions["0.3.36"].variants[Variant.CPU].kind == "pip"
    manifest, _ = parse_manifest(blocks[2], "yaml", reserved=set(BUILTIN), check_files=False)
    assert manifest.name == "llama-cpp-python-custom" and manifest.version.readiness.path == "/v1/models"
