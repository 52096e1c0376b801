"""Errors as JSON: OpenAI's shape {"error": {"message", "type", "code", "param"}}, Ollama's
{"error": "..."} under /api/, and Anthropic's {"type": "error", "error": {"type", "message"}} under the
Messages API's paths (render_error picks by path)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    501: "not_implemented_error",
}


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); another client error is an
# invalid_request_error, another server error an api_error.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# /v1/messages (and /v1/messages/count_tokens) under every engine prefix, and everything under /anthropic/.
_ANTHROPIC_PATH = re.compile(r"^/(?:engines/(?:[^/]+/)?)?v1/messages(?:/|$)|^/anthropic/")


Body = TypeVar("Body", bound=BaseModel)

log = logging.getLogger("runnerd.api")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)

    def ollama_response(self) -> web.Response:
        """The same error in Ollama's shape, {"error": "..."}, for the /api/ routes its clients call."""
        return web.json_response({"error": self.message}, status=self.status, headers=self.headers)

    def anthropic_response(self) -> web.Response:
        """The same error in Anthropic's shape, for the Messages API routes its clients call."""
        fallback = "invalid_request_error" if self.status < 500 else "api_error"
        body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(self.status, fallback),
                                           "message": self.message}}
        return web.json_response(body, status=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The same error as a server-sent event, for a stream whose status line is already sent."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def from_http_exception(exc: web.HTTPException) -> ApiError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(413, f"request body too large: {exc.text}", code="body_too_large")
    if isinstance(exc, web.HTTPNotFound):
        return ApiError(404, "no such route", code="route_not_found")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return ApiError(405, f"method {exc.method} not allowed here; allowed: {', '.join(sorted(exc.allowed_methods))}",
                        code="method_not_allowed", headers={"Allow": ",".join(sorted(exc.allowed_methods))})
    return ApiError(exc.status, exc.text or exc.reason)


def answer_for(request: web.Request, exc: Exception) -> web.Response | None:
    """The error answer for what a handler raised, in the route's shape; None when it must propagate
    (a redirect, or a failure after a streamed answer's status line went out)."""
    if isinstance(exc, ApiError):
        return render_error(request, exc)
    if isinstance(exc, web.HTTPException):
        return render_error(request, from_http_exception(exc)) if exc.status >= 400 else None
    if request.writer.output_size > 0:
        # A streamed answer already sent its status line: no second one can follow. aiohttp logs
        # the exception and drops the connection, which the client sees as a cut stream.
        return None
    # A bug, not a client's mistake: the traceback goes to the log, never to the client.
    log.exception("unhandled error in %s %s", request.method, request.path)
    return render_error(request, internal_error())


def internal_error() -> ApiError:
    """A 500 that says nothing of the exception: its message and traceback may carry paths or other internals."""
    return ApiError(500, "internal error in runnerd; the daemon's log has the details", code="internal_error",
                    type="server_error")


def anthropic_path(path: str) -> bool:
    return _ANTHROPIC_PATH.match(path) is not None


def render_error(request: web.Request, exc: ApiError) -> web.Response:
    # Ollama's clients read a plain string under "error", Anthropic's an error object under "error" beside
    # "type": "error"; everything else speaks OpenAI's shape.
    if request.path.startswith("/api/"):
        return exc.ollama_response()
    if anthropic_path(request.path):
        return exc.anthropic_response()
    return exc.response()


def validation_error(exc: ValidationError, what: str, prefix: str | None = None) -> ApiError:
    """A 400 naming the first field pydantic refused, as `param` (under `prefix` for a nested table)."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"])) or None
    return ApiError(400, f"invalid {what}: {field}: {err['msg']}", param=field)


def parse_body(model: type[Body], payload: dict[str, Any], what: str) -> Body:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc, what) from exc
