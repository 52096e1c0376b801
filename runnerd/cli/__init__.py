"""The `runnerd` command: `serve` runs the daemon; the other commands talk to it over its socket.

    parser.py     every command and option
    serve.py      commands that run here: `serve` (the daemon), `install-backend`
    commands.py   client commands: models, pull, rm, tag (cp), ls (list), ps, status, unload, stop, configure,
                  estimate, inspect, show
    chat.py       `run`: one answer, or an interactive conversation with Ollama's commands and Ctrl-C
    service.py    client commands for running runnerd as a service: backends, node, drain, resume
    tokens.py     `tokens add|rm|ls`: the TCP listener's tokens file, edited here
    client.py     the daemon's unix-socket client (aiohttp)
    output.py     tables, sizes, durations, JSON

Imports are kept lazy: `runnerd inspect FILE` and `runnerd estimate FILE` answer without a daemon and
should take well under a second, so this package must not pull in pydantic-settings (runnerd.config),
aiohttp or the daemon unless the command needs them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from runnerd.cli import commands, service
from runnerd.cli.output import print_json
from runnerd.cli.parser import build_parser
from runnerd.cli.serve import install_backend, serve_daemon
from runnerd.cli.tokens import tokens_command
from runnerd.errors import ClientError

__all__ = ["build_parser", "main"]

CLIENT_COMMANDS = {**commands.COMMANDS, **service.COMMANDS}
LOCAL_COMMANDS = commands.LOCAL_COMMANDS


async def _client_command(args: argparse.Namespace) -> int:
    local = LOCAL_COMMANDS.get(args.command_key)
    if local is not None and Path(args.model).is_file():
        # A model file on this host: answered here, without a daemon (nor aiohttp's import time).
        result, show = await local(args)
    else:
        from runnerd.cli.client import DaemonClient
        from runnerd.config import default_socket

        async with DaemonClient(args.socket or default_socket()) as client:
            result, show = await CLIENT_COMMANDS[args.command_key](client, args)
    if args.json and result is not None:
        print_json(result)
    elif show is not None:
        show()
    return 0


def _is_config_error(exc: Exception) -> bool:
    """Whether `exc` is a runnerd.config.ConfigError. Only a command that imported runnerd.config can
    raise one, so looking the module up (rather than importing it) keeps the light commands light."""
    config = sys.modules.get("runnerd.config")
    return config is not None and isinstance(exc, config.ConfigError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from runnerd.server import event_loop_factory

            with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
                return runner.run(serve_daemon(args))
        if args.command == "install-backend":
            return asyncio.run(install_backend(args))
        if args.command == "tokens":
            return tokens_command(args)
        return asyncio.run(_client_command(args))
    except Exception as exc:
        if not isinstance(exc, ClientError) and not _is_config_error(exc):
            raise
        print(f"runnerd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
