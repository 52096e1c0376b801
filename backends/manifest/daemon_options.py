"""The options whose values the daemon decides, which no manifest may set otherwise."""

from __future__ import annotations

# Options whose value the daemon decides, with the only values a template may give them (an empty set:
# the template may not pass the option at all). Long spellings only: short ones mean different things
# to different engines (`python -m module`).
_LISTEN = frozenset({"{host}", "{port}", "{socket}", "{host}:{port}"})
DAEMON_OPTIONS: dict[str, frozenset[str]] = {
    **dict.fromkeys(("--host", "--port", "--bind", "--listen", "--uds", "--unix-socket", "--socket",
                     "--address", "--addr"), _LISTEN),
    **dict.fromkeys(("--model", "--model-path"), frozenset({"{model_path}"})),
    **dict.fromkeys(("--alias", "--served-model-name", "--model-alias"), frozenset({"{model_name}"})),
    **dict.fromkeys(("--api-key", "--api-key-file", "--api-prefix", "--root-path", "--ssl-keyfile",
                     "--ssl-certfile", "--ssl-key-file", "--ssl-cert-file"), frozenset()),
}


def daemon_option(name: str) -> frozenset[str] | None:
    """The values a template may give `name` if it is one of the daemon's options, or an abbreviation of
    one (Python's argparse reads `--hos` as `--host`); None when it is not."""
    name = name.lower()
    if name in DAEMON_OPTIONS:
        return DAEMON_OPTIONS[name]
    if name.startswith("--") and len(name) >= 5:
        return next((values for option, values in DAEMON_OPTIONS.items() if option.startswith(name)), None)
    return None
