"""Speculative decoding end to end: a draft named by the caller, resolved by the daemon, on the engine's
command line and in the memory estimate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil
import pytest

from backends.base import BackendConfiguration, Mode, ModelFormat, RunnerError, RunnerOutput
from backends.endpoint import Endpoint
from backends.llamacpp import LlamaCppBackend
from backends.vllm import VllmBackend
from runnerd.api.context import DAEMON
from runnerd.configs import ConfigStore, StoredConfiguration
from runnerd.store import ModelEntry
from tests.conftest import app_on_socket
from tests.test_vllm_unit import write_model_dir


def value_after(argv: list[str], flag: str) -> str:
    return argv[max(i for i, a in enumerate(argv) if a == flag) + 1]


# --- the configuration store resolves drafts on every read ----------------------------------------


def stored(draft_model: str = "small") -> StoredConfiguration:
    return StoredConfiguration(model="big:latest", mode=Mode.COMPLETION, backend="llama.cpp", updated_at=0,
                               config=BackendConfiguration(speculative={"draft_model": draft_model}))


@pytest.mark.anyio
async def test_drafts_are_kept_by_name_and_resolved_on_read(tmp_path: Path, tiny_model: Path) -> None:
    where = {"small": tiny_model}
    configs = ConfigStore(tmp_path, resolve_model=lambda name: ModelEntry(
        name=name, path=where[name], size=1).ref() if name in where else None)
    configs.put(configs.resolved(stored()))
    # The file names the draft only: its path is the store's business, and may change.
    kept = json.loads((tmp_path / "configurations.json").read_text())["configurations"][0]["config"]
    assert kept == {"speculative": {"draft_model": "small"}}
    got = configs.get("big:latest", Mode.COMPLETION)
    assert got is not None and got.config.speculative is not None
    assert got.config.speculative.draft is not None and got.config.speculative.draft.path == tiny_model
    del where["small"]  # removed from the store since: the runner must not start without it
    gone = configs.get("big:latest", Mode.COMPLETION)
    assert gone is not None and gone.config.speculative is not None and gone.config.speculative.draft is None
    backend = LlamaCppBackend(cache_dir=tmp_path, binary=tmp_path / "no-llama-server")
    ref = ModelEntry(name="big:latest", path=tiny_model, size=1).ref()
    with pytest.raises(RunnerError, match="'small' is not in the store"):
        await backend.run(Endpoint.unix(tmp_path / "r.sock"), ref, Mode.COMPLETION, gone.config, RunnerOutput())
    assert any("not counted" in n for n in backend.required_memory(ref, Mode.COMPLETION, gone.config).notes)


# --- the configure API -------------------------------------------------------------------------------


def _hf_entry(tmp_path: Path, name: str) -> ModelEntry:
    path = write_model_dir(tmp_path / name)
    return ModelEntry(name=f"{name}:latest", path=path, format=ModelFormat.SAFETENSORS, size=1)


@pytest.mark.anyio
async def test_configure_checks_the_draft_against_the_store_and_the_backend(tmp_path: Path, tiny_model: Path,
                                                                          daemons: list[Any]) -> None:
    backends = {"llama.cpp": LlamaCppBackend(cache_dir=tmp_path, binary=tmp_path / "no-llama-server"),
                "vllm": VllmBackend(cache_dir=tmp_path / "vllm")}
    async with app_on_socket(tmp_path, backends, {"tiny": tiny_model}) as client:
        (app_daemon,) = daemons
        # Safetensors models enter the store by pulling a directory; registering the entry directly keeps
        # this test off the network code.
        for name in ("hf", "hfdraft"):
            app_daemon.store._put(_hf_entry(tmp_path, name))

        async def configure(body: dict[str, Any], backend: str = "") -> httpx.Response:
            path = f"/engines/{backend}/_configure" if backend else "/engines/_configure"
            return await client.post(path, json=body)

        refused = [
            (await configure({"model": "tiny", "speculative": {"draft_model": "ghost"}}), "'ghost' is not in"),
            (await configure({"model": "tiny", "speculative": {"draft_model": "hfdraft"}}), "gguf format only"),
            (await configure({"model": "hf", "speculative": {"draft_model": "tiny"}}, "vllm"), "safetensors"),
        ]
        for resp, fragment in refused:
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert error["param"] == "speculative.draft_model" and fragment in error["message"], error
        assert (await client.get("/engines/_configure")).json()["configurations"] == []

        base = (await client.get("/models/tiny/estimate")).json()
        resp = await configure({"model": "tiny", "speculative": {"draft_model": "tiny", "num_tokens": 4}})
        assert resp.status_code == 202, resp.text
        assert resp.json()["config"] == {"speculative": {"draft_model": "tiny:latest", "num_tokens": 4}}
        # The estimate now counts the draft: its weights, KV cache and compute buffers.
        drafted = (await client.get("/models/tiny/estimate")).json()
        assert drafted["ram_bytes"] > base["ram_bytes"]
        assert any("draft model included" in n for n in drafted["notes"])
        config = BackendConfiguration(speculative={"draft_model": "tiny", "num_tokens": 4, "draft":
                                                   app_daemon.store.get("tiny").ref()})
        expected = backends["llama.cpp"].required_memory(app_daemon.store.get("tiny").ref(), Mode.COMPLETION,
                                                         config)
        assert drafted["ram_bytes"] == expected.ram_bytes

        resp = await configure({"model": "hf", "speculative": {"draft_model": "hfdraft"}}, "vllm")
        assert resp.status_code == 202, resp.text
        got = app_daemon.configs.get("hf:latest", Mode.COMPLETION)
        assert got.config.speculative.draft.path == tmp_path / "hfdraft"


@pytest.fixture
def daemons(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The Daemon of each in-process app a test creates, so the test can reach its store."""
    import runnerd.server as server

    created: list[Any] = []
    real = server.create_app

    def create_app(*args: Any, **kw: Any) -> Any:
        app = real(*args, **kw)
        created.append(app[DAEMON])
        return app

    monkeypatch.setattr(server, "create_app", create_app)
    return created


