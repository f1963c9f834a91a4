"""The package's layout rules, checked on the source's own import statements (AST).

* The core never imports the lab (``uffdd.lab``: demo, bench, chaos, harness, pyvmm,
  faultproxy, testcerts), except the CLI's lab subcommands, lazily inside functions.
* No import cycles among the core modules: every import counts, at module level, inside
  ``if TYPE_CHECKING`` or inside a function, since each one is a dependency in the reader's
  head even when Python would tolerate the circle at run time.
* The import side of the data path (faultloop, engine, cengine, fastimport, pagestate) and
  the export side (exporter) do not import each other: what both need lives below them
  (peer, protocol, threads, metrics).
* A document a module cites is in the repository (docs/architecture.md, not a file of
  the development machine).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "uffdd"
LAB = "uffdd.lab"
#: The one core module allowed to import the lab, and only inside functions.
LAB_DOOR = "uffdd.cli"
#: Each side: these modules and packages, with every module inside a package.
IMPORT_ROOTS = ("uffdd.importer",)
EXPORT_ROOTS = ("uffdd.exporter",)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _side(roots: tuple[str, ...]) -> frozenset[str]:
    return frozenset(m for m in MODULES for r in roots if m == r or m.startswith(r + "."))


IMPORT_SIDE = _side(IMPORT_ROOTS)
EXPORT_SIDE = _side(EXPORT_ROOTS)


def _owner(name: str) -> str | None:
    """The uffdd module an imported dotted name lives in, or None (not ours)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    """The uffdd modules one import statement loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        # ``from uffdd import lab`` loads the submodule uffdd.lab, not just uffdd.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    return [owner for n in names if (owner := _owner(n)) is not None and owner != module]


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported uffdd module, whether the statement is inside a function) of one module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.extend((t, in_function) for t in _targets(child, module, path))
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            walk(child, inner)

    walk(tree, False)
    return found


def _core() -> list[str]:
    return sorted(m for m in MODULES if m != LAB and not m.startswith(LAB + "."))


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in _imports(m)} for m in MODULES}


def test_the_import_reader_sees_known_edges() -> None:
    """Guard for the checks below: a reader that saw nothing would pass them all."""
    graph = _graph()
    assert "uffdd.api" in graph["uffdd.daemon"]
    assert "uffdd.registry" in graph["uffdd.api"]
    assert "uffdd.lab.harness" in graph["uffdd.lab.demo"]
    assert "uffdd.lab.demo" in graph[LAB_DOOR]
    assert len(_core()) >= 20


def test_core_never_imports_the_lab() -> None:
    offenders = []
    for module in _core():
        for target, in_function in _imports(module):
            if target != LAB and not target.startswith(LAB + "."):
                continue
            if module == LAB_DOOR and in_function:
                continue  # the demo/chaos/bench subcommands, loaded when they run
            offenders.append(f"{module} imports {target}"
                             + ("" if in_function else " at module level"))
    assert offenders == []


def test_loading_the_daemon_and_the_cli_loads_no_lab_module() -> None:
    """The rule as Python sees it: what ``uffdd serve`` imports up front holds no lab code."""
    probe = ("import sys, uffdd, uffdd.cli, uffdd.daemon, uffdd.client\n"
             "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['uffdd', 'lab']))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _cycles(graph: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    wanted = set(nodes)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v] & wanted):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(wanted):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted, sorted(planted)) == [["a", "b", "c"]]


def test_no_import_cycles_among_core_modules() -> None:
    assert _cycles(_graph(), _core()) == []


def test_import_side_and_export_side_do_not_import_each_other() -> None:
    graph = _graph()
    crossing = [f"{m} imports {t}" for m in sorted(IMPORT_SIDE) for t in sorted(graph[m])
                if t in EXPORT_SIDE]
    crossing += [f"{m} imports {t}" for m in sorted(EXPORT_SIDE) for t in sorted(graph[m])
                 if t in IMPORT_SIDE]
    assert crossing == []
    assert all(r in MODULES for r in IMPORT_ROOTS + EXPORT_ROOTS)  # renamed? update the roots
    assert len(EXPORT_SIDE) > 1  # the exporter package's modules are on its side too


def test_cited_documents_are_in_the_repository() -> None:
    """A module that points its reader at a document points at one that ships with it."""
    root = PACKAGE.parent
    missing = []
    for module, path in sorted(MODULES.items()):
        text = path.read_text()
        if "ARCHITECTURE.md" in text:
            missing.append(f"{module}: ARCHITECTURE.md is not in the repository")
        for cited in re.findall(r"\bdocs/[\w./-]+\.md\b", text):
            if not (root / cited).is_file():
                missing.append(f"{module}: {cited}")
    assert missing == []
    assert (root / "docs" / "architecture.md").is_file()
