"""Imports run one way, ``pft.core`` <- ``pft.client`` <- ``pft.server`` <- ``pft.simulations`` <-
``pft.cli``, with no circle between any two modules, and nothing imports the folders by their
directory names (only the installed ``pft.*`` namespace).

Every import statement counts, wherever it is: at module level, inside a function, under
``if TYPE_CHECKING``, relative or absolute (an import hidden in a function still runs back up).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: import name -> folder in the repository (pyproject's [tool.setuptools.package-dir])
PACKAGES = {
    "pft.core": "pft_core",
    "pft.client": "client",
    "pft.server": "server",
    "pft.simulations": "simulations",
    "pft.cli": "pft_cli",
}
#: the layers, lowest first: a package may import its own modules and those of the layers below.
LAYERS = ("pft.core", "pft.client", "pft.server", "pft.simulations", "pft.cli")
DIRECTORY_NAMES = {"pft_core", "client", "server", "simulations", "pft_cli"}
#: third-party packages a layer must not import (the core knows no Flower and no CLI).
FORBIDDEN_THIRD_PARTY = {
    "pft.core": {"flwr", "typer", "rich"},
    "pft.client": {"typer", "rich", "flwr.simulation", "flwr.server", "ray"},
    "pft.server": {"typer", "rich", "flwr.simulation", "ray"},
}


def _module_name(path: Path) -> str:
    """The installed name of a repository file, e.g. ``client/sdk.py`` -> ``pft.client.sdk``."""
    rel = path.relative_to(ROOT)
    folder = rel.parts[0]
    package = next(name for name, directory in PACKAGES.items() if directory == folder)
    parts = [package, *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str, known: Iterable[str] = ()) -> set[str]:
    """Every module ``path`` imports, anywhere in the file; ``from A import b`` names ``A.b`` when
    ``A.b`` is one of the ``known`` modules (a submodule), else ``A``."""
    known = set(known)
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.add(candidate if candidate in known else base)
    return names


def _hits(modules: Iterable[str], forbidden: Iterable[str]) -> list[str]:
    forbidden = set(forbidden)
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _layer(module: str) -> str | None:
    return next((p for p in LAYERS if module == p or module.startswith(p + ".")), None)


def _graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (every file of every package)."""
    files = {_module_name(p): p for folder in PACKAGES.values() for p in _files(folder)}
    return {
        name: {m for m in _imports(path, name, files) if m in files and m != name}
        for name, path in files.items()
    }


def upward_imports(graph: Mapping[str, set[str]]) -> dict[str, list[str]]:
    """Imports of a module from a HIGHER layer than its own (the direction that must not exist)."""
    out: dict[str, list[str]] = {}
    for module, targets in graph.items():
        own = LAYERS.index(_layer(module) or "pft.cli")
        bad = sorted(t for t in targets if LAYERS.index(_layer(t) or "pft.cli") > own)
        if bad:
            out[module] = bad
    return out


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_every_package_has_modules() -> None:
    graph = _graph()
    for package in LAYERS:
        assert any(_layer(m) == package for m in graph), package


def test_no_import_runs_back_up_a_layer() -> None:
    assert upward_imports(_graph()) == {}


def test_no_import_circle_between_any_modules() -> None:
    assert cycles(_graph()) == []


def test_layers_import_no_forbidden_third_party_package() -> None:
    offenders: dict[str, list[str]] = {}
    for package, forbidden in FORBIDDEN_THIRD_PARTY.items():
        for path in _files(PACKAGES[package]):
            bad = _hits(_imports(path, _module_name(path)), forbidden)
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_nothing_imports_the_folders_by_directory_name() -> None:
    files = [p for folder in [*PACKAGES.values(), "tests"] for p in _files(folder)]
    offenders = {}
    for p in files:
        rel = p.relative_to(ROOT)  # a test module, or one of a test plug-in (tests/plugins/...)
        name = ".".join(rel.with_suffix("").parts) if rel.parts[0] == "tests" else _module_name(p)
        offenders[str(p.relative_to(ROOT))] = _hits(_imports(p, name), DIRECTORY_NAMES)
    assert {k: v for k, v in offenders.items() if v} == {}


# --- the checkers themselves -------------------------------------------------------------------------
def test_import_reader_sees_imports_anywhere(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import flwr.app\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pft.server.app import ServerSpec\n"
        "def f():\n    from pft.simulations import methods\n    from .sibling import x\n"
    )
    got = _imports(probe, "pft.client.probe", known={"pft.simulations.methods"})
    assert got == {"flwr.app", "typing", "pft.server.app", "pft.simulations.methods", "pft.client.sibling"}
    assert _hits(got, {"flwr"}) == ["flwr.app"]
    probe.write_text("from client" + ".store import EncryptedStore\nimport simulations\n")
    assert _hits(_imports(probe, "x"), DIRECTORY_NAMES) == ["client.store", "simulations"]


def test_checkers_find_an_upward_import_and_a_circle() -> None:
    graph = {
        "pft.core.a": {"pft.client.b"},  # core -> client: upward
        "pft.client.b": {"pft.client.c"},
        "pft.client.c": {"pft.client.b", "pft.core.a"},  # b <-> c, and c -> a -> b
        "pft.server.d": {"pft.core.a"},
    }
    assert upward_imports(graph) == {"pft.core.a": ["pft.client.b"]}
    assert cycles(graph) == [["pft.client.b", "pft.client.c", "pft.core.a"]]
    assert cycles({"pft.core.x": {"pft.core.y"}, "pft.core.y": set()}) == []
