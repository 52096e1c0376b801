"""Cross-origin requests from browsers: allowed origins get CORS headers, others get 403.

A web page on any site can make the user's browser send requests to a local port, so a request that
carries an `Origin` must come from an allowed origin (`allowed_origins` in the settings). Requests
without `Origin` (CLIs, SDKs, other daemons) are not browser requests and pass untouched.

Patterns: `scheme://host` allows that host on any port; `scheme://host:port` that port only;
`scheme://*` any origin of that scheme (desktop shells such as Electron or Tauri use their own
schemes); `*` any origin at all.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from runnerd.api.context import daemon
from runnerd.api.errors import ApiError, render_error

_METHODS = "GET, POST, DELETE, OPTIONS"
_DEFAULT_HEADERS = "Authorization, Content-Type, Accept, User-Agent, X-Requested-With"
_ORIGIN_KEY = web.RequestKey("cors_origin", str)


def origin_allowed(origin: str, patterns: list[str]) -> bool:
    """Whether `origin` (scheme://host[:port]) matches one of `patterns` (see the module's docstring)."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if not scheme or parts.path not in ("", "/") or parts.query or parts.username is not None:
        return False
    for pattern in patterns:
        if pattern == "*":
            return True
        p = urlsplit(pattern.lower())
        if p.scheme != scheme:
            continue
        if p.netloc == "*":
            return True
        try:
            same_host = p.hostname == host
            wanted_port = p.port
        except ValueError:
            continue
        if same_host and (wanted_port is None or wanted_port == port):
            return True
    return False


def screen(request: web.Request) -> web.Response | None:
    """The answer to a browser's request that goes no further (a refused origin's 403, a preflight's
    204), or None to let it through; an allowed origin is kept on the request for `add_headers`."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    if not origin_allowed(origin, daemon(request).settings.allowed_origins):
        return render_error(request, ApiError(403, f"origin {origin!r} is not allowed; add it to allowed_origins "
                                                   "in the daemon's settings", code="origin_not_allowed"))
    request[_ORIGIN_KEY] = origin
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        # A preflight: answered here, before authentication (browsers never send credentials on it).
        headers = {
            "Access-Control-Allow-Methods": _METHODS,
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", _DEFAULT_HEADERS),
            "Access-Control-Max-Age": "600",
        }
        return web.Response(status=204, headers=headers)
    return None


def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """When the headers go out (streaming handlers send theirs themselves): an allowed origin's."""
    origin = request.get(_ORIGIN_KEY)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers.add("Vary", "Origin")
