"""The `runnerd` command: `serve` runs the daemon; the other commands talk to it over its socket.

Imports are kept lazy: `runnerd inspect FILE` and `runnerd estimate FILE` answer without a daemon and
should take well under a second, so this module must not pull in pydantic-settings (runnerd.config),
aiohttp or the daemon unless the command needs them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runnerd import __version__, cli_service
from runnerd.errors import ClientError
from runnerd.estimate_params import FLAG_PARAMS

if TYPE_CHECKING:
    from runnerd.client import DaemonClient


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _duration(seconds: float) -> str:
    """12s, 4m05s, 3h07m, 2d04h: two units at most, so a table column stays narrow."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _age(ts: float | None) -> str:
    return "-" if ts is None else _duration(time.time() - ts)


def _short_size(n: int | None) -> str:
    """Bytes the way `free -h` writes them (binary units), 4-5 characters wide."""
    if n is None:
        return "-"
    for unit, scale in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{n}B" if n else "0"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# --- serve -------------------------------------------------------------------------------------

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


async def _serve(args: argparse.Namespace) -> int:
    from runnerd.config import load_settings
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
        if args.print_chat_command:
            for name, _ in _parse_model_args(args.model):
                print(f"\nrunnerd is ready. Chat with {name}:\n\n    .venv/bin/runnerd run {name}\n", flush=True)

    task = asyncio.create_task(announce())
    try:
        await serve(settings, app, ready)
    except ListenerError as exc:
        print(f"runnerd: {exc}", file=sys.stderr)
        return 1
    finally:
        task.cancel()
    return 0


# --- client commands ---------------------------------------------------------------------------

async def _models_add(client: DaemonClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"name": args.name, "path": str(Path(args.path).resolve())}
    if args.context_size is not None:
        body["context_size"] = args.context_size
    if args.keep_alive is not None:
        body["keep_alive"] = args.keep_alive
    entry = await client.request("POST", "/models", body)
    return entry, lambda: print(f"registered {entry['name']} ({entry['size']} bytes, {entry['architecture']})")


async def _models_list(client: DaemonClient, args: argparse.Namespace) -> Any:
    models = await client.request("GET", "/models")
    return models, lambda: _table([[m["name"], m["format"], str(m["architecture"]), f"{m['size']:,}", m["path"]]
                                   for m in models], ["NAME", "FORMAT", "ARCH", "SIZE", "PATH"])


async def _pull(client: DaemonClient, args: argparse.Namespace) -> Any:
    """POST /models/create and draw its NDJSON progress as a bar (bytes)."""
    from tqdm import tqdm

    source = args.source
    if not source.startswith(("http://", "https://", "hf://")) and Path(source).exists():
        source = str(Path(source).resolve())  # a local file or directory: the daemon needs an absolute path
    body: dict[str, Any] = {"from": source}
    if args.name is not None:
        body["name"] = args.name
    if args.sha256 is not None:
        body["sha256"] = args.sha256
    if args.mmproj is not None:
        local = not args.mmproj.startswith(("http://", "https://", "hf://")) and Path(args.mmproj).exists()
        body["mmproj"] = str(Path(args.mmproj).resolve()) if local else args.mmproj
    final: dict[str, Any] = {}
    with tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc="pulling",
              disable=args.json or args.quiet) as bar:
        async for line in client.stream_ndjson("/models/create", body, method="POST", error_lines=True):
            final = line
            bar.set_description(str(line.get("phase", "")))
            if isinstance(line.get("total"), int):
                bar.total = line["total"]
            if isinstance(line.get("completed"), int):
                bar.n = line["completed"]
            bar.refresh()
    model = final.get("model")
    if not isinstance(model, dict):
        raise ClientError("the pull ended without a result (the daemon may have stopped)")
    return model, lambda: print(f"pulled {model['name']} ({model['size']:,} bytes, {model['architecture']})")


async def _rm(client: DaemonClient, args: argparse.Namespace) -> Any:
    from urllib.parse import quote

    result = await client.request("DELETE", f"/models/{quote(args.model)}" + ("?force=true" if args.force else ""))
    note = f" (stopped {result['unloaded']} runner(s))" if result.get("unloaded") else ""
    return result, lambda: print(f"deleted {result['deleted']}{note}")


async def _tag(client: DaemonClient, args: argparse.Namespace) -> Any:
    from urllib.parse import quote

    entry = await client.request("POST", f"/models/{quote(args.source)}/tag", {"name": args.target})
    return entry, lambda: print(f"tagged {entry['name']}")


