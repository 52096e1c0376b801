"""The client commands (models, pull, rm, tag, run, ps, status, unload, stop, configure, estimate, inspect,
show; `run` lives in chat.py), each `async (client, args) -> (result, show)`: `result` is what --json
prints, `show` prints it for a person. `estimate` and `inspect` of a file on this host are answered
here, without a daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runnerd.cli.output import ProgressView, age, duration, short_size, table
from runnerd.errors import ClientError
from runnerd.estimate_params import ESTIMATE_PARAMS

if TYPE_CHECKING:
    from runnerd.cli.client import DaemonClient


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
    return models, lambda: table([[m["name"], m["format"], str(m["architecture"]), f"{m['size']:,}", m["path"]]
                                  for m in models], ["NAME", "FORMAT", "ARCH", "SIZE", "PATH"])


async def _pull(client: DaemonClient, args: argparse.Namespace) -> Any:
    """POST /models/create and draw its NDJSON progress as a bar (bytes) on a terminal, else as one
    line per phase."""
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
    with ProgressView("pulling", enabled=not (args.json or args.quiet), line_prefix=f"pulling {args.source}: ",
                      unit="B", unit_scale=True, unit_divisor=1024) as view:
        async for line in client.stream_ndjson("/models/create", body, method="POST", error_lines=True):
            final = line
            total, completed = line.get("total"), line.get("completed")
            view.update(str(line.get("phase", "")), completed if isinstance(completed, int) else None,
                        total if isinstance(total, int) else None)
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

    body = {"name": args.target, **({"force": True} if args.force else {})}
    entry = await client.request("POST", f"/models/{quote(args.source)}/tag", body)
    return entry, lambda: print(f"tagged {entry['name']}")


def _idle(runner: dict[str, Any]) -> str:
    """How long since the runner last served a request; "-" while it serves one or is still loading."""
    if runner["active_requests"] or runner["state"] not in ("idle", "ready"):
        return "-"
    return age(runner["last_used"])


def _expires(runner: dict[str, Any]) -> str:
    """When keep-alive stops the runner: "never" (keep_alive -1), "now" (0: after each request),
    else the time left on the running timer; "-" while no timer runs (in use, loading, stopping)."""
    if runner["keep_alive"] is None:
        return "never"
    if runner["expires_at"] is not None:
        return duration(runner["expires_at"] - time.time())
    return "now" if runner["keep_alive"] == 0 and runner["state"] == "idle" else "-"


def _est_measured(estimated: int | None, measured: int) -> str:
    # A measurement of 0 means "not measured yet" (no process, or the first sample is still to come).
    return f"{short_size(estimated)}/{short_size(measured or None)}"


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
               age(r["started_at"]), _idle(r), _expires(r),
               _est_measured(r["memory"]["ram_bytes"] if known else None, r["measured_ram_bytes"])]
        if with_vram:
            row.append(_est_measured(r["memory"]["vram_bytes"] if known else None, r["measured_vram_bytes"]))
        rows.append(row)
    return header, rows


async def _ps(client: DaemonClient, args: argparse.Namespace) -> Any:
    runners = await client.request("GET", "/engines/ps")
    header, rows = ps_table(runners)
    return runners, lambda: table(rows, header)


async def _status(client: DaemonClient, args: argparse.Namespace) -> Any:
    status = await client.request("GET", "/engines/status")
    return status, lambda: table([[k, v] for k, v in status.items()], ["BACKEND", "STATUS"])


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


async def _stop(client: DaemonClient, args: argparse.Namespace) -> Any:
    """Ollama's `stop MODEL`: `unload MODEL`, with its answer."""
    result = await client.request("POST", "/engines/unload", {"models": [args.model]})
    return result, lambda: print(f"unloaded {result['unloaded']} runner(s)")


async def _run(client: DaemonClient, args: argparse.Namespace) -> Any:
    from runnerd.cli.chat import run

    return await run(client, args)


