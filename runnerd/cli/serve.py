"""The commands that run here rather than through a daemon's socket: `serve` (the daemon in the
foreground) and `install-backend` (what `make` uses to prepare a host)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _parse_model_args(values: Sequence[str]) -> list[tuple[str, Path]]:
    from runnerd.config import ConfigError

    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model expects NAME=PATH, got {value!r}")
        out.append((name, Path(path).resolve()))
    return out


def _http_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """--listen / --token-file, merged over the config file's [http] table (the token itself is
    never taken from the command line, where every user on the host could read it)."""
    given = {"listen": args.listen, "token_file": args.token_file}
    return {k: v for k, v in given.items() if v is not None} or None


async def serve_daemon(args: argparse.Namespace) -> int:
    from runnerd.config import load_settings
    from runnerd.heap import settle_after_start
    from runnerd.logs import setup_logging
    from runnerd.server import ListenerError, create_app, serve
    from runnerd.store import StoreError

    settings = load_settings(args.config, socket=args.socket, log_level=args.log_level, http=_http_overrides(args))
    setup_logging(settings.log_level)
    app = create_app(settings)
    from runnerd.api.context import DAEMON

    try:
        for name, path in _parse_model_args(args.model):
            entry = app[DAEMON].store.add(name, path)
            logging.getLogger("runnerd").info("registered model %s -> %s", entry.name, path)
    except StoreError as exc:
        print(f"runnerd: {exc}", file=sys.stderr)
        return 2
    ready = asyncio.Event()

    async def announce() -> None:
        await ready.wait()
        if args.print_chat_command and args.model:
            name = _parse_model_args(args.model)[0][0]  # the first --model is the one to chat with
            print(f"\nrunnerd is ready. Chat with {name}:\n\n    .venv/bin/runnerd run {name}\n", flush=True)

    task = asyncio.create_task(announce())
    settle_after_start()  # everything imported and configured: freeze it before the first request comes
    try:
        await serve(settings, app, ready)
    except ListenerError as exc:
        print(f"runnerd: {exc}", file=sys.stderr)
        return 1
    finally:
        task.cancel()
    return 0


async def install_backend(args: argparse.Namespace) -> int:
    """Install a backend in this process (no daemon needed): what `make` uses to prepare a host. One
    line when it already is installed; a progress bar on a terminal, else a line per phase."""
    from backends.base import Progress
    from runnerd.cli.output import ProgressView
    from runnerd.config import load_settings
    from runnerd.engines import default_backends
    from runnerd.logs import setup_logging

    settings = load_settings(args.config)
    setup_logging(settings.log_level)
    backends = default_backends(settings)
    args.backend, _, version = (args.backend or next(iter(backends))).partition("@")
    if args.backend not in backends:
        print(f"runnerd: unknown backend {args.backend!r}; known: {', '.join(backends)}", file=sys.stderr)
        return 2
    backend = backends[args.backend]
    if version:
        return await _install_version(backend, version, args.quiet)
    status = await asyncio.to_thread(backend.status)
    if status.installed:
        print(f"{args.backend} is already installed: {status.text}")
        return 0
    with ProgressView(args.backend, enabled=not args.quiet, percent=True, unit="%") as view:
        def progress(p: Progress) -> None:
            view.update(f"{args.backend}: {p.phase}", p.percent)

        await backend.install(progress)
    print((await asyncio.to_thread(backend.status)).text)
    return 0


async def _install_version(backend: Any, version: str, quiet: bool) -> int:
    """`install-backend ENGINE@VERSION`: build one more version beside those installed."""
    from backends.base import InstallError, Progress
    from runnerd.cli.output import ProgressView

    target = f"{backend.name}@{version}"
    if not hasattr(backend, "install_version"):
        print(f"runnerd: {backend.name} keeps a single version; install it without @{version}", file=sys.stderr)
        return 2
    if version in await asyncio.to_thread(backend.installed_versions):
        print(f"{target} is already installed")
        return 0
    with ProgressView(target, enabled=not quiet, percent=True, unit="%") as view:
        def progress(p: Progress) -> None:
            view.update(f"{target}: {p.phase}", p.percent)

        try:
            await backend.install_version(version, progress)
        except InstallError as exc:
            print(f"runnerd: {target}: {exc}", file=sys.stderr)
            return 1
    print(f"installed {target}")
    return 0
