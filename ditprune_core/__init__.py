"""ditprune_core: post-training pruning of diffusion transformers, in pure torch.

Mask-only: calibrate -> score -> cluster -> mask -> apply/save (:mod:`.prune`). With reconstruction:
per pass, calibrate -> mask -> OBS update -> refit -> refine -> quantise -> write
(:func:`prune_sequential_`), then save. docs/ARCHITECTURE.md says which module owns each step.
Nothing here imports ComfyUI.
"""

from .calibrate import CALIBRATED_FAMILIES, TIMESTEP_WEIGHTINGS, Calibrator, log_timestep_weight
from .cluster import WITHIN, ClusterParams, LayerClusters, cluster_rows
from .config import GRANULARITIES, PATTERNS, PruneConfig, parse_pattern
from .layers import (
    DEFAULT_FAMILIES,
    FAMILIES,
    UnsupportedModelError,
    detect_architecture,
    find_prunable_layers,
    unwrap_diffusion_model,
)
from .load import CheckpointError, CheckpointInfo, load_pruned_checkpoint, read_checkpoint_info
from .mask import layer_keep_mask
from .prune import PruneTarget, apply_masks_, compute_masks, iter_masks, prune_model_, select_layers
from .report import SparsityReport, sparsity_report
from .save import CheckpointReport, save_pruned_checkpoint
from .score import METRICS, NORMALIZATIONS, MetricParams, score_layer
from .sequential import SequentialReport, prune_sequential_
from .stats import CalibrationError, CalibrationStats, ChannelSquareMean, LayerStats
from .util.io import FileExistsRefusal

__version__ = "0.1.0"

__all__ = [
    "CALIBRATED_FAMILIES",
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "GRANULARITIES",
    "METRICS",
    "NORMALIZATIONS",
    "PATTERNS",
    "TIMESTEP_WEIGHTINGS",
    "WITHIN",
    "CalibrationError",
    "CalibrationStats",
    "Calibrator",
    "ChannelSquareMean",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointReport",
    "ClusterParams",
    "FileExistsRefusal",
    "LayerClusters",
    "LayerStats",
    "MetricParams",
    "PruneConfig",
    "PruneTarget",
    "SequentialReport",
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
    "parse_pattern",
    "prune_model_",
    "prune_sequential_",
    "read_checkpoint_info",
    "save_pruned_checkpoint",
    "score_layer",
    "select_layers",
    "sparsity_report",
    "unwrap_diffusion_model",
]
