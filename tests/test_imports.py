"""The import graph of ``sheri_trio/``, read with :mod:`ast` (nothing is imported).

Every import statement counts: at a module's top, inside functions, under
``TYPE_CHECKING``; relative imports are resolved. ``from p import x`` is an import of the
module ``p.x`` when there is one, else of the name ``x`` from ``p``. Importing ``p.x``
does run ``p/__init__.py`` first; that implied edge is left out, or every submodule would
make a cycle with the package that re-exports it.

The rules:

- **No cycle** between modules of ``sheri_trio``.
- **Privacy.** A private module (``_x``) belongs to the package that holds it:
  ``sheri_trio.swarm._agent`` may be imported from ``sheri_trio.swarm`` and below, not
  from ``sheri_trio.cli`` (``sheri_trio._x`` belongs to all of ``sheri_trio``). A private
  *name* (``_f``) is not imported from another module at all, not even from a sibling.
- **Once** (in every module): nothing imported at a module's top is
  imported again inside one of its functions.

Today's known violations are listed below, each as its exact edge. The lists may only
shrink: a new violation fails, and so does an entry whose edge is gone (delete it).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import sheri_trio

ROOT = Path(sheri_trio.__file__).resolve().parent
PACKAGE = "sheri_trio"

#: Imports that close a cycle: (importer, imported module). Outside executors/ only.
KNOWN_CYCLES: frozenset[tuple[str, str]] = frozenset()

#: Imports of another package's private module, or of a private name:
#: (importer, "module" or "module.name"). Outside executors/ only.
KNOWN_PRIVATE: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True, slots=True)
class Import:
    importer: str
    module: str  # the module imported, or that the name is imported from
    name: str | None  # the name imported from ``module``; None: the module itself
    line: int
    scope: str = "top"  # "top": at the module's top; "function": inside one; else "block"

    @property
    def named(self) -> str:
        return self.module if self.name is None else f"{self.module}.{self.name}"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((PACKAGE, *parts))] = path
    return found


MODULES = _modules()


def _imports_of(module: str, path: Path) -> list[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    scopes = {id(node): "top" for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            scopes.update((id(inner), "function") for inner in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        scope = scopes.get(id(node), "block")
        if isinstance(node, ast.Import):
            found += [
                Import(module, a.name, None, node.lineno, scope)
                for a in node.names
                if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                assert node.level - 1 < len(parts), f"{path}:{node.lineno}: beyond {PACKAGE}"
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                if node.module:
                    base += "." + node.module
            else:
                base = node.module or ""
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    found.append(Import(module, sub, None, node.lineno, scope))
                else:
                    found.append(Import(module, base, alias.name, node.lineno, scope))
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports_of(module, path)]
GRAPH: dict[str, set[str]] = {m: set() for m in MODULES}
for _imp in IMPORTS:
    GRAPH[_imp.importer].add(_imp.module)


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _where(importer: str, target: str) -> str:
    lines = sorted(
        {i.line for i in IMPORTS if i.importer == importer and target in (i.module, i.named)}
    )
    return f"{MODULES[importer].relative_to(ROOT.parent)}:{','.join(map(str, lines))}"


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A path start -> ... -> goal, or None."""
    seen = {start}
    stack = [[start]]
    while stack:
        path = stack.pop()
        for nxt in sorted(graph[path[-1]]):
            if nxt == goal:
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append([*path, nxt])
    return None


def privacy_violations() -> set[tuple[str, str]]:
    """(importer, private module of another package) and (importer, "module._name")."""
    bad = set()
    for imp in IMPORTS:
        parts = imp.module.split(".")
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])
            if _private(part) and not (
                imp.importer == owner or imp.importer.startswith(owner + ".")
            ):
                bad.add((imp.importer, imp.module))
        if imp.name is not None and _private(imp.name):
            bad.add((imp.importer, imp.named))
    return bad


def test_every_import_of_the_package_resolves() -> None:
    missing = [
        f"{_where(i.importer, i.module)}: {i.module}" for i in IMPORTS if i.module not in MODULES
    ]
    assert not missing
    assert len(MODULES) > 20  # the walk found the package
    assert any(i.importer == f"{PACKAGE}.executors" for i in IMPORTS)


def test_no_import_cycle() -> None:
    graph = {m: {t for t in targets if (m, t) not in KNOWN_CYCLES} for m, targets in GRAPH.items()}
    cycles = []
    for module in sorted(graph):
        path = _reaches(graph, module, module)
        if path is not None:
            cycles.append(" -> ".join(path))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_known_cycles_still_close_a_cycle() -> None:
    """An entry whose import is gone, or no longer closes a cycle, is deleted."""
    stale = [
        f"{a} -> {b}"
        for a, b in sorted(KNOWN_CYCLES)
        if b not in GRAPH.get(a, set()) or _reaches(GRAPH, b, a) is None
    ]
    assert not stale, "remove from KNOWN_CYCLES:\n" + "\n".join(stale)


def test_no_new_private_import() -> None:
    new = sorted(privacy_violations() - KNOWN_PRIVATE)
    assert not new, "private imports:\n" + "\n".join(f"{_where(*e)}: {e[1]}" for e in new)


def test_known_private_imports_still_exist() -> None:
    stale = sorted(KNOWN_PRIVATE - privacy_violations())
    assert not stale, "remove from KNOWN_PRIVATE:\n" + "\n".join(f"{a}: {b}" for a, b in stale)


def test_executors_have_no_known_violations() -> None:
    mine = [
        e
        for e in KNOWN_CYCLES | KNOWN_PRIVATE
        if e[0] == f"{PACKAGE}.executors" or e[0].startswith(f"{PACKAGE}.executors.")
    ]
    assert mine == []


def test_no_module_imported_at_the_top_is_imported_again_in_a_function() -> None:
    again = [
        f"{_where(i.importer, i.module)}: {i.named}"
        for i in IMPORTS
        if i.scope == "function"
        and any(
            t.importer == i.importer and t.module == i.module and t.scope == "top" for t in IMPORTS
        )
    ]
    assert not again, "imported again inside a function:\n" + "\n".join(again)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ._base import TaskContext", ("sheri_trio.executors._base", "TaskContext")),
        ("from . import _base", ("sheri_trio.executors._base", None)),
        ("from .. import config", ("sheri_trio.config", None)),
        ("from ..mqtt import _session", ("sheri_trio.mqtt._session", None)),
        ("from ..mqtt._session import _f", ("sheri_trio.mqtt._session", "_f")),
        ("import sheri_trio.swarm._agent", ("sheri_trio.swarm._agent", None)),
        ("from sheri_trio import mqtt", ("sheri_trio.mqtt", None)),
        ("from . import Executor", ("sheri_trio.executors", "Executor")),
        ("def f():\n    from ._base import X", ("sheri_trio.executors._base", "X", "function")),
        (
            "if TYPE_CHECKING:\n    from ._base import X",
            ("sheri_trio.executors._base", "X", "block"),
        ),
    ],
)
def test_imports_are_resolved(tmp_path: Path, source: str, expected: tuple[str, ...]) -> None:
    path = tmp_path / "_probe.py"
    path.write_text(source + "\n")
    (imp,) = _imports_of("sheri_trio.executors._probe", path)
    assert (imp.module, imp.name, imp.scope)[: len(expected)] == expected
