"""Errors shared by the modules that raise them (a module of its own, so that none has to import a
larger one for an exception class)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file that is not ours, truncated, of an unknown version, or inconsistent."""
