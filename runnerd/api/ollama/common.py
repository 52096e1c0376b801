"""What the Ollama routes share: the request body every route starts from, body parsing, model lookup
with Ollama's wording, and NDJSON lines."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runnerd.api import scopes
from runnerd.api.body import read_json_body
from runnerd.api.context import Daemon
from runnerd.api.errors import ApiError
from runnerd.store import ModelEntry, StoreError

NDJSON = "application/x-ndjson"
_T = TypeVar("_T", bound=BaseModel)


class ModelRequest(BaseModel):
    # Clients send fields this daemon has no use for (e.g. `truncate`, `logprobs`): ignore, as Ollama does.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(default="", max_length=300)
    name: str | None = Field(default=None, max_length=300)  # the older spelling of `model`

    @model_validator(mode="after")
    def _model_given(self) -> ModelRequest:
        if not self.model and self.name:
            self.model = self.name
        if not self.model:
            raise ValueError("model is required")
        return self


async def read_body(request: web.Request, cls: type[_T]) -> _T:
    try:
        return cls.model_validate(await read_json_body(request))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"{where}: {err['msg']}" if where else err["msg"]) from exc


def lookup_model(d: Daemon, name: str) -> ModelEntry:
    try:
        scopes.check_model(name)  # outside the caller's patterns: the same error as a missing model
        return d.store.get(name)
    except StoreError as exc:
        # Ollama's wording, which some clients match to offer a pull.
        raise ApiError(exc.status, f"model '{name}' not found" if exc.status == 404 else str(exc)) from exc


def ndjson_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


async def start_ndjson(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
    await response.prepare(request)
    return response
