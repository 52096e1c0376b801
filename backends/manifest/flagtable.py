"""A manifest's flag policy as a FlagTable: its allowlist, with every option the daemon or the template
sets refused as the daemon's."""

from __future__ import annotations

import re
from collections.abc import Collection

from backends.flags import FLAG_NAME, FlagSpec, FlagTable, ValueKind, owned
from backends.manifest.daemon_options import DAEMON_OPTIONS, daemon_option
from backends.manifest.errors import ManifestError
from backends.manifest.model import EngineManifest

_KINDS = {"switch": ValueKind.SWITCH, "integer": ValueKind.INT, "number": ValueKind.FLOAT,
          "choice": ValueKind.ENUM, "text": ValueKind.STRING}


def flag_table(manifest: EngineManifest, template_options: Collection[str]) -> FlagTable | None:
    """None when callers may pass no flags; ManifestError naming the rule that cannot stand."""
    policy = manifest.flags
    if policy.policy == "none":
        if policy.allow:
            raise ManifestError("flags.allow", "policy is none: list flags only with policy allowlist")
        return None
    # Only what could be a flag spelling: `--` (end of options) in a template is no option to refuse.
    reserved = {n for n in (*DAEMON_OPTIONS, *template_options) if FLAG_NAME.fullmatch(n)}
    specs: list[FlagSpec] = []
    for i, rule in enumerate(policy.allow):
        for spelling in (rule.name, *rule.aliases, *([rule.negation] if rule.negation else [])):
            if spelling in reserved or daemon_option(spelling) is not None:
                raise ManifestError(f"flags.allow[{i}].name", f"{spelling} is set by runnerd or by the template: "
                                    "callers may not change it")
        if rule.pattern is not None:
            try:
                re.compile(rule.pattern)
            except re.error as exc:
                raise ManifestError(f"flags.allow[{i}].pattern", f"not a regular expression: {exc}") from None
        try:
            specs.append(FlagSpec(name=rule.name, aliases=tuple(rule.aliases), negation=rule.negation,
                                  kind=_KINDS[rule.type], choices=tuple(rule.choices), minimum=rule.min,
                                  maximum=rule.max, pattern=rule.pattern))
        except ValueError as exc:
            raise ManifestError(f"flags.allow[{i}]", str(exc)) from None
    refusals = [owned(*sorted(reserved), why="the daemon or the engine's manifest sets it")]
    try:
        return FlagTable(backend=manifest.name, value_style=policy.value_style, flags=tuple(specs),
                         refusals=tuple(refusals))
    except ValueError as exc:
        raise ManifestError("flags.allow", str(exc).removeprefix(f"{manifest.name}: ")) from None
