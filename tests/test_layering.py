"""The house's directions hold: pft.core imports nothing of Flower, the CLI or the apps, and no
module imports the folders by their directory names (only the installed ``pft.*`` namespace)."""

from __future__ import annotations

import ast
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
DIRECTORY_NAMES = {"pft_core", "client", "server", "simulations", "pft_cli"}
FORBIDDEN_IN_CORE = {"flwr", "typer", "pft.client", "pft.server", "pft.simulations", "pft.cli"}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _hits(modules: set[str], forbidden: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_pft_core_imports_no_flower_cli_or_apps() -> None:
    files = _files(PACKAGES["pft.core"])
    assert files, "pft_core/ has no modules"
    offenders = {str(p.relative_to(ROOT)): _hits(_imported_modules(p), FORBIDDEN_IN_CORE) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_nothing_imports_the_folders_by_directory_name() -> None:
    files = [p for folder in [*PACKAGES.values(), "tests"] for p in _files(folder)]
    offenders = {str(p.relative_to(ROOT)): _hits(_imported_modules(p), DIRECTORY_NAMES) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_import_checker_sees_forbidden_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import flwr.app\nfrom pft.client.store import EncryptedStore\nfrom . import sibling\n")
    assert _hits(_imported_modules(probe), FORBIDDEN_IN_CORE) == ["flwr.app", "pft.client.store"]
    probe.write_text("from client" + ".store import EncryptedStore\nimport simulations\n")
    assert _hits(_imported_modules(probe), DIRECTORY_NAMES) == ["client.store", "simulations"]
