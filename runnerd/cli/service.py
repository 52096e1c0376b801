"""Client commands for running runnerd as a service: `backends ls|install|rm`, `node`, `drain` and
`resume`."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.catalog.model import Variant
from runnerd import node_labels
from runnerd.cli.output import ProgressView, table
from runnerd.errors import ClientError

if TYPE_CHECKING:
    from runnerd.cli.client import DaemonClient

GiB = 1024**3
MiB = 1024**2


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


async def _backends_ls(client: DaemonClient, args: argparse.Namespace) -> Any:
    backends = await client.request("GET", "/engines/backends")
    rows = [[b["name"], b["status"], ",".join(b.get("versions") or []) or "-", _size(b["disk_usage"]),
             ",".join(b["capabilities"])] for b in backends]
    return backends, lambda: table(rows, ["BACKEND", "STATUS", "VERSIONS", "DISK", "CAPABILITIES"])


def split_version(spec: str, version: str | None = None) -> tuple[str, str | None]:
    """`ENGINE@0.3.30` -> ("ENGINE", "0.3.30"); a --version given as well must agree."""
    name, at, pinned = spec.partition("@")
    if not at:
        return spec, version
    if not name or not pinned:
        raise ClientError(f"{spec!r}: write ENGINE@VERSION, e.g. engine@0.3.30")
    if version is not None and version != pinned:
        raise ClientError(f"{spec!r} and --version {version} name two versions")
    return name, pinned


async def follow_job(client: DaemonClient, job: dict[str, Any], show_progress: bool) -> dict[str, Any]:
    """Watch a job to its end, with a progress bar on a terminal (else a line per phase); returns its
    final state."""
    final = job
    if job["state"] != "running":
        return job  # nothing to watch: it was already installed
    with ProgressView(job["target"], enabled=show_progress, percent=True,
                      bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}") as view:
        async for snapshot in client.stream_ndjson(job["status_url"]):
            final = snapshot
            view.update(f"{snapshot['target']} {snapshot['phase']}", snapshot["percent"])
    return final


async def _registered(client: DaemonClient) -> set[str]:
    known = await client.request("GET", "/engines/backends/known")
    return set(known["registered"])


async def _backends_catalog(client: DaemonClient, args: argparse.Namespace) -> Any:
    if args.refresh:
        feed = (await client.request("POST", "/engines/backends/catalog/refresh"))["catalog_url"]
        if feed["error"] is not None:
            raise ClientError(f"catalog_url {feed['url']} not taken: {feed['error']} (the catalog in force stays)")
    found = await client.request("GET", "/engines/backends/catalog")
    rows = [[i["engine"], i["version"] + (" (default)" if i["default"] else ""), i["variant"], i["kind"],
             "yes" if i["installed"] else "no"] for i in found["items"]]
    return found, lambda: table(rows, ["ENGINE", "VERSION", "VARIANT", "INSTALL", "INSTALLED"])


async def _watch(client: DaemonClient, args: argparse.Namespace, job: dict[str, Any], what: str,
                 doing: str = "installing") -> Any:
    try:
        final = await follow_job(client, job, show_progress=not args.json and not args.quiet)
    except asyncio.CancelledError:  # Ctrl-C
        # The job belongs to the daemon (and perhaps to other callers): it goes on.
        print(f"\nrunnerd: stopped watching; {doing} {what} goes on as job {job['id']} "
              f"(GET {job['status_url']}; DELETE it to cancel)", file=sys.stderr)
        raise
    if final["state"] != "succeeded":
        raise ClientError(f"{doing} {what} {final['state']}: {final.get('error') or ''}".rstrip(": "))
    return final, lambda: print(final["message"])


async def _backends_upgrade(client: DaemonClient, args: argparse.Namespace) -> Any:
    job = await client.request("POST", "/engines/backends/upgrade", {"engine": args.engine})
    return await _watch(client, args, job, args.engine)


async def _backends_install(client: DaemonClient, args: argparse.Namespace) -> Any:
    name, version = split_version(args.backend, args.version)
    body: dict[str, Any] = {"backend": name}
    if version is not None:
        body["version"] = version
    if args.variant is not None or name not in await _registered(client):
        # Not a registered engine (or a variant asked for): the catalog's recipe installs it.
        catalog_body = {"engine": name, "version": version, "variant": args.variant}
        job = await client.request("POST", "/engines/backends/catalog/install",
                                   {k: v for k, v in catalog_body.items() if v is not None})
        return await _watch(client, args, job, args.backend)
    job = await client.request("POST", "/engines/install-backend", body)
    return await _watch(client, args, job, args.backend)


async def _backends_rm(client: DaemonClient, args: argparse.Namespace) -> Any:
    from urllib.parse import quote

    from backends.manifest.model import NAME_SUFFIX

    if args.backend.endswith(NAME_SUFFIX):  # an engine defined by a manifest: delete its definition
        query = "?force=true" if args.force else ""
        deleted = await client.request("DELETE", f"/engines/backends/{quote(args.backend, safe='')}{query}")
        note = f" (stopped {deleted['unloaded']} runner(s))" if deleted.get("unloaded") else ""
        return deleted, lambda: print(f"deleted {deleted['deleted']}{note}")
    name, version = split_version(args.backend)
    if version is not None and name not in await _registered(client):
        job = await client.request("POST", "/engines/backends/catalog/uninstall",
                                   {"engine": name, "version": version, "force": bool(args.force)})
        return await _watch(client, args, job, args.backend, doing="removing")
    if version is None:
        result = await client.request("POST", "/engines/uninstall-backend", {"backend": name})
        return result, lambda: print(f"{result['backend']}: {result['status']}")
    result = await client.request("POST", "/engines/uninstall-backend",
                                  {"backend": name, "version": version, "force": bool(args.force)})
    note = f" (stopped {result['unloaded']} runner(s))" if result.get("unloaded") else ""
    left = ", ".join(result["versions"]) or "none"
    return result, lambda: print(f"removed {name} {version}{note}; installed: {left}")


async def _backends_add(client: DaemonClient, args: argparse.Namespace) -> Any:
    """Send a manifest file to the daemon, which checks it, stores it and registers the engine."""
    from backends.manifest import format_of

    path = Path(args.file)
    fmt = format_of(path.name)
    if fmt is None:
        raise ClientError(f"{path}: a manifest file ends in .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientError(f"cannot read {path}: {exc}") from exc
    view = await client.request("POST", "/engines/backends", {"manifest": text, "format": fmt})
    return view, lambda: print(f"defined {view['name']}: {view['status']}")


def _print_node(node: dict[str, Any]) -> None:
    cpu, memory, reserved = node["cpu"], node["memory"], node["reserved"]
    print(f"host      {node['hostname']} (runnerd {node['runnerd_version']})")
    print(f"cpu       {cpu['model']} ({cpu['logical_cores']} threads)")
    print(f"memory    {_size(memory['available_bytes'])} available of {_size(memory['total_bytes'])}")
    for gpu in node["gpus"] or [None]:
        if gpu is None:
            print("gpus      none")
            continue
        print(f"gpu {gpu['index']:<5} {gpu['name']}: {_size(gpu['memory_free_bytes'])} free of "
              f"{_size(gpu['memory_total_bytes'])} (driver {gpu['driver_version']}, CUDA {gpu['cuda_version']})")
    print(f"runners   {reserved['runners']} holding {_size(reserved['measured_rss_bytes'])} RSS, "
          f"{_size(reserved['measured_gpu_memory_bytes'])} GPU memory")
    for name, status in node["backends"].items():
        print(f"backend   {name}: {status}")
    if node.get("drain", {}).get("draining"):
        print(f"drain     {_drain_line(node['drain'])}")
    if node["runners"]:
        print()
        table([[r["model"], r["backend"], r["mode"], r["state"], _size(r["rss_bytes"])] for r in node["runners"]],
               ["MODEL", "BACKEND", "MODE", "STATE", "RSS"])


async def _node(client: DaemonClient, args: argparse.Namespace) -> Any:
    node = await client.request("GET", "/node")
    if getattr(args, "labels", False):
        # The labels the daemon writes to [node] labels_file, from the same two answers.
        labels = node_labels.from_api(node, await client.request("GET", "/engines/backends"))
        return labels, lambda: print(node_labels.render(labels), end="")
    return node, lambda: _print_node(node)


DRAIN_POLL_SECONDS = 0.5


def _drain_line(drain: dict[str, Any]) -> str:
    if not drain["draining"]:
        return f"not draining: {drain['runners_left']} runner(s) loaded"
    if drain["runners_left"] == 0:
        return "drained: no runner left"
    return f"draining: {drain['runners_left']} runner(s) left, {drain['active_requests']} request(s) in flight"


async def _drain(client: DaemonClient, args: argparse.Namespace) -> Any:
    """POST /node/drain; with --wait (or --timeout), poll GET /node until no runner is left, a line per
    change, and fail past the timeout (the node stays draining)."""
    drain = (await client.request("POST", "/node/drain"))["drain"]
    if not args.wait and args.timeout is None:
        return drain, lambda: print(_drain_line(drain))
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    shown = None
    while drain["runners_left"] > 0:
        if not drain["draining"]:
            raise ClientError("the drain was lifted (`runnerd resume`) before the node emptied")
        line = _drain_line(drain)
        if line != shown and not args.json:
            print(line, flush=True)
            shown = line
        if deadline is not None and time.monotonic() >= deadline:
            raise ClientError(f"the node still has {drain['runners_left']} runner(s) ({drain['active_requests']} "
                              f"request(s) in flight) after {args.timeout:g} s; it stays draining "
                              "(`runnerd resume` lifts it)")
        await asyncio.sleep(DRAIN_POLL_SECONDS if deadline is None else
                            max(0.0, min(DRAIN_POLL_SECONDS, deadline - time.monotonic())))
        drain = (await client.request("GET", "/node"))["drain"]
    return drain, lambda: print(_drain_line(drain))


async def _resume(client: DaemonClient, args: argparse.Namespace) -> Any:
    drain = (await client.request("POST", "/node/resume"))["drain"]
    return drain, lambda: print(f"resumed: loading models again ({drain['runners_left']} runner(s) loaded)")


COMMANDS: dict[str, Callable[[DaemonClient, argparse.Namespace], Any]] = {
    "backends.ls": _backends_ls, "backends.install": _backends_install, "backends.rm": _backends_rm,
    "backends.add": _backends_add, "backends.catalog": _backends_catalog, "backends.upgrade": _backends_upgrade,
    "node": _node, "drain": _drain, "resume": _resume}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"the timeout must be a positive number of seconds, not {text!r}")
    return value


def add_parsers(sub: Any, client: Callable[..., argparse.ArgumentParser]) -> None:
    """`client(name, key, help, parent)` makes a subcommand with --socket and --json."""
    backends = sub.add_parser("backends", help="list, install and remove engine backends (through the daemon)")
    bsub = backends.add_subparsers(dest="backends_command", required=True)
    client("ls", "backends.ls", "list backends with status, disk usage and capabilities", bsub, aliases=("list",))
    add = client("add", "backends.add", "define an engine from a manifest file (.yaml or .toml; README, "
                 "\"Adding an engine\")", bsub)
    add.add_argument("file")
    install = client("install", "backends.install", "install a backend, with a progress bar (Ctrl-C stops "
                     "watching; the install goes on)", bsub)
    install.add_argument("backend", help="an engine, or ENGINE@VERSION: for an engine that keeps versions side by "
                         "side, one more beside those installed")
    install.add_argument("--version", help="the version to install (the backend's pinned one by default)")
    install.add_argument("--variant", choices=[v.value for v in Variant],
                         help="install this hardware variant from the catalog (default: this host's best)")
    install.add_argument("--quiet", action="store_true", help="no progress bar")
    catalog = client("catalog", "backends.catalog", "what this host can install from the catalog (README, "
                     "\"The catalog\")", bsub)
    catalog.add_argument("--refresh", action="store_true", help="fetch catalog_url first (fails when that "
                         "fetch is not taken)")
    upgrade = client("upgrade", "backends.upgrade", "install the catalog's newer version of an engine beside the "
                     "installed ones", bsub)
    upgrade.add_argument("engine")
    upgrade.add_argument("--quiet", action="store_true", help="no progress bar")
    rm = client("rm", "backends.rm", "remove an installed backend, or delete an engine defined by a manifest "
                "(refused while runners or stored configurations use it)", bsub)
    rm.add_argument("backend", help="an engine, ENGINE@VERSION for one installed version, or a manifest engine")
    rm.add_argument("--force", action="store_true", help="delete a manifest engine or remove a version even while "
                    "in use (stops its runners)")
    rm.add_argument("--quiet", action="store_true", help="no progress bar (a catalog removal is a job)")
    node = client("node", "node", "show this host's inventory: CPU, memory, GPUs, runners")
    node.add_argument("--labels", action="store_true",
                      help="print the node's Kubernetes labels instead, as a Node Feature Discovery feature file")
    drain = client("drain", "drain", "stop taking new models: requests to loaded ones are served, each runner is "
                   "unloaded once idle (`resume` lifts it)")
    drain.add_argument("--wait", action="store_true", help="wait until no runner is left, printing progress")
    drain.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                       help="with --wait (implied): give up after SECONDS, exiting 1 (the node stays draining)")
    client("resume", "resume", "take new models again after `drain`")
