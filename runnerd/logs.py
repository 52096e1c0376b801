"""One line per event: time, level, logger, message. Recent lines are also kept in memory for /logs."""

from __future__ import annotations

import collections
import logging
import sys
import threading

_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class LogBuffer(logging.Handler):
    """The daemon's most recent log lines, numbered so a follower can ask for what came after."""

    def __init__(self, capacity: int = 5000) -> None:
        super().__init__()
        self._lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=capacity)
        self._seq = 0
        self._guard = threading.Lock()  # records come from worker threads too

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._guard:
            for line in text.splitlines() or [""]:
                self._seq += 1
                self._lines.append((self._seq, line))

    def tail(self, count: int) -> tuple[list[str], int]:
        """The last `count` lines and the number to pass to `since` for what follows them."""
        with self._guard:
            lines = [line for _, line in self._lines][-count:] if count > 0 else []
            return lines, self._seq

    def since(self, seq: int) -> tuple[list[str], int]:
        with self._guard:
            return [line for n, line in self._lines if n > seq], self._seq


DAEMON_LOG = LogBuffer()


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    DAEMON_LOG.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler, DAEMON_LOG]
    root.setLevel(level.upper())
