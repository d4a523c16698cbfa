"""ditprune_core: post-training pruning of diffusion transformers, in pure torch.

The flow is calibrate -> score -> cluster -> mask -> apply/save; docs/ARCHITECTURE.md says which
module owns each step. Nothing here imports ComfyUI.
"""

from .calibrate import Calibrator, log_timestep_weight
from .cluster import ClusterParams, LayerClusters, cluster_rows
from .layers import (
    DEFAULT_FAMILIES,
    FAMILIES,
    UnsupportedModelError,
    detect_architecture,
    find_prunable_layers,
    unwrap_diffusion_model,
)
from .prune import (
    GRANULARITIES,
    PATTERNS,
    PruneConfig,
    apply_masks_,
    compute_masks,
    iter_masks,
    layer_keep_mask,
    prune_model_,
)
from .report import SparsityReport, sparsity_report
from .save import CheckpointError, CheckpointReport, load_pruned_checkpoint, save_pruned_checkpoint
from .score import METRICS, MetricParams, score_layer
from .stats import CalibrationError, CalibrationStats, ChannelSquareMean, LayerStats
from .util.io import FileExistsRefusal

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "GRANULARITIES",
    "METRICS",
    "PATTERNS",
    "CalibrationError",
    "CalibrationStats",
    "Calibrator",
    "ChannelSquareMean",
    "CheckpointError",
    "CheckpointReport",
    "ClusterParams",
    "FileExistsRefusal",
    "LayerClusters",
    "LayerStats",
    "MetricParams",
    "PruneConfig",
    "SparsityReport",
    "UnsupportedModelError",
    "apply_masks_",
    "cluster_rows",
    "compute_masks",
    "detect_architecture",
    "find_prunable_layers",
    "iter_masks",
    "layer_keep_mask",
    "load_pruned_checkpoint",
    "log_timestep_weight",
    "prune_model_",
    "save_pruned_checkpoint",
    "score_layer",
    "sparsity_report",
    "unwrap_diffusion_model",
]
