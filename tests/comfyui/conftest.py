"""Fixtures for the tests against a real ComfyUI (found via $COMFYUI_PATH or /opt/ComfyUI).

The pack is loaded the way ComfyUI loads it: ``nodes.load_custom_node(<repo root>)``, as a package
from its parent folder. The repository root is never put on ``sys.path``: its ``nodes/`` folder
would shadow ComfyUI's ``nodes.py``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
NODE_IDS = (
    "DitPrunePromptSet",
    "DitPruneCalibrate",
    "DitPruneScoreSaliency",
    "DitPruneClusterWeights",
    "DitPruneApplyPruning",
    "DitPrunePruneAndReconstruct",
    "DitPruneSavePrunedModel",
    "DitPruneCompare",
    "DitPruneHeldOutCheck",
    "DitPruneLoadCalibration",
    "DitPruneLoadPrunedModel",
)


HOW_TO = "see docs/TESTING.md in this repository for running the node tests against your ComfyUI"


def _skip(reason: str) -> None:
    """Skip, or fail where the node tests must run (``.ci/run`` sets DITPRUNE_REQUIRE_COMFYUI=1)."""
    if os.environ.get("DITPRUNE_REQUIRE_COMFYUI") == "1":
        pytest.fail(f"DITPRUNE_REQUIRE_COMFYUI=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def comfyui_path() -> Path | None:
    for candidate in (os.environ.get("COMFYUI_PATH"), "/opt/ComfyUI"):
        if candidate and (Path(candidate) / "comfy" / "model_management.py").is_file():
            return Path(candidate)
    return None


@dataclass
class Comfy:
    root: Path
    nodes: ModuleType
    base: Path
    mappings: dict[str, Any]

    def node(self, node_id: str) -> Any:
        return self.mappings[node_id]


def _without_repo_root() -> None:
    """Drop the repository root ('' under ``python -m pytest``) from sys.path, and our ``nodes``."""
    bad = {"", ".", str(REPO)}
    sys.path[:] = [p for p in sys.path if p not in bad and Path(p or ".").resolve() != REPO]
    mod = sys.modules.get("nodes")
    if mod is not None and str(REPO) in str(getattr(mod, "__file__", "")):
        del sys.modules["nodes"]


@pytest.fixture(autouse=True)
def _like_the_executor() -> Any:
    """ComfyUI runs every prompt under ``torch.inference_mode()`` (execution.py); so do we."""
    import torch

    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> Comfy:
    root = comfyui_path()
    if root is None:
        _skip(f"no ComfyUI found: set $COMFYUI_PATH to a ComfyUI checkout ({HOW_TO})")
    _without_repo_root()
    sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_management
        import comfy.sd
        import folder_paths

        import nodes
    except Exception as exc:  # ImportError, or a torch/torchvision mismatch raising at import
        _skip(f"ComfyUI at {root} cannot be imported in this environment ({exc!r}); {HOW_TO}")
    assert Path(nodes.__file__).resolve().parent == root.resolve(), "ComfyUI's nodes.py is shadowed"
    base = tmp_path_factory.mktemp("comfybase")
    (base / "output").mkdir()
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.folder_names_and_paths["diffusion_models"] = (
        [str(base / "models" / "diffusion_models")],
        folder_paths.supported_pt_extensions,
    )
    (base / "models" / "diffusion_models").mkdir(parents=True)
    assert asyncio.run(nodes.load_custom_node(str(REPO))), "ComfyUI failed to load the pack (see log)"
    return Comfy(root, nodes, base, nodes.NODE_CLASS_MAPPINGS)
