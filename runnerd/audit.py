"""The audit log: one JSON line per admin or operator action, refused authentication, refused action and
limit hit, with the time, the token's name (never the token), the remote address, the action, its target
and the result. Rotated by size (`[audit] max_bytes`, `backups` files kept).

Lines are queued and written by a thread of their own (logging's QueueListener): a slow disk never
stalls the event loop, and the order of lines is the order of events.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web


class _OwnerOnlyRotatingHandler(logging.handlers.RotatingFileHandler):
    """Remote addresses and token names are nobody else's business: each file is created 0600."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8")


class AuditLog:
    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._handler = _OwnerOnlyRotatingHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8",
                                                  delay=True)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._listener = logging.handlers.QueueListener(self._queue, self._handler)
        self._started = False

    def start(self) -> None:
        """Blocking (creates the directory)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._listener.start()
        self._started = True

    def stop(self) -> None:
        """Blocking: writes what is queued, then closes the file."""
        if self._started:
            self._listener.stop()
            self._started = False
        self._handler.close()

    def record(self, *, token: str | None, remote: str | None, action: str, target: str | None,
               result: str) -> None:
        line = json.dumps({"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "token": token,
                           "remote": remote, "action": action, "target": target, "result": result},
                          ensure_ascii=False, separators=(",", ":"))
        self._queue.put(logging.LogRecord("runnerd.audit", logging.INFO, __file__, 0, line, None, None))


AUDIT = web.AppKey("audit", AuditLog)
