"""Ollama's API (/api/...) over the same scheduler and engines as the OpenAI routes.

    inference.py  chat, generate, embed, embeddings: lease a runner, translate, stream NDJSON
    models.py     tags, ps, show, version; delete, copy, pull (the model store)
    translate.py  the pure Ollama <-> OpenAI mapping (no I/O)
    common.py     the request body every route starts from, model lookup, NDJSON lines

Errors on these routes are `{"error": "..."}` (error_middleware renders that shape under /api/).
"""

from aiohttp import web

from runnerd.api.ollama.inference import chat, embed, embeddings, generate
from runnerd.api.ollama.models import copy, delete, ps, pull, show, tags, version

__all__ = ["add_routes", "chat", "copy", "delete", "embed", "embeddings", "generate", "ps", "pull", "show", "tags",
           "version"]


def add_routes(app: web.Application) -> None:
    # The handlers are looked up in this package's namespace when the app is built.
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings)
    app.router.add_post("/api/pull", pull)
    app.router.add_delete("/api/delete", delete)
    app.router.add_post("/api/copy", copy)
