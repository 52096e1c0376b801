"""The shape of the code: imports go one way (runnerd -> backends), no module imports one that imports it
back, and the daemon names built-in engines only in its registry."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runnerd", "backends")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import that runs (at module level or in a function), skipping `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from runtime_imports(node)


def edges(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    targets: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name in known}
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in known:
                targets.add(sub)
            elif base in known:
                targets.add(base)
    return targets - {name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: edges(name, path, known) for name, path in known.items()}


def test_backends_never_import_the_daemon():
    offenders = {m: sorted(t for t in targets if t.startswith("runnerd"))
                 for m, targets in graph().items() if m.startswith("backends")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_no_module_imports_one_that_imports_it_back():
    deps = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in deps[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in deps:
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_daemon_names_built_in_engines_only_in_its_registry():
    engine = re.compile(r"llamacpp|llama\.cpp|llama-server|vllm", re.IGNORECASE)
    named = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "runnerd").rglob("*.py")
                   if engine.search(path.read_text()))
    assert named == ["runnerd/engines.py"]
