"""`runnerd tokens add|rm|ls`: edit the tokens file on this host, no daemon needed.

`add` draws a new token, stores only its hash and prints the token once: it cannot be shown again. The
file is replaced atomically (owner-only), and a running daemon picks the change up by itself (it polls
the file; SIGHUP makes it read at once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runnerd.cli.output import print_json
from runnerd.errors import ClientError


def _tokens_path(args: argparse.Namespace) -> Path:
    if args.file is not None:
        return Path(args.file)
    from runnerd.config import load_settings

    path = load_settings(args.config).http.tokens_file
    if path is None:
        raise ClientError("no tokens file: pass --file PATH or set tokens_file in the [http] table of the config")
    return path


def _read(path: Path) -> object:
    from runnerd.tokens import TokenError, TokensFile, read_tokens_file

    if not path.exists():
        return TokensFile()
    try:
        return read_tokens_file(path)
    except TokenError as exc:
        raise ClientError(str(exc)) from exc


def tokens_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from runnerd.tokens import TokenEntry, TokensFile, hash_text, new_token, write_tokens_file

    path = _tokens_path(args)
    current = _read(path)
    assert isinstance(current, TokensFile)
    if args.tokens_command == "ls":
        rows = [e.model_dump(exclude={"hash"}) for e in current.tokens]
        if args.json:
            print_json(rows)
        else:
            for r in rows:
                limits = ", ".join(f"{k}={r[k]}" for k in ("max_concurrent", "requests_per_minute") if r[k])
                print(f"{r['name']}\t{r['role']}\t{' '.join(r['models'])}\t{limits or '-'}")
        return 0
    if args.tokens_command == "rm":
        kept = [e for e in current.tokens if e.name != args.name]
        if len(kept) == len(current.tokens):
            raise ClientError(f"no token named {args.name!r} in {path}")
        write_tokens_file(path, TokensFile(tokens=kept))
        print(f"removed {args.name}", file=sys.stderr)
        return 0
    if any(e.name == args.name for e in current.tokens):
        raise ClientError(f"a token named {args.name!r} is already in {path}; remove it first")
    token = new_token()
    try:
        entry = TokenEntry(name=args.name, role=args.role, hash=hash_text(token), models=args.models or ["*"],
                           max_concurrent=args.max_concurrent, requests_per_minute=args.requests_per_minute)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ClientError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    write_tokens_file(path, TokensFile(tokens=[*current.tokens, entry]))
    print(f"added {args.name} ({args.role}) to {path}; the token, shown only now:", file=sys.stderr)
    print(token)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tokens = sub.add_parser("tokens", help="manage the TCP listener's tokens file (no daemon needed)")
    tsub = tokens.add_subparsers(dest="tokens_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = tsub.add_parser(name, help=help)
        p.add_argument("--file", type=Path, help="the tokens file (default: [http] tokens_file of the config)")
        p.add_argument("--config", type=Path, help="TOML config file (env RUNNERD_CONFIG)")
        return p

    add = command("add", "add a token; prints the new token once")
    add.add_argument("name")
    add.add_argument("--role", choices=["user", "operator", "admin"], default="user")
    add.add_argument("--models", nargs="+", metavar="PATTERN", help="glob patterns of usable models (default *)")
    add.add_argument("--max-concurrent", type=int, help="requests in flight at once")
    add.add_argument("--requests-per-minute", type=int, help="requests per 60 s")
    rm = command("rm", "remove a token")
    rm.add_argument("name")
    ls = command("ls", "list the tokens (names, roles, patterns, limits; never hashes)")
    ls.add_argument("--json", action="store_true", help="print JSON")
