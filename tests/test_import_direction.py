"""docs/ARCHITECTURE.md states the import order of ditprune_core's modules: this checks it is true.

The order is read from the document itself (its ``Import order:`` line), so that the document and the
code cannot drift apart: every relative import inside ``ditprune_core`` must go from a module to one
listed to its left (or within the same top-level module), and ``ditprune_core`` never imports
ComfyUI.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "ditprune_core"
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution"}


def _stated_order() -> list[str]:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    match = re.search(r"^Import order[^`]*`([^`]+)`", text, flags=re.M)
    assert match, "docs/ARCHITECTURE.md has no 'Import order: `a < b < ...`' line"
    return [name.strip() for name in match.group(1).split("<")]


def _top(parts: list[str]) -> str:
    return parts[0] if parts else "__init__"


def _edges() -> list[tuple[str, str, str]]:
    """``(importer, imported, file)`` for every relative import between top-level modules."""
    edges = []
    for path in sorted(CORE.rglob("*.py")):
        rel = list(path.relative_to(CORE).with_suffix("").parts)
        package = rel[:-1]  # the package a module's relative imports resolve against
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                importer, imported = _top(rel if rel[-1] != "__init__" else rel[:-1]), _top(target)
                if importer != imported:
                    edges.append((importer, imported, str(path.relative_to(REPO))))
    return edges


def test_every_core_module_is_placed_in_the_stated_order() -> None:
    order = _stated_order()
    modules = {_top([p.stem]) if p.is_file() else p.name for p in CORE.iterdir()}
    modules = {m for m in modules if not m.startswith(("_", ".")) and m not in ("assets", "py")}
    modules.discard("__init__")
    missing = sorted(m for m in modules if m not in order)
    assert not missing, f"modules missing from the Import order line of docs/ARCHITECTURE.md: {missing}"
    assert len(order) == len(set(order)), "a module is listed twice"


def test_imports_flow_only_to_the_left_of_the_stated_order() -> None:
    order = _stated_order()
    rank = {name: i for i, name in enumerate(order)}
    rank["__init__"] = len(order)  # the package's front door may import anything
    wrong = [
        f"{file}: {importer} imports {imported}"
        for importer, imported, file in _edges()
        if rank[imported] >= rank[importer]
    ]
    assert not wrong, "imports against docs/ARCHITECTURE.md's order:\n" + "\n".join(wrong)


def test_the_core_never_imports_the_host() -> None:
    bad = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in HOST_MODULES]
    assert not bad, bad
