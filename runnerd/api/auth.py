"""Bearer-token authentication and authorisation for requests that arrive over TCP.

The unix socket is guarded by its file mode (0660, owner and group only), so requests through it
are trusted. Everything that arrives any other way needs a token, in `Authorization: Bearer <token>`
or in `x-api-key: <token>` (what Anthropic's clients send), except `GET /health` (liveness) and
`GET /ready` (readiness), which load balancers, kubelets and parent schedulers probe without credentials.
A header sent twice is refused: proxies and servers disagree on which copy counts.

The token names a grant (runnerd/tokens.py): its role must reach the route's (runnerd/api/scopes.py),
its limits must leave room (runnerd/limits.py), and while the handler runs its model patterns filter
what the routes list and find. Refusals, limit hits and every operator or admin action that changes
something go to the audit log (runnerd/audit.py), with the token's name, never the token.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from runnerd.api import scopes
from runnerd.api.body import JSON_BODY
from runnerd.api.context import over_unix_socket
from runnerd.api.errors import ApiError, render_error
from runnerd.audit import AUDIT
from runnerd.limits import Limiter, LimitHit
from runnerd.tokens import Grant, Keyring, Role, TokenError, digest, load_token

__all__ = ["HTTP_TOKEN", "KEYRING", "LIMITER", "Admission", "Keyring", "TokenError", "admit", "bearer_token",
           "load_token", "token_matches"]

KEYRING = web.AppKey("keyring", Keyring)
# A single admin token, for an app served without `serve` (tests embed the app): `serve` sets KEYRING.
HTTP_TOKEN = web.AppKey("http_token", str)
LIMITER = web.AppKey("limiter", Limiter)


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison. compare_digest is only constant-time for inputs of equal length,
    so both sides are hashed first: the time taken says nothing about the token or its length."""
    return hmac.compare_digest(digest(presented), digest(expected))


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


def _audit(request: web.Request, grant: Grant | None, result: str, *, body: bool = False) -> None:
    audit = request.app.get(AUDIT)
    if audit is None:
        return
    resource = request.match_info.route.resource
    action = f"{request.method} {resource.canonical if resource is not None else request.path}"
    audit.record(token=grant.name if grant is not None else None,
                 remote="unix" if over_unix_socket(request) else request.remote, action=action,
                 target=_target(request, body), result=result)


_TARGET_FIELDS = ("model", "name", "models", "backend", "source", "destination")


def _target(request: web.Request, body: bool) -> str:
    """The path, and the fields of the JSON body that name what was acted on, when the handler read it
    (read_json_body keeps it on the request); a body the handler did not read or refused is not read here."""
    parts = [request.path]
    payload: dict[str, Any] = request.get(JSON_BODY, {}) if body else {}
    for key in _TARGET_FIELDS:
        value = payload.get(key)
        if isinstance(value, str | list) and value:
            parts.append(f"{key}={_clipped(value)}")
    return " ".join(parts)


def _clipped(value: str | list[Any]) -> str:
    """`value` as JSON, at most 200 characters, cut before it is encoded: a body may hold megabytes."""
    if isinstance(value, list):  # names; anything else in the list was refused by the handler
        value = [v[:200] if isinstance(v, str) else None for v in value[:200]]
    else:
        value = value[:200]
    return json.dumps(value, ensure_ascii=False)[:200]


# (method, route template) -> role: the rules are regular expressions, and each route's answer never changes.
_ROLES: dict[tuple[str, str], Role] = {}
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def _role(request: web.Request) -> Role:
    resource = request.match_info.route.resource
    if resource is None:
        return scopes.required_role(request)
    key = (request.method, resource.canonical)
    role = _ROLES.get(key)
    if role is None:
        role = _ROLES[key] = scopes.required_role(request)
    return role


class Admission:
    """A request let through: the grant it acts under, whether its outcome is audited, and its place
    under the token's limits, given back by `finish`."""

    __slots__ = ("audited", "grant", "release")

    def __init__(self, grant: Grant | None, audited: bool, release: Callable[[], None] | None = None) -> None:
        self.grant = grant
        self.audited = audited
        self.release = release

    def finish(self, request: web.Request, result: str) -> None:
        """`result`: the answer's status, or "interrupted" when the handler raised."""
        if self.release is not None:
            self.release()
        if self.audited:
            _audit(request, self.grant, result, body=True)


# Reads (ps, metrics, status) are polled by monitors: auditing each would drown the actions.
_TRUSTED_READ = Admission(None, audited=False)


def authenticate(request: web.Request, presented: list[str]) -> Grant | None:
    """The grant every presented token names (one grant: two headers that name different tokens are
    refused); None if any is wrong or none was sent. Each is compared in full: the time taken does not
    say which one matched."""
    keyring = request.app.get(KEYRING)
    if keyring is None and (single := request.app.get(HTTP_TOKEN)) is not None:
        keyring = Keyring(single)
    if keyring is None:  # cannot happen with a TCP listener (serve refuses to start); fail closed anyway
        return None
    grants = [keyring.match(t) for t in presented]
    if not grants or any(g is None for g in grants) or len({g.name for g in grants if g is not None}) != 1:
        return None
    return grants[0]


def admit(request: web.Request) -> Admission | web.Response:
    """Whether the request may reach its handler: an Admission, or the refusal to send (401, 403, 429, or
    400 for a credential header sent twice) in the route's error shape."""
    if over_unix_socket(request):
        if request.method in _READS:
            return _TRUSTED_READ
        return Admission(None, audited=_role(request) != "user")
    if _open_route(request):
        return _TRUSTED_READ
    role = _role(request)
    try:
        presented = presented_tokens(request)
    except ApiError as exc:
        return render_error(request, exc)
    grant = authenticate(request, presented)
    if grant is None:
        _audit(request, None, "unauthenticated: " + ("invalid token" if presented else "no token"))
        # render_error: the route's error shape (Ollama's under /api/, Anthropic's under its routes,
        # OpenAI's elsewhere).
        return render_error(request, _unauthenticated(bool(presented)))
    if not grant.may(role):
        _audit(request, grant, f"forbidden: needs role {role}")
        return render_error(request, ApiError(403, scopes.forbidden_message(grant, role, request),
                                              code="insufficient_role", type="permission_error"))
    limiter = request.app.get(LIMITER)
    try:
        release = limiter.enter(grant) if limiter is not None else None
    except LimitHit as hit:
        _audit(request, grant, f"limited: {hit.limit} {hit.value}")
        return render_error(request, ApiError(429, hit.message(grant.name), code="rate_limit_exceeded",
                                              type="rate_limit_error",
                                              headers={"Retry-After": str(hit.retry_after)}))
    return Admission(grant, audited=role != "user" and request.method not in _READS, release=release)
