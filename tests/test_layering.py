"""The house's directions hold: pft_core imports nothing of Flower, the CLI or the apps."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = {"flwr", "client", "server", "simulations", "pft_cli", "typer"}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_pft_core_imports_no_flower_cli_or_apps() -> None:
    files = sorted((ROOT / "pft_core").rglob("*.py"))
    assert files, "pft_core has no modules"
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imported_top_levels(p) & FORBIDDEN_IN_CORE) for p in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}


def test_import_checker_sees_forbidden_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import flwr.app\nfrom client.store import EncryptedStore\nfrom . import sibling\n")
    assert _imported_top_levels(probe) == {"flwr", "client"}
