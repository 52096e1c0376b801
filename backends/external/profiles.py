"""What each kind of OpenAI-compatible runtime offers: where its health check and model list are, how it
takes a token, and which request kinds it serves. Facts from each project's documentation; an endpoint
may override the capabilities (a vLLM serving an embedding model, a TGI build with tools off)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from backends.base import Api, Capability


class Listing(StrEnum):
    OPENAI = "openai"  # GET ... -> {"data": [{"id": ...}]}
    OLLAMA = "ollama"  # GET /api/tags -> {"models": [{"name": ...}]}


@dataclass(frozen=True)
class KindProfile:
    kind: str
    health_path: str
    models_path: str
    listing: Listing
    capabilities: frozenset[Capability]
    # The header a token goes in, and what precedes it there.
    auth_header: str = "Authorization"
    auth_scheme: str = "Bearer "
    # It also serves Ollama's own API (/api/show, /api/ps), which says more than the OpenAI model list.
    ollama_api: bool = False
    # APIs beyond OpenAI's it serves itself under the base URL: relayed to it rather than translated
    # through its chat completions.
    native_apis: frozenset[Api] = frozenset()


_C = Capability
_ALL = frozenset(Capability)
_GENERATIVE = frozenset({_C.CHAT, _C.COMPLETIONS, _C.STREAMING, _C.TOOLS})

_PROFILES = (
    KindProfile("openai", "/v1/models", "/v1/models", Listing.OPENAI, _GENERATIVE | {_C.EMBEDDINGS}),
    KindProfile("vllm", "/health", "/v1/models", Listing.OPENAI, _ALL),
    # llama-server serves Anthropic's /v1/messages itself (the pinned build; route strings in its library).
    KindProfile("llamacpp", "/health", "/v1/models", Listing.OPENAI, _ALL, native_apis=frozenset({Api.MESSAGES})),
    # Ollama lists under its own API and serves OpenAI routes under /v1; it has no rerank.
    KindProfile("ollama", "/api/version", "/api/tags", Listing.OLLAMA, _GENERATIVE | {_C.EMBEDDINGS},
                ollama_api=True),
    # TGI's Messages API serves chat and completions; embeddings are another server (TEI).
    KindProfile("tgi", "/health", "/v1/models", Listing.OPENAI, _GENERATIVE),
    KindProfile("sglang", "/health", "/v1/models", Listing.OPENAI, _GENERATIVE | {_C.EMBEDDINGS}),
    KindProfile("localai", "/readyz", "/v1/models", Listing.OPENAI, _ALL),
    KindProfile("lmstudio", "/v1/models", "/v1/models", Listing.OPENAI, _GENERATIVE | {_C.EMBEDDINGS}),
    KindProfile("runnerd", "/health", "/v1/models", Listing.OPENAI, _ALL, ollama_api=True,
                native_apis=frozenset({Api.MESSAGES})),
)

KINDS: dict[str, KindProfile] = {p.kind: p for p in _PROFILES}


def profile(kind: str) -> KindProfile:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})") from None
