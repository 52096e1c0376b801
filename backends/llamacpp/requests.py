"""Request fields that multiply the size of llama-server's answer, bounded at the daemon's door.

llama-server takes these as they come: `n_probs: 1e9` with `max_tokens: 8` made it write a 37.5 MB
answer (every token's probabilities over the whole vocabulary, eight times). The bounds:

- ``n_probs`` (llama-server's own field): 0 to ``MAX_N_PROBS`` (enough to inspect a distribution's head;
  a whole vocabulary per token is what made the answer huge);
- ``top_logprobs`` (OpenAI chat) and ``logprobs`` as a number (OpenAI completions): 0 to
  ``MAX_TOP_LOGPROBS``, OpenAI's own limit; ``logprobs`` as a boolean (chat) is left as it is;
- ``n`` and ``best_of`` (choices per request): 1 to ``MAX_CHOICES``;
- ``n_predict``, ``max_tokens`` and ``max_completion_tokens``: -1 (no limit: the context bounds it) to
  ``MAX_PREDICT``.

A value that is not a whole number (a float, a string, a boolean) is refused for these fields, so the
engine never has to coerce one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_N_PROBS = 100
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16
MAX_PREDICT = 1 << 20

_BOUNDS: dict[str, tuple[int, int]] = {
    "n_probs": (0, MAX_N_PROBS),
    "top_logprobs": (0, MAX_TOP_LOGPROBS),
    "n": (1, MAX_CHOICES),
    "best_of": (1, MAX_CHOICES),
    "n_predict": (-1, MAX_PREDICT),
    "max_tokens": (-1, MAX_PREDICT),
    "max_completion_tokens": (-1, MAX_PREDICT),
}


def answer_size_problem(payload: Mapping[str, Any]) -> str | None:
    """Why a field of this request would make llama-server's answer too large, naming the field; or None."""
    for name, (low, high) in _BOUNDS.items():
        if name not in payload or payload[name] is None:
            continue
        value = payload[name]
        if not _whole(value) or not low <= value <= high:
            return f"{name} must be a whole number from {low} to {high}, got {_shown(value)}"
    logprobs = payload.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool) and \
            (not _whole(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        return f"logprobs must be true, false or a whole number from 0 to {MAX_TOP_LOGPROBS}, got {_shown(logprobs)}"
    return None


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
