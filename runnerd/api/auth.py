"""Bearer-token authentication for requests that arrive over TCP.

The unix socket is guarded by its file mode (0660, owner and group only), so requests through it
are trusted. Everything that arrives any other way needs the token, in `Authorization: Bearer <token>`
or in `x-api-key: <token>` (what Anthropic's clients send), except `GET /health` (liveness) and
`GET /ready` (readiness), which load balancers, kubelets and parent schedulers probe without credentials.
A header sent twice is refused: proxies and servers disagree on which copy counts.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from runnerd.api.context import over_unix_socket
from runnerd.api.errors import ApiError, render_error

HTTP_TOKEN = web.AppKey("http_token", str)


class TokenError(Exception):
    """The token file cannot be used; the message names the file and the problem."""


def load_token(path: Path) -> str:
    """The token in `path`, surrounding whitespace stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenError(f"cannot read the HTTP token file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TokenError(f"the HTTP token file {path} is not UTF-8 text") from exc
    token = text.strip()
    if not token:
        raise TokenError(f"the HTTP token file {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise TokenError(f"the token in {path} contains spaces or control characters; a bearer token is one word")
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison. compare_digest is only constant-time for inputs of equal length,
    so both sides are hashed first: the time taken says nothing about the token or its length."""
    return hmac.compare_digest(_digest(presented), _digest(expected))


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _unauthenticated(presented: bool) -> ApiError:
    challenge = 'Bearer realm="runnerd"' + (', error="invalid_token"' if presented else "")
    message = ("invalid bearer token" if presented else
               "this route needs 'Authorization: Bearer <token>' (or 'x-api-key: <token>') over TCP")
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": challenge})


OPEN_ROUTES = frozenset({"/health", "/ready"})
CREDENTIAL_HEADERS = ("Authorization", "x-api-key")


def _open_route(request: web.Request) -> bool:
    return request.path in OPEN_ROUTES and request.method in ("GET", "HEAD")


def presented_tokens(request: web.Request) -> list[str]:
    """The tokens the request carries: `Authorization`'s when it is a bearer token, `x-api-key`'s when
    not empty; ApiError 400 for a credential header sent more than once."""
    for name in CREDENTIAL_HEADERS:
        if len(request.headers.getall(name, [])) > 1:
            raise ApiError(400, f"the {name} header appears more than once; send it once", code="duplicate_header",
                           param=name)
    tokens = [bearer_token(request.headers.get("Authorization")), request.headers.get("x-api-key", "").strip()]
    return [t for t in tokens if t]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if over_unix_socket(request) or _open_route(request):
        return await handler(request)
    expected = request.app.get(HTTP_TOKEN)
    try:
        presented = presented_tokens(request)
    except ApiError as exc:
        return render_error(request, exc)
    # No token configured cannot happen with a TCP listener (serve refuses to start); fail closed anyway.
    # Every header that carries a token must carry the right one: two that disagree are refused. Each
    # is compared (a list, not a short-circuit), so the time taken does not say which one matched.
    matches = [expected is not None and token_matches(t, expected) for t in presented]
    if expected is None or not matches or not all(matches):
        # render_error: the route's error shape (Ollama's under /api/, Anthropic's under its routes,
        # OpenAI's elsewhere).
        return render_error(request, _unauthenticated(bool(presented)))
    return await handler(request)
