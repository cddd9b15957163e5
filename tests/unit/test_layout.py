"""The dependency rules of the layout, checked on the source: one way down, no circles.

Imports run ``gateway`` -> ``tenancy`` -> ``accounts``: ``tenancy`` and ``accounts`` never import
``gateway``, ``accounts`` never imports ``tenancy``, and no two modules of the three packages
import each other, directly or around a longer circle. Every import statement counts, wherever
it stands: at module level, inside a function, under ``if TYPE_CHECKING:``. Relative imports are
resolved against the importing module; ``from package import module`` is an import of that
module, ``from module import name`` one of the module. (``import a.b`` also runs ``a/__init__``;
that is not counted as an import of ``a``.) Migrations are left out.

The walker is first checked on a small tree of its own (each kind of import and of violation),
then applied to the project.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "tenancy", "accounts")
# The top-level packages each package must not import.
FORBIDDEN: dict[str, frozenset[str]] = {
    "gateway": frozenset(),
    "tenancy": frozenset({"gateway"}),
    "accounts": frozenset({"gateway", "tenancy"}),
}


@dataclass
class Imports:
    """What one module imports: every absolute name (a module, or the module a name is taken
    from), and which of them are modules of the walked tree."""

    names: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``packages`` (migrations left out)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "migrations" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _from_source(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name a ``from ... import`` statement reads from."""
    if not node.level:
        return node.module or ""
    # Level 1 is the module's own package (a package's __init__ is its own package).
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(base):
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _ours(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest dotted prefix of ``name`` that is a module of the walked tree."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, Imports]:
    """The imports of every module under ``packages`` (see the module docstring for what counts)."""
    modules = module_files(root, packages)
    graph: dict[str, Imports] = {}
    for module, path in modules.items():
        imports = Imports()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):  # every statement, nested ones included
            if isinstance(node, ast.Import):
                for alias in node.names:
                    imports.names.add(alias.name)
                    imports.modules.add(_ours(alias.name, modules) or "")
            elif isinstance(node, ast.ImportFrom):
                source = _from_source(module, path.name == "__init__.py", node)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    imports.names.add(submodule if submodule in modules else source)
                    imports.modules.add(submodule if submodule in modules else _ours(source, modules) or "")
        imports.modules -= {"", module}
        graph[module] = imports
    return graph


def layer_violations(graph: Mapping[str, Imports], forbidden: Mapping[str, frozenset[str]]) -> list[str]:
    """``"a.b imports c.d"`` for each import of a package that ``a`` must not import."""
    found: list[str] = []
    for module, imports in sorted(graph.items()):
        banned = forbidden.get(module.split(".")[0], frozenset())
        found.extend(f"{module} imports {name}" for name in sorted(imports.names) if name.split(".")[0] in banned)
    return found


def import_cycles(graph: Mapping[str, Imports]) -> list[list[str]]:
    """One shortest circle through each group of modules that import each other (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(start: str) -> None:
        # Iterative Tarjan: (node, iterator over its successors).
        work = [(start, iter(sorted(graph[start].modules)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in graph:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ].modules))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component: set[str] = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(_shortest_cycle(graph, component) for component in components)


def _shortest_cycle(graph: Mapping[str, Imports], component: set[str]) -> list[str]:
    """The shortest circle from the component's first module back to it (breadth first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for succ in sorted(graph[node].modules & component):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no circle in the strongly connected component {sorted(component)}")


# --- the walker, on a tree of its own -------------------------------------------------------

SAMPLE = {
    # Upward imports: under TYPE_CHECKING, and inside a function.
    "accounts/__init__.py": "",
    "accounts/low.py": """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from tenancy.mid import Thing
    """,
    "accounts/lazy.py": """
        def later():
            import gateway.top
    """,
    # Migrations are not walked.
    "accounts/migrations/__init__.py": "",
    "accounts/migrations/0001_initial.py": "import gateway.top\n",
    # A circle made of a relative ``from package import module`` and a relative import in a function.
    "tenancy/__init__.py": "",
    "tenancy/mid.py": "from . import peer\n",
    "tenancy/peer.py": """
        def later():
            from .mid import Thing
    """,
    # A circle across a subpackage: a two-level relative import and a dotted absolute one.
    "gateway/__init__.py": "",
    "gateway/top.py": "import gateway.sub.leaf\nfrom tenancy import mid\n",
    "gateway/sub/__init__.py": "",
    "gateway/sub/leaf.py": "from ..top import handler\n",
    # Downward imports only: no violation, no circle.
    "gateway/side.py": "from tenancy.mid import Thing\nfrom gateway import sub\nimport accounts\n",
}


def _sample_tree(root: Path) -> dict[str, Imports]:
    for name, source in SAMPLE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return import_graph(root, PACKAGES)


def test_the_walker_resolves_every_kind_of_import(tmp_path: Path) -> None:
    graph = _sample_tree(tmp_path)
    assert "accounts.migrations.0001_initial" not in graph
    assert graph["accounts.low"].modules == {"tenancy.mid"}  # under TYPE_CHECKING
    assert graph["accounts.lazy"].modules == {"gateway.top"}  # inside a function
    assert graph["tenancy.mid"].modules == {"tenancy.peer"}  # from . import module
    assert graph["tenancy.peer"].modules == {"tenancy.mid"}  # relative, in a function
    assert graph["gateway.top"].modules == {"gateway.sub.leaf", "tenancy.mid"}  # from pkg import module
    assert graph["gateway.sub.leaf"].modules == {"gateway.top"}  # two levels up
    assert graph["gateway.side"].modules == {"tenancy.mid", "gateway.sub", "accounts"}


def test_the_walker_finds_upward_imports_and_circles(tmp_path: Path) -> None:
    graph = _sample_tree(tmp_path)
    assert layer_violations(graph, FORBIDDEN) == [
        "accounts.lazy imports gateway.top",
        "accounts.low imports tenancy.mid",
    ]
    assert import_cycles(graph) == [
        ["gateway.sub.leaf", "gateway.top", "gateway.sub.leaf"],
        ["tenancy.mid", "tenancy.peer", "tenancy.mid"],
    ]


def test_a_longer_circle_is_reported_once(tmp_path: Path) -> None:
    for name, source in {
        "gateway/__init__.py": "",
        "gateway/a.py": "from gateway import b\n",
        "gateway/b.py": "from gateway.c import x\n",
        "gateway/c.py": "import gateway.a\nfrom gateway import b\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    # a -> b -> c -> a, with the shorter b <-> c inside it: one group, its shortest circle from a.
    assert import_cycles(import_graph(tmp_path, ["gateway"])) == [["gateway.a", "gateway.b", "gateway.c", "gateway.a"]]


# --- the project ---------------------------------------------------------------------------


def _project() -> dict[str, Imports]:
    graph = import_graph(ROOT, PACKAGES)
    # The walk saw the tree: a known import of each kind is there.
    assert "tenancy.services.alerts" in graph["tenancy.tasks"].modules  # from package import module
    assert "accounts.upstream.client" in graph["tenancy.services.alerts"].modules
    return graph


def test_imports_run_one_way() -> None:
    """tenancy and accounts never import gateway; accounts never imports tenancy."""
    violations = layer_violations(_project(), FORBIDDEN)
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_no_import_circles() -> None:
    cycles = import_cycles(_project())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)
