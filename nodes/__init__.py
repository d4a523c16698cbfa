"""ComfyUI nodes of ditprune (V3 API). Thin glue: the work is done by ``ditprune_core``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from ..ditprune_core.util.io import install_cleanup_handlers
from .calibrate import DitPruneCalibrate, DitPruneLoadCalibration
from .choices import ensure_calibration_folder
from .compare import DitPruneCompare
from .heldout import DitPruneHeldOutCheck
from .load import DitPruneLoadPrunedModel
from .prompts import DitPrunePromptSet
from .prune import DitPruneApplyPruning, DitPruneClusterWeights, DitPruneScoreSaliency
from .reconstruct import DitPrunePruneAndReconstruct
from .save import DitPruneSavePrunedModel

# SIGTERM / SIGHUP remove a save's temporary file. Handlers can only be installed from the main thread,
# and ComfyUI executes prompts in a worker thread; it imports the pack in the main thread, so do it now.
install_cleanup_handlers()

NODES: list[type[io.ComfyNode]] = [
    DitPrunePromptSet,
    DitPruneCalibrate,
    DitPruneLoadCalibration,
    DitPruneScoreSaliency,
    DitPruneClusterWeights,
    DitPruneApplyPruning,
    DitPrunePruneAndReconstruct,
    DitPruneSavePrunedModel,
    DitPruneLoadPrunedModel,
    DitPruneCompare,
    DitPruneHeldOutCheck,
]


class DitPruneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        ensure_calibration_folder()  # ComfyUI (0.3.64) calls this once, at pack load
        return list(NODES)


async def comfy_entrypoint() -> DitPruneExtension:
    return DitPruneExtension()
