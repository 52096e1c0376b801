"""What a TCP caller's token may do: the role each route needs, and which models the token may see.

Roles nest: `user` may infer and list, `operator` also loads, unloads, estimates and watches the node
(ps, status, metrics, logs, jobs, drain), `admin` may do everything, including what changes the host
(pulling, deleting, configuring, installing or defining engines). A route not named below needs `admin`,
so a route added later is closed until someone decides otherwise.

The model allowlist is checked where a route looks a model up (`check_model`, called inside the lookup's
own error handling) and raises the very error a model that does not exist raises: the answer for a model
outside the allowlist is the route's own "not found", byte for byte. The check is a string match done
before the store is consulted, so for a name outside the allowlist the store is never asked and the time
taken is the same whether the model exists or not. What lists models, runners, metric series, log lines
or configurations leaves out what the caller may not use (`visible`, `model_filter`,
`hidden_names_pattern`). Unix-socket callers carry no grant and see everything.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import TypeVar

from aiohttp import web

from runnerd.api.errors import ApiError
from runnerd.store import ModelNotFound, StoreError, canonical_name
from runnerd.tokens import Grant, Role

_T = TypeVar("_T")

# The grant of the request being handled; None over the unix socket (and outside requests). A context
# variable, not a handler argument: the model lookups it guards are deep in shared helpers.
_CALLER: ContextVar[Grant | None] = ContextVar("runnerd_caller", default=None)

_INFERENCE = r"/v1/(?:chat/completions|completions|embeddings|rerank|messages|messages/count_tokens|responses" \
             r"|responses/input_tokens)|/rerank"
_PREFIX = r"(?:|/engines|/engines/\{backend\}|/anthropic)"

# (methods, route template) -> the least role that may call it. Templates are aiohttp's canonical ones
# ("/engines/{backend}/v1/models"), never the raw path, so no spelling of a path can land in another rule.
_RULES: list[tuple[frozenset[str], re.Pattern[str], Role]] = [
    (frozenset({"POST"}), re.compile(rf"^{_PREFIX}(?:{_INFERENCE})$"), "user"),
    (frozenset({"GET", "HEAD"}), re.compile(rf"^{_PREFIX}/v1/models(?:/\{{name\}})?$"), "user"),
    (frozenset({"GET", "HEAD", "DELETE"}), re.compile(r"^(?:|/engines)/v1/responses/\{id\}(?:/input_items)?$"),
     "user"),
    (frozenset({"POST"}), re.compile(r"^/api/(?:chat|generate|embed|embeddings|show)$"), "user"),
    (frozenset({"GET", "HEAD"}), re.compile(r"^(?:/|/version|/api/version|/api/tags|/models|/models/\{name\})$"),
     "user"),
    (frozenset({"POST"}), re.compile(r"^/engines/unload$|^/node/(?:drain|resume)$"), "operator"),
    (frozenset({"GET", "HEAD"}), re.compile(
        r"^(?:/engines/(?:ps|status|df|backends|_configure)|/api/ps|/node|/metrics|/logs|/jobs|/jobs/\{id\}"
        r"|/models/\{name\}/estimate)$"), "operator"),
]


def required_role(request: web.Request) -> Role:
    resource = request.match_info.route.resource
    if resource is None:
        return "user"  # no such route (404) or method (405): nothing to guard, the router answers
    return role_for(request.method, resource.canonical)


def role_for(method: str, template: str) -> Role:
    """The least role that may call `method` on the route `template`."""
    for methods, pattern, role in _RULES:
        if method in methods and pattern.match(template):
            return role
    return "admin"


def forbidden_message(grant: Grant, needed: Role, request: web.Request) -> str:
    return (f"token {grant.name!r} has role {grant.role!r}; {request.method} {request.path} needs the "
            f"{needed!r} role")


@contextlib.contextmanager
def acting_as(grant: Grant | None) -> Iterator[None]:
    token = _CALLER.set(grant)
    try:
        yield
    finally:
        _CALLER.reset(token)


def caller() -> Grant | None:
    return _CALLER.get()


def spellings(name: str) -> tuple[str, ...]:
    """The names one model answers to: as asked, canonical (`x:latest`), and without `:latest`."""
    try:
        canonical = canonical_name(name)
    except StoreError:
        return (name,)
    return (name, canonical, canonical.removesuffix(":latest"))


def may_use(name: str) -> bool:
    grant = _CALLER.get()
    if grant is None:
        return True
    return isinstance(name, str) and grant.allows_model(spellings(name))


def check_model(name: str) -> None:
    """Raise what the store raises for a model that does not exist when the caller may not use `name`.
    Call it inside the same `try` as the lookup, before it."""
    if not may_use(name):
        raise ModelNotFound(f"model {name!r} not found")


def check_new_name(name: str, param: str) -> None:
    """403 when the caller may not use `name` as the name of a model it makes (a copy, a tag): the same
    answer whether a model by that name exists or not."""
    grant = _CALLER.get()
    if grant is not None and not may_use(name):
        raise ApiError(403, f"token {grant.name!r} may only name models its patterns match; {name!r} does not",
                       code="model_not_allowed", type="permission_error", param=param)


def visible(items: Iterable[_T], name: Callable[[_T], str]) -> list[_T]:
    """The items whose model (`name(item)`) the caller may use, in order."""
    return [item for item in items if may_use(name(item))]


def sees_every_model() -> bool:
    """Whether the caller's patterns let nothing out (the socket, and tokens whose patterns include `*`)."""
    grant = _CALLER.get()
    return grant is None or "*" in grant.models


def model_filter() -> Callable[[str], bool]:
    """`may_use` for the caller of now, usable where the request's context is not (a worker thread, a
    stream's later writes); each name is matched once."""
    grant = _CALLER.get()
    if grant is None or "*" in grant.models:
        return lambda name: True
    seen: dict[str, bool] = {}

    def allowed(name: str) -> bool:
        if name not in seen:
            seen[name] = grant.allows_model(spellings(name))
        return seen[name]
    return allowed


def hidden_names_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern that finds, in free text, any of `names` the caller may not use (None: there are none).
    A name matches as a whole word, with or without its tag, so `tiny` also finds `tiny:latest` and
    `tiny:q4`; a visible model that shares a hidden one's base name loses those lines too, which hides
    more than needed rather than less."""
    allowed = model_filter()
    bases = sorted({_base(n) for n in names if not allowed(n)}, key=len, reverse=True)
    if not bases:
        return None
    return re.compile(r"(?<![\w./:-])(?:" + "|".join(map(re.escape, bases)) + r")(?![\w./-])")


def _base(name: str) -> str:
    head, slash, last = name.rpartition("/")
    return head + slash + last.split(":", 1)[0]
