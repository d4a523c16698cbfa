"""ComfyUI nodes of ditprune (V3 API). Thin glue: the work is done by ``ditprune_core``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .calibrate import DitPruneCalibrate, DitPruneLoadCalibration
from .choices import ensure_calibration_folder
from .compare import DitPruneCompare
from .load import DitPruneLoadPrunedModel
from .prune import DitPruneApplyPruning, DitPruneClusterWeights, DitPruneScoreSaliency
from .reconstruct import DitPrunePruneAndReconstruct
from .save import DitPruneSavePrunedModel

NODES: list[type[io.ComfyNode]] = [
    DitPruneCalibrate,
    DitPruneLoadCalibration,
    DitPruneScoreSaliency,
    DitPruneClusterWeights,
    DitPruneApplyPruning,
    DitPrunePruneAndReconstruct,
    DitPruneSavePrunedModel,
    DitPruneLoadPrunedModel,
    DitPruneCompare,
]


class DitPruneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        ensure_calibration_folder()  # ComfyUI (0.3.64) calls this once, at pack load
        return list(NODES)


async def comfy_entrypoint() -> DitPruneExtension:
    return DitPruneExtension()
