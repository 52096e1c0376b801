"""vLLM's `--hf-overrides` (the per-model `vllm.hf_overrides` option): what a caller may override.

The value is a JSON object that vLLM merges into the model's Hugging Face config before it loads the
model. The shared JSON rules apply (backends/flags.py: keys are identifiers at every depth, values are
JSON scalars, lists and objects, strings pass the free-text rules, remote-code keys are refused), and
one more: no key may start with ``_``. vLLM 0.32 walks the override into the config object with
getattr/setattr, so a key such as ``__class__``, ``__dict__`` or ``__init__`` followed the walk out of
the config into Python internals (a module's globals); no real config field starts with ``_``.
"""

from __future__ import annotations

from backends.flags import validate_json_option

__all__ = ["validate_hf_overrides"]

SUBJECT = "hf_overrides"


def _private_key(key: str) -> str | None:
    if key.startswith("_"):
        return "keys starting with '_' are refused (vLLM would follow them into Python internals)"
    return None


def validate_hf_overrides(obj: object) -> str:
    """Check ``vllm.hf_overrides`` and return the compact JSON for ``--hf-overrides``.

    Accepts the decoded object (a dict) or JSON text. Raises FlagError naming the offending key path.
    """
    return validate_json_option(obj, subject=SUBJECT, key_rule=_private_key)
