"""Stored responses, for `previous_response_id` and the GET/DELETE routes.

They live in the daemon's memory, bounded by a count and a size (`[apis]` settings), the least recently
used dropped first, and are gone when the daemon stops: a local daemon keeps conversations for the
clients talking to it now, not an archive. Each entry holds only its own input and output and the id
of the response it continued, so a long chain costs its length, not its length squared; the context for
the next turn is rebuilt by walking the chain.

Each response belongs to whoever made it: a TCP token (by its name) or the unix socket's callers, who
are the host's own users. A caller finds, reads, continues and deletes only its own; an admin token may
read, continue and delete any (the host's administrator answers for what the daemon holds). Anyone
else's id is answered exactly as an id that is not stored, and looking it up does not make it recent.
An entry with no owner is the socket's.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from runnerd.api import scopes
from runnerd.api.errors import ApiError


@dataclass(frozen=True)
class Viewer:
    """Who asks: a token's name (None: the unix socket), and whether it may see every caller's responses."""

    owner: str | None
    sees_all: bool = False


SOCKET = Viewer(None)


def viewer() -> Viewer:
    """The caller of the request being handled."""
    grant = scopes.caller()
    return SOCKET if grant is None else Viewer(grant.name, grant.role == "admin")


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]  # this request's input, each with an id
    previous_id: str | None
    size: int
    owner: str | None = None  # the token's name; None: made over the unix socket

    @classmethod
    def of(cls, response: dict[str, Any], input_items: list[dict[str, Any]], previous_id: str | None,
           owner: str | None = None) -> StoredResponse:
        size = len(json.dumps(response)) + len(json.dumps(input_items))
        return cls(response, input_items, previous_id, size, owner)

    def seen_by(self, who: Viewer) -> bool:
        return who.sees_all or self.owner == who.owner


class ResponseStore:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: StoredResponse) -> None:
        response_id = str(entry.response["id"])
        self._drop(response_id)
        if entry.size > self.max_bytes or self.max_entries == 0:
            return
        self._entries[response_id] = entry
        self._bytes += entry.size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.size

    def _find(self, response_id: str, who: Viewer) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        return entry if entry is not None and entry.seen_by(who) else None

    def get(self, response_id: str, who: Viewer) -> StoredResponse:
        entry = self._find(response_id, who)
        if entry is None:
            raise ApiError(404, f"no stored response with id {response_id!r} (responses are kept in the daemon's "
                                "memory, a bounded number, until it stops)", code="response_not_found")
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str, who: Viewer) -> bool:
        return self._find(response_id, who) is not None and self._drop(response_id)

    def _drop(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        return True

    def chain(self, response_id: str, who: Viewer) -> list[StoredResponse]:
        """The stored responses from the first of the conversation to `response_id`, oldest first; an
        earlier turn `who` may not see is as gone as one no longer stored."""
        chain: list[StoredResponse] = []
        seen: set[str] = set()
        current: str | None = response_id
        while current is not None:
            if current in seen:
                break
            seen.add(current)
            try:
                entry = self.get(current, who)
            except ApiError as exc:
                if current == response_id:
                    raise
                raise ApiError(404, f"response {response_id!r} continues {current!r}, which is no longer stored",
                               code="response_not_found", param="previous_response_id") from exc
            chain.append(entry)
            current = entry.previous_id
        chain.reverse()
        return chain


RESPONSE_STORE = web.AppKey("response_store", ResponseStore)
