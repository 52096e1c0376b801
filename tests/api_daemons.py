"""The daemons the Messages and Responses tests share: one relays each API to llama-server's own
implementation, the other translates it through the engine's chat completions (`[apis] translate`).
SmolLM2 (an instruct model) answers the semantic checks, the tiny random-weights model the shapes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import pytest

from tests.conftest import Daemon
from tests.tinymodels import TOOLS_CHATML, write_tiny_llama


def anthropic_client(d: Daemon, prefix: str = "") -> anthropic.Anthropic:
    # The anthropic SDK speaks through httpx2, not httpx.
    transport = httpx2.HTTPTransport(uds=str(d.socket))
    return anthropic.Anthropic(base_url=f"http://runnerd{prefix}", api_key="unused", max_retries=0,
                               http_client=httpx2.Client(transport=transport, timeout=120))


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module", params=["native", "translated"])
def api_daemon(request: pytest.FixtureRequest, llama_server: Path, tiny_model: Path,
               smollm2_model: Path) -> Iterator[Daemon]:
    """`tiny` (shapes), `smollm2` (meaning) and `tools`: the tiny weights with a template that renders
    tool definitions, so that its prompt token count shows whether they reached the engine."""
    env = {"RUNNERD_DEFAULT_CONTEXT_SIZE": "2048"}
    if request.param == "translated":
        env["RUNNERD_APIS__TRANSLATE"] = '["messages", "responses"]'
    root = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    tools = write_tiny_llama(Path(root) / "tools.gguf", chat_template=TOOLS_CHATML)
    d = Daemon(Path(root), llama_server, {"tiny": tiny_model, "smollm2": smollm2_model, "tools": tools}, env, [])
    d.path_kind = request.param  # type: ignore[attr-defined]
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)
