"""Benchmarks (commands, not tests): quality, sweep, speed, checkpoint; see ``__main__``."""

from __future__ import annotations

from pathlib import Path


def write_report(out_dir: Path, filename: str, text: str) -> Path:
    """Write a generated markdown table to ``out_dir/filename`` (regenerated on every run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    path.write_text(text.rstrip("\n") + "\n")
    return path
