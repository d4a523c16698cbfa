"""What the loader nodes offer on a fresh install: the calibration folder exists from pack load, and
an empty folder shows a placeholder that says how to fill it instead of the frontend's "undefined"."""

from __future__ import annotations

from pathlib import Path

import folder_paths

from .common import CALIBRATION_FOLDER, calibration_dir

NO_CALIBRATIONS = "(none yet: set save_name on DiT-Pruning Calibrate to save one)"
NO_DIFFUSION_MODELS = "(none yet: DiT-Pruning Save Pruned Model writes to models/diffusion_models)"


def ensure_calibration_folder() -> Path:
    """``models/ditprune_calibrations``, registered with folder_paths and created; called at pack load."""
    path = calibration_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def options(folder: str, placeholder: str) -> list[str]:
    """The files ComfyUI lists in ``folder``, or ``[placeholder]`` when there are none."""
    names = folder_paths.get_filename_list(folder)
    return names or [placeholder]


def calibration_options() -> list[str]:
    ensure_calibration_folder()
    return options(CALIBRATION_FOLDER, NO_CALIBRATIONS)


def refuse_placeholder(name: str, placeholder: str, folder: str) -> None:
    """A clear error when the node runs while its folder is still empty."""
    if name == placeholder:
        where = folder_paths.get_folder_paths(folder)
        raise ValueError(
            f"no file in {where[0] if where else folder} yet: "
            f"{placeholder.strip('()').removeprefix('none yet: ')}, then press R in the graph to refresh the list"
        )


__all__ = [
    "NO_CALIBRATIONS",
    "NO_DIFFUSION_MODELS",
    "calibration_options",
    "ensure_calibration_folder",
    "options",
    "refuse_placeholder",
]
