"""Packaging stays in step: requirements.txt mirrors pyproject.toml, minus torch (ComfyUI owns it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _names(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower()
            out[name] = line
    return out


def test_requirements_match_pyproject_without_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = _names(project["dependencies"])
    reqs = _names((ROOT / "requirements.txt").read_text().splitlines())
    assert "torch" not in reqs, "requirements.txt must never make ComfyUI-Manager reinstall torch"
    assert "torch" in deps
    deps.pop("torch")
    assert reqs == deps


def test_comfy_registry_fields() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "comfyui" not in data["project"]["name"].lower()
    assert data["project"]["urls"]["Repository"]
    assert {"PublisherId", "DisplayName"} <= set(data["tool"]["comfy"])


def test_every_asset_ships_with_the_package() -> None:
    """The bundled checkpoints and the default prompt set match a package-data pattern."""
    from fnmatch import fnmatch

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "ditprune_core"
    ]
    assets = sorted((ROOT / "ditprune_core" / "assets").iterdir())
    assert any(a.name == "prompts.txt" for a in assets)
    for asset in assets:
        name = str(asset.relative_to(ROOT / "ditprune_core"))
        assert any(fnmatch(name, p) for p in patterns), f"{name} is not in package-data"
