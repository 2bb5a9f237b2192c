"""The sans-IO core stays sans-IO: no event loop, sockets, clocks, randomness or shell imports.

Imports inside ``if TYPE_CHECKING:`` blocks are allowed (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxychain"

CORE = (
    "backoff",
    "breaker",
    "directives",
    "diskmeta",
    "entry",
    "errors",
    "failover",
    "freshness",
    "goproxy",
    "http",
    "keys",
    "lockfiles",
    "loops",
    "mirror",
    "npm",
    "policy",
    "privatepaths",
    "pypi",
    "ranges",
    "scalars",
    "storability",
    "validation",
)
FORBIDDEN = frozenset(
    {
        "trio",
        "h11",
        "hypercorn",
        "cachetools",
        "socket",
        "os",
        "time",
        "random",
        "asyncio",
        "threading",
        "subprocess",
        "ssl",
        "select",
        "selectors",
        "urllib.request",
        "shutil",
    }
)


def _runtime_imports(tree: ast.Module) -> list[tuple[str, int]]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.extend((f".{node.module or alias.name}", node.lineno) for alias in node.names)
            else:
                found.append((node.module or "", node.lineno))
    return found


@pytest.mark.parametrize("module", CORE)
def test_core_module_is_sans_io(module: str) -> None:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    bad = []
    for name, line in _runtime_imports(tree):
        if name.startswith("."):
            if name[1:].split(".")[0] not in CORE:
                bad.append(f"line {line}: imports shell module {name}")
        elif name in FORBIDDEN or name.split(".")[0] in FORBIDDEN - {"urllib"}:
            bad.append(f"line {line}: imports {name}")
    no_awaits = [
        n.lineno for n in ast.walk(tree) if isinstance(n, ast.Await | ast.AsyncFunctionDef)
    ]
    assert bad == []
    assert no_awaits == [], f"{module} awaits at lines {no_awaits}"