def _idle(runner: dict[str, Any]) -> str:
    """How long since the runner last served a request; "-" while it serves one or is still loading."""
    if runner["active_requests"] or runner["state"] not in ("idle", "ready"):
        return "-"
    return _age(runner["last_used"])


def _expires(runner: dict[str, Any]) -> str:
    """When keep-alive stops the runner: "never" (keep_alive -1), "now" (0: after each request),
    else the time left on the running timer; "-" while no timer runs (in use, loading, stopping)."""
    if runner["keep_alive"] is None:
        return "never"
    if runner["expires_at"] is not None:
        return _duration(runner["expires_at"] - time.time())
    return "now" if runner["keep_alive"] == 0 and runner["state"] == "idle" else "-"


def _est_measured(estimated: int | None, measured: int) -> str:
    # A measurement of 0 means "not measured yet" (no process, or the first sample is still to come).
    return f"{_short_size(estimated)}/{_short_size(measured or None)}"


def ps_table(runners: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """GET /engines/ps as a table: the header and one row per runner. The VRAM column shows only
    when some runner has (or is expected to have) GPU memory: on most hosts it would be all dashes."""
    with_vram = any(r["memory"]["vram_bytes"] or r["measured_vram_bytes"] for r in runners)
    header = ["MODEL", "BACKEND", "MODE", "STATE", "PID", "ACTIVE", "UP", "IDLE", "EXPIRES", "RAM EST/MEAS"]
    header += ["VRAM EST/MEAS"] if with_vram else []
    rows = []
    for r in runners:
        known = r["memory"]["known"]
        row = [r["model"], r["backend"], r["mode"], r["state"], str(r["pid"] or "-"), str(r["active_requests"]),
               _age(r["started_at"]), _idle(r), _expires(r),
               _est_measured(r["memory"]["ram_bytes"] if known else None, r["measured_ram_bytes"])]
        if with_vram:
            row.append(_est_measured(r["memory"]["vram_bytes"] if known else None, r["measured_vram_bytes"]))
        rows.append(row)
    return header, rows


async def _ps(client: DaemonClient, args: argparse.Namespace) -> Any:
    runners = await client.request("GET", "/engines/ps")
    header, rows = ps_table(runners)
    return runners, lambda: _table(rows, header)


async def _status(client: DaemonClient, args: argparse.Namespace) -> Any:
    status = await client.request("GET", "/engines/status")
    return status, lambda: _table([[k, v] for k, v in status.items()], ["BACKEND", "STATUS"])


async def _unload(client: DaemonClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {}
    if args.backend:
        body["backend"] = args.backend
    if args.models:
        body["models"] = args.models
    if not body or args.all:
        body["all"] = True
    result = await client.request("POST", "/engines/unload", body)
    return result, lambda: print(f"unloaded {result['unloaded']} runner(s)")


async def _chat_once(client: DaemonClient, model: str, messages: list[dict[str, str]],
                     max_tokens: int | None) -> str:
    parts: list[str] = []
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    async for event in client.stream_sse("/engines/v1/chat/completions", body):
        for choice in event.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or ""
            parts.append(piece)
            print(piece, end="", flush=True)
    print()
    return "".join(parts)


async def _run(client: DaemonClient, args: argparse.Namespace) -> Any:
    if args.prompt:
        await _chat_once(client, args.model, [{"role": "user", "content": " ".join(args.prompt)}],
                         args.max_tokens)
        return None, None
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return None, None
        text = line.strip()
        if text in ("/bye", "/exit"):
            return None, None
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = await _chat_once(client, args.model, history, args.max_tokens)
        history.append({"role": "assistant", "content": reply})


async def _configure(client: DaemonClient, args: argparse.Namespace) -> Any:
    if args.show:
        query = f"?model={args.model}" if args.model else ""
        shown = await client.request("GET", f"/engines/_configure{query}")
        rows = [[c["model"], c["mode"], c["backend"], json.dumps(c["config"], separators=(",", ":"))]
                for c in shown["configurations"]]

        def show_table() -> None:
            _table(rows, ["MODEL", "MODE", "BACKEND", "CONFIGURATION"])
            for problem in shown["problems"]:
                print(f"warning: {problem}", file=sys.stderr)

        return shown, show_table
    if not args.model:
        raise ClientError("name the model to configure (or use --show)")
    if args.reset:
        removed = await client.request("DELETE", f"/engines/_configure?model={args.model}&mode={args.mode}")
        return removed, lambda: print(f"removed the configuration of {removed['model']} ({removed['mode']})")
    body: dict[str, Any] = {"model": args.model, "mode": args.mode}
    if args.ctx is not None:
        body["context_size"] = args.ctx
    if args.flags is not None:
        body["raw_runtime_flags"] = args.flags
    if args.keep_alive is not None:
        body["keep_alive"] = args.keep_alive
    if args.reasoning_budget is not None:
        body["llamacpp"] = {"reasoning_budget": args.reasoning_budget}
    path = f"/engines/{args.backend}/_configure" if args.backend else "/engines/_configure"
    stored = await client.request("POST", path, body)
    note = " (its idle engine was restarted)" if stored.get("restarted") else ""
    return stored, lambda: print(f"configured {stored['model']} ({stored['mode']}){note}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _show_estimate(result: dict[str, Any]) -> None:
    rows = [[d["device"], *(_mib(d["breakdown"][k]) for k in ("weights", "kv_cache", "compute", "overhead")),
             _mib(d["bytes"])] for d in result["devices"]]
    _table(rows, ["DEVICE", "WEIGHTS", "KV CACHE", "COMPUTE", "OVERHEAD", "TOTAL"])
    print(f"\n{result['model']} ({result['mode']}, context {result['context_size'] or 'default'}): "
          f"RAM {_mib(result['ram_bytes'])}, VRAM {_mib(result['vram_bytes'])}")
    for note in result["notes"]:
        print(f"note: {note}")


def _estimate_locally(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A .gguf file on this host: estimated here, no daemon needed."""
    from backends.base import BackendConfiguration, Mode, ModelRef
    from backends.flags import FlagError, validate_runtime_flags
    from runnerd.config import load_settings
    from runnerd.engines import default_backends

    backend = default_backends(load_settings())["llama.cpp"]
    flags = [x for param, flag in FLAG_PARAMS.items() if getattr(args, param, None) is not None
             for x in (flag, str(getattr(args, param)))]
    try:
        config = BackendConfiguration(context_size=args.ctx, runtime_flags=validate_runtime_flags(backend.name, flags))
    except FlagError as exc:
        raise ClientError(str(exc)) from exc
    mode = Mode(args.mode)
    result = backend.required_memory(ModelRef(name=path.name, path=path.resolve()), mode, config)
    return {"model": str(path), "mode": mode.value, "context_size": config.context_size,
            "runtime_flags": config.runtime_flags, **result.model_dump(mode="json")}


async def _estimate(client: DaemonClient, args: argparse.Namespace) -> Any:
    from urllib.parse import quote, urlencode

    query = {p: getattr(args, p) for p in ("ctx", "mode", *FLAG_PARAMS) if getattr(args, p, None) is not None}
    result = await client.request("GET", f"/models/{quote(args.model)}/estimate?{urlencode(query)}")
    return result, lambda: _show_estimate(result)


async def _estimate_file(args: argparse.Namespace) -> Any:
    result = await asyncio.to_thread(_estimate_locally, Path(args.model), args)
    return result, lambda: _show_estimate(result)


def _show_summary(name: str, summary: dict[str, Any] | None) -> None:
    if summary is None:
        print(f"{name}: no GGUF header summary")
        return
    print(name)
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"  {key.replace('_', ' '):<16} {shown}")


async def _inspect(client: DaemonClient, args: argparse.Namespace) -> Any:
    from urllib.parse import quote

    shown = await client.request("GET", f"/models/{quote(args.model)}")
    return shown.get("summary"), lambda: _show_summary(shown["name"], shown.get("summary"))


async def _inspect_file(args: argparse.Namespace) -> Any:
    from backends.gguf import GGUFParseError, read_header
    from backends.llamacpp.summary import summarize

    try:
        summary = summarize(await asyncio.to_thread(read_header, Path(args.model))).model_dump(mode="json")
    except GGUFParseError as exc:
        raise ClientError(str(exc)) from exc
    return summary, lambda: _show_summary(args.model, summary)


LOCAL_COMMANDS = {"estimate": _estimate_file, "inspect": _inspect_file}
CLIENT_COMMANDS = {"configure": _configure, "estimate": _estimate, "inspect": _inspect, "models.add": _models_add,
                   "models.list": _models_list, "ps": _ps, "status": _status, "unload": _unload, "run": _run,
                   "pull": _pull, "rm": _rm, "tag": _tag}
CLIENT_COMMANDS.update(cli_service.COMMANDS)


async def _client_command(args: argparse.Namespace) -> int:
    local = LOCAL_COMMANDS.get(args.command_key)
    if local is not None and Path(args.model).is_file():
        # A model file on this host: answered here, without a daemon (nor aiohttp's import time).
        result, show = await local(args)
    else:
        from runnerd.client import DaemonClient
        from runnerd.config import default_socket

        async with DaemonClient(args.socket or default_socket()) as client:
            result, show = await CLIENT_COMMANDS[args.command_key](client, args)
    if args.json and result is not None:
        _print_json(result)
    elif show is not None:
        show()
    return 0


async def _install_backend(args: argparse.Namespace) -> int:
    """Install a backend in this process (no daemon needed): what `make` uses to prepare a host."""
    from tqdm import tqdm

    from backends.base import Progress
    from runnerd.config import load_settings
    from runnerd.engines import default_backends
    from runnerd.logs import setup_logging

    settings = load_settings(args.config)
    setup_logging(settings.log_level)
    backends = default_backends(settings)
    if args.backend not in backends:
        print(f"runnerd: unknown backend {args.backend!r}; known: {', '.join(backends)}", file=sys.stderr)
        return 2
    backend = backends[args.backend]
    with tqdm(total=100, unit="%", desc=f"{args.backend}", disable=args.quiet) as bar:
        def progress(p: Progress) -> None:
            bar.set_description(f"{args.backend}: {p.phase}")
            if p.percent is not None:
                bar.n = p.percent
                bar.refresh()

        await backend.install(progress)
    print(backend.status())
    if args.print_path and hasattr(backend, "binary"):
        print(backend.binary())
    return 0


# --- argument parsing --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runnerd", description="Run local LLM engines for this host.")
    parser.add_argument("--version", action="version", version=f"runnerd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def client(name: str, key: str, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help)
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
    client("ls", "models.list", "list models (same as `models ls`)")
    pull = client("pull", "pull", "pull a model into the store: hf://org/repo/file.gguf[@rev], a URL or a path")
    pull.add_argument("source")
    pull.add_argument("--name", help="name[:tag] to register it under (default: from the source)")
    pull.add_argument("--sha256", help="expected sha256 of the file")
    pull.add_argument("--mmproj", help="a multimodal projector GGUF to store with it (same kind of source)")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    rm = client("rm", "rm", "remove a model (its blobs go when no other name uses them)")
    rm.add_argument("model")
    rm.add_argument("--force", action="store_true", help="remove even while a runner uses it (stops the runner)")
    tag = client("tag", "tag", "give a model another name")
    tag.add_argument("source")
    tag.add_argument("target")

    run = client("run", "run", "chat with a model (interactive without a prompt)")
    run.add_argument("model")
    run.add_argument("prompt", nargs="*")
    run.add_argument("--max-tokens", type=int, help="stop each answer after this many tokens")
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
    est.add_argument("--mode", default="completion", choices=["completion", "embedding", "reranking"])
    insp = client("inspect", "inspect", "a model's header: architecture, parameters, quantization, ...")
    insp.add_argument("model")
    client("ps", "ps", "list running engines")
    client("status", "status", "show each backend's status")
    cli_service.add_parsers(sub, client)
    unload = client("unload", "unload", "stop running engines (all by default)")
    unload.add_argument("models", nargs="*")
    unload.add_argument("--backend")
    unload.add_argument("--all", action="store_true")

    install = sub.add_parser("install-backend", help="install a backend on this host (no daemon needed)")
    install.add_argument("backend", nargs="?", default="llama.cpp")
    install.add_argument("--config", type=Path)
    install.add_argument("--quiet", action="store_true")
    install.add_argument("--print-path", action="store_true", help="print the engine binary's path")
    return parser


def _is_config_error(exc: Exception) -> bool:
    """Whether `exc` is a runnerd.config.ConfigError. Only a command that imported runnerd.config can
    raise one, so looking the module up (rather than importing it) keeps the light commands light."""
    config = sys.modules.get("runnerd.config")
    return config is not None and isinstance(exc, config.ConfigError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
        if args.command == "install-backend":
            return asyncio.run(_install_backend(args))
        return asyncio.run(_client_command(args))
    except Exception as exc:
        if not isinstance(exc, ClientError) and not _is_config_error(exc):
            raise
        print(f"runnerd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
