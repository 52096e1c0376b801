"""A stored configuration applies only to the engine it names, through a real daemon and real llama-server:
a request sent to llama.cpp by its path for a model configured for a manifest engine, and every route
after that manifest engine is deleted with force (its configuration kept, shown as orphaned), start
llama.cpp with the model's defaults, never with the other engine's context size or flags."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import psutil
import pytest

from tests.api_daemons import anthropic_client
from tests.conftest import Daemon
from tests.test_manifest_engine import define, llama_manifest

pytestmark = pytest.mark.engine

ENGINE = "configured-custom"
DEFAULT_CTX = "512"  # RUNNERD_DEFAULT_CONTEXT_SIZE in tests/conftest.py's Daemon


@pytest.fixture(scope="module")
def cdaemon(llama_server: Path, tiny_model: Path) -> Iterator[Daemon]:
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    d = Daemon(root, llama_server, {"tiny": tiny_model}, {}, [])
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _llamacpp_argv(d: Daemon) -> list[str]:
    """The command line of the one live runner, which must be the built-in llama.cpp's."""
    live = [r for r in d.ps() if r["state"] != "exited"]
    assert [r["backend"] for r in live] == ["llama.cpp"], live
    return psutil.Process(live[0]["pid"]).cmdline()


def _ctx(argv: list[str]) -> str:
    return argv[argv.index("--ctx-size") + 1]


def _unload(d: Daemon) -> None:
    assert d.post("/engines/unload", {"all": True, "timeout": 0}).status_code == 200
    d.wait_for(lambda: all(r["state"] == "exited" for r in d.ps()), what="runners stopped")


def test_a_configuration_applies_only_to_the_engine_it_names(cdaemon, llama_server):
    d = cdaemon
    assert define(d, llama_manifest(llama_server, name=ENGINE, listen="unix")).status_code == 201
    configured = d.post(f"/engines/{ENGINE}/_configure", {"model": "tiny", "context_size": 384,
                                                          "runtime_flags": ["--top-k", "7"]})
    assert configured.status_code == 202, configured.text
    # The configure request preloads the manifest engine's runner: out of the way, so ps shows one runner.
    d.wait_for(lambda: any(r["backend"] == ENGINE for r in d.ps()), what="the manifest runner preloaded")
    _unload(d)

    # Sent to llama.cpp by its path: llama.cpp with the model's defaults, not the manifest engine's settings.
    done = d.post("/engines/llama.cpp/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert done.status_code == 200, done.text
    argv = _llamacpp_argv(d)
    assert _ctx(argv) == DEFAULT_CTX and "--top-k" not in argv, argv
    _unload(d)

    # Deleted with force: the configuration is kept, shown as orphaned, and applies to no other engine.
    forced = d.http.delete(f"/engines/backends/{ENGINE}", params={"force": "true"})
    assert forced.status_code == 200 and forced.json()["configured"] == ["tiny:latest (completion)"], forced.text
    listed = d.http.get("/engines/_configure").json()["configurations"]
    assert [(c["model"], c["backend"], c["orphaned"], c["config"]["context_size"]) for c in listed] == \
        [("tiny:latest", ENGINE, True, 384)]

    # Every route that names no engine now takes the model's engine for its format, with its defaults:
    # OpenAI's, Anthropic's Messages (a leased runner) and Ollama's (which may store num_ctx).
    routes = {
        "openai": lambda: d.openai().completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text,
        "anthropic": lambda: anthropic_client(d).messages.create(
            model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}]).id,
        "ollama": lambda: ollama.Client(host="http://runnerd", transport=httpx.HTTPTransport(uds=str(d.socket)),
                                        timeout=60).generate(model="tiny", prompt="a", options={"num_predict": 2}),
    }
    for route, call in routes.items():
        call()
        argv = _llamacpp_argv(d)
        assert _ctx(argv) == DEFAULT_CTX and "--top-k" not in argv, (route, argv)
        _unload(d)
    still = d.http.get("/engines/_configure").json()["configurations"]
    assert [(c["backend"], c["orphaned"]) for c in still] == [(ENGINE, True)]
    # Ollama's show tells the context the model would run with, not the orphaned 384.
    shown = d.post("/api/show", {"model": "tiny"}).json()
    assert f"num_ctx         {DEFAULT_CTX}" in shown["parameters"], shown["parameters"]

    # Defined again, the kept configuration is its own again and no longer orphaned.
    assert define(d, llama_manifest(llama_server, name=ENGINE, listen="unix")).status_code == 201
    assert [c["orphaned"] for c in d.http.get("/engines/_configure").json()["configurations"]] == [False]
    assert d.http.delete(f"/engines/backends/{ENGINE}", params={"force": "true"}).status_code == 200
    assert d.http.request("DELETE", "/engines/_configure", params={"model": "tiny"}).status_code == 200
