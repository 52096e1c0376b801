"""The one middleware every request passes, and the one hook run as its headers go out.

In order: the request metrics see every answer (refusals included); CORS refuses a foreign origin and
answers preflights; authentication admits the request or refuses it; errors the handler raises become
JSON answers in the route's shape. One coroutine rather than one middleware for each: aiohttp resumes
every frame of the chain each time the handler's innermost await resumes, so each middleware costs on
every read and write of a relayed answer, not once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from runnerd.api import cors, scopes
from runnerd.api.auth import admit
from runnerd.api.errors import answer_for
from runnerd.api.metrics import STARTED, observe_answer, observe_first_byte
from runnerd.loop_turns import TURNS

# Over the unix socket no grant narrows what a handler sees, and no outer request set one.
_NO_SCOPE = contextlib.nullcontext()


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[STARTED] = started = time.perf_counter()
    status = 500
    try:
        turns = request.app[TURNS]
        if turns.spent():  # a burst of arrivals is served over several turns of the loop
            await turns.take()
        response: web.StreamResponse | None = cors.screen(request)
        if response is None:
            admission = admit(request)
            if isinstance(admission, web.StreamResponse):
                response = admission
            else:
                result = "interrupted"
                # The grant is what the model lookups deep in the handler check against.
                scope = (scopes.acting_as(admission.grant)
                         if admission.grant is not None or scopes.caller() is not None else _NO_SCOPE)
                try:
                    with scope:
                        response = await handler(request)
                except Exception as exc:
                    response = answer_for(request, exc)
                    if response is None:
                        raise
                finally:
                    if response is not None:
                        result = str(response.status)
                    admission.finish(request, result)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away first
        raise
    finally:
        observe_answer(request, started, status)


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    observe_first_byte(request)
    cors.add_headers(request, response)