async def _configure(client: DaemonClient, args: argparse.Namespace) -> Any:
    if args.show:
        query = f"?model={args.model}" if args.model else ""
        shown = await client.request("GET", f"/engines/_configure{query}")
        rows = _configuration_rows(shown["configurations"])

        def show_table() -> None:
            table(rows, ["MODEL", "MODE", "BACKEND", "CONFIGURATION"])
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
        body["options"] = {"reasoning_budget": args.reasoning_budget}
    path = f"/engines/{args.backend}/_configure" if args.backend else "/engines/_configure"
    stored = await client.request("POST", path, body)
    note = " (its idle engine was restarted)" if stored.get("restarted") else ""
    return stored, lambda: print(f"configured {stored['model']} ({stored['mode']}){note}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _show_estimate(result: dict[str, Any]) -> None:
    rows = [[d["device"], *(_mib(d["breakdown"][k]) for k in ("weights", "kv_cache", "compute", "overhead")),
             _mib(d["bytes"])] for d in result["devices"]]
    table(rows, ["DEVICE", "WEIGHTS", "KV CACHE", "COMPUTE", "OVERHEAD", "TOTAL"])
    print(f"\n{result['model']} ({result['mode']}, context {result['context_size'] or 'default'}): "
          f"RAM {_mib(result['ram_bytes'])}, VRAM {_mib(result['vram_bytes'])}")
    for note in result["notes"]:
        print(f"note: {note}")


def _estimate_locally(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A .gguf file on this host: estimated here, no daemon needed."""
    from backends.base import BackendConfiguration, Mode, ModelFormat, ModelRef
    from backends.flags import FlagError
    from runnerd.config import load_settings
    from runnerd.engines import backend_for_format, default_backends

    backend = backend_for_format(default_backends(load_settings()), ModelFormat.GGUF)
    if backend is None:
        raise ClientError("no installed engine serves GGUF files")
    given = {p: str(getattr(args, p)) for p in ESTIMATE_PARAMS if getattr(args, p, None) is not None}
    try:
        config = BackendConfiguration(context_size=args.ctx, runtime_flags=backend.estimate_flags(given))
    except FlagError as exc:
        raise ClientError(str(exc)) from exc
    mode = Mode(args.mode)
    result = backend.required_memory(ModelRef(name=path.name, path=path.resolve()), mode, config)
    return {"model": str(path), "mode": mode.value, "context_size": config.context_size,
            "runtime_flags": config.runtime_flags, **result.model_dump(mode="json")}


async def _estimate(client: DaemonClient, args: argparse.Namespace) -> Any:
    from urllib.parse import quote, urlencode

    query = {p: getattr(args, p) for p in ("ctx", "mode", *ESTIMATE_PARAMS) if getattr(args, p, None) is not None}
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


_TEMPLATE_SOURCES = {"model": "the model's own",
                     "engine": "none of its own, the engine's for its architecture (`run`: plain completion)",
                     None: "none (a base model: `run` answers it as plain completion)"}


def _configuration_rows(configurations: list[dict[str, Any]]) -> list[list[str]]:
    return [[c["model"], c["mode"], c["backend"], json.dumps(c["config"], separators=(",", ":"))]
            for c in configurations]


async def _show(client: DaemonClient, args: argparse.Namespace) -> Any:
    """Ollama's `show`: what `inspect` prints, then the model's stored engine configuration."""
    from urllib.parse import quote, urlencode

    shown = await client.request("GET", f"/models/{quote(args.model)}")
    stored = await client.request("GET", f"/engines/_configure?{urlencode({'model': shown['name']})}")
    result = {"name": shown["name"], "summary": shown.get("summary"), "chat_template": shown.get("chat_template"),
              "configurations": stored["configurations"]}

    def show() -> None:
        _show_summary(shown["name"], shown.get("summary"))
        if "chat_template" in shown:
            print(f"  {'chat template':<16} {_TEMPLATE_SOURCES.get(shown['chat_template'], shown['chat_template'])}")
        print()
        if stored["configurations"]:
            table(_configuration_rows(stored["configurations"]), ["MODEL", "MODE", "BACKEND", "CONFIGURATION"])
        else:
            print("no stored configuration (the defaults apply; `runnerd configure` sets one)")

    return result, show


async def _inspect_file(args: argparse.Namespace) -> Any:
    from backends.formats.gguf import GGUFParseError, read_header
    from backends.formats.gguf_summary import summarize

    try:
        summary = summarize(await asyncio.to_thread(read_header, Path(args.model))).model_dump(mode="json")
    except GGUFParseError as exc:
        raise ClientError(str(exc)) from exc
    return summary, lambda: _show_summary(args.model, summary)


LOCAL_COMMANDS = {"estimate": _estimate_file, "inspect": _inspect_file}
COMMANDS = {"configure": _configure, "estimate": _estimate, "inspect": _inspect, "models.add": _models_add,
            "models.list": _models_list, "ps": _ps, "status": _status, "unload": _unload, "run": _run,
            "pull": _pull, "rm": _rm, "tag": _tag, "show": _show, "stop": _stop}
