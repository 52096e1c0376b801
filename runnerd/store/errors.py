"""What store operations raise: StoreError (with the HTTP status that fits) and its kinds, and the
signal a cancelled pull's worker thread stops on."""

from __future__ import annotations

import threading


class StoreError(Exception):
    """A store operation failed; ``status`` is the HTTP status that fits, ``code`` a short kind."""

    status = 400
    code = "invalid_model"

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class ModelNotFound(StoreError):
    status = 404
    code = "model_not_found"


class ModelInUse(StoreError):
    status = 409
    code = "model_in_use"


class ModelExists(StoreError):
    status = 409
    code = "model_exists"


class PullCancelled(Exception):
    """Raised in a pull's worker thread once its request was cancelled; nobody awaits it any more."""


def stop_if(cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise PullCancelled