# --- the real llama-server --------------------------------------------------------------------------


def _complete(d: Any) -> None:
    resp = d.post("/engines/v1/completions", {"model": "tiny", "prompt": "hello hello", "max_tokens": 8})
    assert resp.status_code == 200, resp.text


@pytest.mark.engine
def test_tiny_model_as_its_own_draft_reaches_llama_server(make_daemon: Any, tiny_model: Path) -> None:
    d = make_daemon({"tiny": tiny_model})
    _complete(d)
    (plain,) = d.ps()
    resp = d.post("/engines/_configure", {"model": "tiny", "speculative": {"draft_model": "tiny", "num_tokens": 4}})
    assert resp.status_code == 202 and resp.json()["restarted"] is True, resp.text
    d.wait_for(lambda: [(r["state"], r["pid"] != plain["pid"]) for r in d.ps()] == [("idle", True)],
               what="runner restarted with the draft")
    _complete(d)
    (drafted,) = d.ps()
    argv = psutil.Process(drafted["pid"]).cmdline()
    assert value_after(argv, "--spec-draft-model") == str(tiny_model)  # alias of --model-draft
    assert value_after(argv, "--spec-draft-n-max") == "4"
    # The engine really drafts (without --spec-type it would load the draft and never use it).
    with httpx.Client(transport=httpx.HTTPTransport(uds=drafted["socket"]), base_url="http://engine") as engine:
        timings = engine.post("/completion", json={"prompt": "hello hello", "n_predict": 8}).json()["timings"]
    assert timings.get("draft_n", 0) > 0, timings
    # The runner's estimate grew by the draft's share: what the estimate route says for this configuration.
    grown = drafted["memory"]["ram_bytes"] - plain["memory"]["ram_bytes"]
    assert grown > 0 and any("draft model included" in n for n in drafted["memory"]["notes"])
    assert d.http.get("/models/tiny/estimate").json()["ram_bytes"] == drafted["memory"]["ram_bytes"]
    weights = sum(dev["breakdown"]["weights"] for dev in drafted["memory"]["devices"]) - \
        sum(dev["breakdown"]["weights"] for dev in plain["memory"]["devices"])
    assert weights > 0 and grown > weights  # the draft's weights and then its KV cache and buffers


@pytest.mark.engine
def test_a_draft_in_use_is_not_removed_without_force(make_daemon: Any, tiny_model: Path) -> None:
    d = make_daemon({"tiny": tiny_model, "small": tiny_model})
    resp = d.post("/engines/_configure", {"model": "tiny", "speculative": {"draft_model": "small", "num_tokens": 2}})
    assert resp.status_code == 202, resp.text
    _complete(d)
    refused = d.http.delete("/models/small")
    assert refused.status_code == 409, refused.text  # a running engine has it loaded as its draft
    assert d.http.delete("/models/small", params={"force": "true"}).status_code == 200
