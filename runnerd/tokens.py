"""Named bearer tokens for the TCP listener: the tokens file, its hashes, and reloading it.

The file (TOML) holds one `[[tokens]]` table per token: a name, a role, the token's SHA-256 and what it may
use. Only hashes are on disk. A plain, unsalted SHA-256 is enough because the tokens are not passwords:
`runnerd tokens add` draws 32 random bytes, so no dictionary or brute force can reach one from its hash,
and a slow password hash would only cost every request CPU time without adding anything. A presented
token is hashed and compared with every stored hash in constant time (`hmac.compare_digest`, no early
exit), so the time taken says nothing about which token, if any, was close.

A file that cannot be used (bad TOML, an unknown role, a duplicate name, a malformed pattern, what looks
like a token instead of a hash) is refused as a whole with a message naming the file and the entry; at
start the daemon refuses to listen, on a reload the tokens in force stay in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger("runnerd.tokens")

Role = Literal["admin", "operator", "user"]
ROLES: tuple[Role, ...] = ("user", "operator", "admin")  # each role may do what the ones before it may
LEGACY_NAME = "http-token"
MAX_TOKENS_FILE_BYTES = 1024 * 1024
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_PATTERN_CHARS = re.compile(r"^[A-Za-z0-9._\-/:*?\[\]!]+$")


class TokenError(Exception):
    """A token or tokens file cannot be used; the message names the file and the problem."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def hash_text(token: str) -> str:
    """What the tokens file stores for `token`."""
    return "sha256:" + digest(token).hex()


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe text, prefixed so that it is recognisable in a leak scan."""
    return "rd_" + secrets.token_urlsafe(32)


def _check_pattern(pattern: str) -> str:
    if not pattern or len(pattern) > 256:
        raise ValueError("a model pattern is 1 to 256 characters")
    if not _PATTERN_CHARS.match(pattern):
        raise ValueError(f"model pattern {pattern!r} has characters no model name has; use letters, digits, "
                         "'.', '_', '-', '/', ':' and the wildcards '*', '?', '[...]'")
    depth = 0
    for c in pattern:
        if c == "[":
            if depth:
                raise ValueError(f"model pattern {pattern!r} opens '[' inside '[...]'")
            depth = 1
        elif c == "]":
            if not depth:
                raise ValueError(f"model pattern {pattern!r} closes ']' that was never opened")
            depth = 0
    if depth:
        raise ValueError(f"model pattern {pattern!r} leaves '[' unclosed")
    return pattern


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="shown in the audit log; letters, digits, '.', '_', '-'")
    role: Role
    hash: str = Field(description="sha256:<64 hex digits> of the token, as `runnerd tokens add` writes it")
    models: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns of the models it may use")
    max_concurrent: int | None = Field(default=None, ge=1, description="requests in flight at once; unset = any")
    requests_per_minute: int | None = Field(default=None, ge=1, description="requests per 60 s; unset = any")

    @field_validator("hash", mode="plain")
    @classmethod
    def _a_hash(cls, value: object) -> str:
        # The message never repeats the value: it may be a token pasted by mistake.
        if not isinstance(value, str) or not _HASH.match(value):
            raise ValueError("is not 'sha256:' and 64 lowercase hex digits; the file holds the token's hash "
                             "(`runnerd tokens add` writes it), never the token itself")
        return value

    @field_validator("models")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        return [_check_pattern(p) for p in value]


class TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[TokenEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class Grant:
    """One token's rights, as the daemon holds them in memory."""

    name: str
    role: Role
    digest: bytes
    models: tuple[str, ...] = ("*",)
    max_concurrent: int | None = None
    requests_per_minute: int | None = None

    def may(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def allows_model(self, names: Sequence[str]) -> bool:
        """Whether any of `names` (the spellings of one model) matches a pattern. Pure string work: it
        takes as long for a model that exists as for one that does not."""
        return any(fnmatchcase(n, p) for n in names for p in self.models)


def legacy_grant(token: str) -> Grant:
    """The single token of `[http] token_file`: every right, every model, no limits."""
    return Grant(name=LEGACY_NAME, role="admin", digest=digest(token))


def load_token(path: Path) -> str:
    """The single token in `path` (`[http] token_file`), surrounding whitespace stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenError(f"cannot read the HTTP token file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TokenError(f"the HTTP token file {path} is not UTF-8 text") from exc
    token = text.strip()
    if not token:
        raise TokenError(f"the HTTP token file {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise TokenError(f"the token in {path} contains spaces or control characters; a bearer token is one word")
    return token


def read_tokens_file(path: Path) -> TokensFile:
    """The tokens file, validated; TokenError naming the file and the entry otherwise. Blocking."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKENS_FILE_BYTES + 1)
    except OSError as exc:
        raise TokenError(f"cannot read the tokens file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_TOKENS_FILE_BYTES:
        raise TokenError(f"the tokens file {path} is over {MAX_TOKENS_FILE_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TokenError(f"the tokens file {path} is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TokenError(f"the tokens file {path} is not valid TOML: {exc}") from exc
    try:
        parsed = TokensFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        entry = _entry_name(data, err["loc"])
        raise TokenError(f"the tokens file {path}: {where}{entry}: {err['msg']}") from None
    seen: dict[str, int] = {}
    hashes: set[str] = set()
    for i, token in enumerate(parsed.tokens):
        if token.name in seen or token.name == LEGACY_NAME:
            why = (f"is also tokens.{seen[token.name]}'s" if token.name in seen
                   else "is the name of [http] token_file's token")
            raise TokenError(f"the tokens file {path}: tokens.{i}.name {token.name!r} {why}; names must be unique")
        seen[token.name] = i
        if token.hash in hashes:
            raise TokenError(f"the tokens file {path}: tokens.{i} ({token.name}) has the same hash as another "
                             "entry; one token has one name")
        hashes.add(token.hash)
    return parsed


def _entry_name(data: object, loc: tuple[int | str, ...]) -> str:
    if len(loc) >= 2 and loc[0] == "tokens" and isinstance(loc[1], int) and isinstance(data, dict):
        tokens = data.get("tokens")
        if isinstance(tokens, list) and loc[1] < len(tokens) and isinstance(tokens[loc[1]], dict):
            name = tokens[loc[1]].get("name")
            if isinstance(name, str) and len(name) <= 64:
                return f" ({name!r})"
    return ""


def grants_from(parsed: TokensFile) -> list[Grant]:
    return [Grant(name=e.name, role=e.role, digest=bytes.fromhex(e.hash.removeprefix("sha256:")),
                  models=tuple(e.models), max_concurrent=e.max_concurrent,
                  requests_per_minute=e.requests_per_minute) for e in parsed.tokens]


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


class Keyring:
    """The tokens in force: the legacy single token (if set) and the tokens file's (if set)."""

    def __init__(self, legacy: str | None = None, tokens_file: Path | None = None) -> None:
        self.tokens_file = tokens_file
        self._legacy = [legacy_grant(legacy)] if legacy is not None else []
        self._from_file: list[Grant] = []
        self._signature: tuple[int, int, int, int] | None = None
        self.on_reload: list[Callable[[str | None], None]] = []
        if tokens_file is not None:
            self._from_file = grants_from(read_tokens_file(tokens_file))
            self._signature = _signature(tokens_file)

    @property
    def grants(self) -> list[Grant]:
        return self._legacy + self._from_file

    def match(self, presented: str) -> Grant | None:
        """The grant whose hash is the presented token's. Every stored hash is compared, found or not."""
        candidate = digest(presented)
        found: Grant | None = None
        for grant in self.grants:
            if hmac.compare_digest(candidate, grant.digest):
                found = grant
        return found

    def reload(self) -> str | None:
        """Read the tokens file again (blocking). None when the new tokens are in force, else why not: the
        previous ones then stay."""
        if self.tokens_file is None:
            return None
        signature = _signature(self.tokens_file)
        try:
            grants = grants_from(read_tokens_file(self.tokens_file))
        except TokenError as exc:
            self._signature = signature  # reported once, not at every poll, until the file changes again
            log.error("tokens not reloaded, the previous ones stay in force: %s", exc)
            self._notify(str(exc))
            return str(exc)
        self._from_file = grants
        self._signature = signature
        log.info("tokens reloaded from %s: %d token(s)", self.tokens_file, len(grants))
        self._notify(None)
        return None

    def changed(self) -> bool:
        """Whether the tokens file is not the one last read (blocking: a stat)."""
        return self.tokens_file is not None and _signature(self.tokens_file) != self._signature

    def _notify(self, error: str | None) -> None:
        for callback in self.on_reload:
            callback(error)


def write_tokens_file(path: Path, parsed: TokensFile) -> None:
    """Replace the tokens file atomically, owner-only (hashes only, but nobody else needs to read it)."""
    lines: list[str] = []
    for e in parsed.tokens:
        lines += ["[[tokens]]", f"name = {_toml_str(e.name)}", f"role = {_toml_str(e.role)}",
                  f"hash = {_toml_str(e.hash)}",
                  "models = [" + ", ".join(_toml_str(p) for p in e.models) + "]"]
        if e.max_concurrent is not None:
            lines.append(f"max_concurrent = {e.max_concurrent}")
        if e.requests_per_minute is not None:
            lines.append(f"requests_per_minute = {e.requests_per_minute}")
        lines.append("")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _toml_str(value: str) -> str:
    # Names, roles, hashes and patterns are validated to printable ASCII without quotes or backslashes.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
