"""The `runnerd` argument parser: every command and option."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runnerd import __version__
from runnerd.cli import service, tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runnerd", description="Run local LLM engines for this host.")
    parser.add_argument("--version", action="version", version=f"runnerd {__version__}")
    # metavar: the commands are listed once, below, rather than again as a {a,b,...} choice list.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client(name: str, key: str, help: str, parent: Any = sub, aliases: tuple[str, ...] = ()) \
            -> argparse.ArgumentParser:
        """A client command; `aliases` are Ollama's names for it (`list`, `cp`), shown as "ls (list)"."""
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, aliases=list(aliases))
        p.add_argument("--socket", type=Path, help="daemon socket (env RUNNERD_SOCKET)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(command_key=key)
        return p

    # No abbreviations: `--token SECRET` must not pass for `--token-file` (a token never goes on a command line).
    serve = sub.add_parser("serve", help="run the daemon in the foreground", allow_abbrev=False)
    serve.add_argument("--config", type=Path, help="TOML config file (env RUNNERD_CONFIG)")
    serve.add_argument("--socket", type=Path, help="unix socket to listen on (env RUNNERD_SOCKET)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                       help="register a local GGUF model at start (repeatable)")
    serve.add_argument("--print-chat-command", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--listen", metavar="HOST:PORT",
                       help="also serve HTTP on TCP for parent schedulers (needs [http] token_file)")
    serve.add_argument("--token-file", type=Path, help="file holding the bearer token for the TCP listener")

    models = sub.add_parser("models", help="manage registered models")
    msub = models.add_subparsers(dest="models_command", required=True)
    add = client("add", "models.add", "register a local GGUF file under a name", msub)
    add.add_argument("name")
    add.add_argument("path")
    add.add_argument("--context-size", type=int)
    add.add_argument("--keep-alive", help="e.g. 5m, 0 (unload after each request), -1 (never)")
    client("ls", "models.list", "list registered models", msub)
    client("ls", "models.list", "list models (same as `models ls`)", aliases=("list",))
    pull = client("pull", "pull", "pull a model into the store: hf://org/repo/file.gguf[@rev], a URL or a path")
    pull.add_argument("source")
    pull.add_argument("--name", help="name[:tag] to register it under (default: from the source)")
    pull.add_argument("--sha256", help="expected sha256 of the file")
    pull.add_argument("--mmproj", help="a multimodal projector GGUF to store with it (same kind of source)")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    rm = client("rm", "rm", "remove a model (its blobs go when no other name uses them)")
    rm.add_argument("model")
    rm.add_argument("--force", action="store_true", help="remove even while a runner uses it (stops the runner)")
    tag = client("tag", "tag", "give a model another name", aliases=("cp",))
    tag.add_argument("source")
    tag.add_argument("target")
    tag.add_argument("-f", "--force", action="store_true", help="replace a model already named TARGET")

    run = client("run", "run", "chat with a model (interactive without a prompt; /? lists its commands)")
    run.add_argument("model")
    run.add_argument("prompt", nargs="*")
    run.add_argument("--max-tokens", type=int, help="stop each answer after this many tokens (a model without "
                     "a chat template: 256 by default)")
    conf = client("configure", "configure", "set a model's engine configuration (context, flags, keep-alive)")
    conf.add_argument("model", nargs="?")
    conf.add_argument("--mode", default="completion", choices=["completion", "embedding", "reranking"])
    conf.add_argument("--backend")
    conf.add_argument("--ctx", type=int, help="context size in tokens")
    conf.add_argument("--flags", help='engine flags as one string, e.g. "--temp 0.7 --threads 4"')
    conf.add_argument("--keep-alive", help="e.g. 10m, 0, -1")
    conf.add_argument("--reasoning-budget", type=int)
    conf.add_argument("--show", action="store_true", help="list stored configurations")
    conf.add_argument("--reset", action="store_true", help="remove the model's stored configuration")
    est = client("estimate", "estimate", "RAM/VRAM a model would take (a registered name or a .gguf path)")
    est.add_argument("model")
    est.add_argument("--ctx", type=int, help="context size in tokens")
    est.add_argument("--parallel", type=int)
    est.add_argument("--cache-type-k")
    est.add_argument("--cache-type-v")
    est.add_argument("--gpu-layers")
    est.add_argument("--flash-attn", choices=["on", "off", "auto"])
    est.add_argument("--batch-size", type=int)
    est.add_argument("--ubatch-size", type=int)
    est.add_argument("--mode", default="completion", choices=["completion", "embedding", "reranking"])
    insp = client("inspect", "inspect", "a model's header: architecture, parameters, quantization, ...")
    insp.add_argument("model")
    show = client("show", "show", "a model's header and its stored engine configuration")
    show.add_argument("model")
    client("ps", "ps", "list running engines")
    client("status", "status", "show each backend's status")
    service.add_parsers(sub, client)
    unload = client("unload", "unload", "stop running engines (all by default)")
    unload.add_argument("models", nargs="*")
    unload.add_argument("--backend")
    unload.add_argument("--all", action="store_true")
    stop = client("stop", "stop", "stop the engines running a model (`unload MODEL`)")
    stop.add_argument("model")

    install = sub.add_parser("install-backend", help="install a backend on this host (no daemon needed)")
    install.add_argument("backend", nargs="?", help="an engine's name, or ENGINE@VERSION to install one more version "
                         "beside those installed; default: the first registered engine")
    install.add_argument("--config", type=Path)
    install.add_argument("--quiet", action="store_true")
    tokens.add_parser(sub)
    return parser
