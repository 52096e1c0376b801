"""The one error a manifest that cannot be accepted raises: it names the field and, when the source
text is known, the line."""

from __future__ import annotations


class ManifestError(ValueError):
    """`field` is a dotted path into the manifest (`versions.b1.command[0]`); `line` is 1-based."""

    def __init__(self, field: str, reason: str, *, line: int | None = None) -> None:
        self.field = field
        self.reason = reason
        self.line = line
        where = f"{field} (line {line})" if line is not None else field
        super().__init__(f"{where}: {reason}" if field else reason)

    def at_line(self, line: int | None) -> ManifestError:
        return self if line is None or self.line is not None else ManifestError(self.field, self.reason, line=line)
