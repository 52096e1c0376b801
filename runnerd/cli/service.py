"""Client commands for running runnerd as a service: `backends ls|install|rm` and `node`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
    rows = [[b["name"], b["status"], _size(b["disk_usage"]), ",".join(b["capabilities"])] for b in backends]
    return backends, lambda: table(rows, ["BACKEND", "STATUS", "DISK", "CAPABILITIES"])


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


async def _backends_install(client: DaemonClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"backend": args.backend}
    if args.version is not None:
        body["version"] = args.version
    job = await client.request("POST", "/engines/install-backend", body)
    try:
        final = await follow_job(client, job, show_progress=not args.json and not args.quiet)
    except asyncio.CancelledError:  # Ctrl-C
        # The install belongs to the daemon (and perhaps to other callers): it goes on.
        print(f"\nrunnerd: stopped watching; the install goes on as job {job['id']} "
              f"(GET {job['status_url']}; DELETE it to cancel)", file=sys.stderr)
        raise
    if final["state"] != "succeeded":
        raise ClientError(f"installing {args.backend} {final['state']}: {final.get('error') or ''}".rstrip(": "))
    return final, lambda: print(final["message"])


async def _backends_rm(client: DaemonClient, args: argparse.Namespace) -> Any:
    result = await client.request("POST", "/engines/uninstall-backend", {"backend": args.backend})
    return result, lambda: print(f"{result['backend']}: {result['status']}")


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
    if node["runners"]:
        print()
        table([[r["model"], r["backend"], r["mode"], r["state"], _size(r["rss_bytes"])] for r in node["runners"]],
               ["MODEL", "BACKEND", "MODE", "STATE", "RSS"])


async def _node(client: DaemonClient, args: argparse.Namespace) -> Any:
    node = await client.request("GET", "/node")
    return node, lambda: _print_node(node)


COMMANDS: dict[str, Callable[[DaemonClient, argparse.Namespace], Any]] = {
    "backends.ls": _backends_ls, "backends.install": _backends_install, "backends.rm": _backends_rm,
    "node": _node}


def add_parsers(sub: Any, client: Callable[..., argparse.ArgumentParser]) -> None:
    """`client(name, key, help, parent)` makes a subcommand with --socket and --json."""
    backends = sub.add_parser("backends", help="list, install and remove engine backends (through the daemon)")
    bsub = backends.add_subparsers(dest="backends_command", required=True)
    client("ls", "backends.ls", "list backends with status, disk usage and capabilities", bsub)
    install = client("install", "backends.install", "install a backend, with a progress bar (Ctrl-C stops "
                     "watching; the install goes on)", bsub)
    install.add_argument("backend")
    install.add_argument("--version", help="the version to install (the backend's pinned one by default)")
    install.add_argument("--quiet", action="store_true", help="no progress bar")
    rm = client("rm", "backends.rm", "remove an installed backend (refused while runners use it)", bsub)
    rm.add_argument("backend")
    client("node", "node", "show this host's inventory: CPU, memory, GPUs, runners")
