"""Benchmarks (commands, not tests): quality, sweep, speed, checkpoint; see ``__main__``."""

from __future__ import annotations

from pathlib import Path


def write_report(out_dir: Path, filename: str, text: str) -> Path:
    """Write a generated markdown table to ``out_dir/filename`` (regenerated on every run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    path.write_text(text.rstrip("\n") + "\n")
    return path


def table_head(title: str, command: str, doc: str | None, columns: list[str]) -> list[str]:
    """The first lines of a generated held-out table: its title, the command that wrote it, the
    module docstring from its ``Protocol`` paragraph on, and the table's header row."""
    return [
        f"# {title} (generated)",
        "",
        f"`{command}`",
        "",
        "Protocol" + (doc or "").split("Protocol", 1)[1].rstrip(),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
