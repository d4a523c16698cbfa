"""Safe file writing: atomic, never over an existing file."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["FileExistsRefusal", "atomic_path", "next_free_path"]


class FileExistsRefusal(FileExistsError):
    """The target exists; ditprune never overwrites files silently."""


@contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place atomically.

    The temporary file is removed on any error, so a half-written file never appears under the
    final name. Without ``overwrite`` an existing target is refused (before and after writing: the
    final move uses a hard link, which fails if another writer got there first).

    Raises:
        FileExistsRefusal: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsRefusal(f"{path} already exists; choose another name or delete it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsRefusal(
                    f"{path} appeared while writing; choose another name or delete it first"
                ) from None
            except OSError:  # filesystems without hard links
                if path.exists():
                    raise FileExistsRefusal(f"{path} already exists") from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def next_free_path(folder: str | Path, prefix: str, suffix: str) -> Path:
    """``folder/prefix_00001suffix`` with the first counter not taken (ComfyUI's naming)."""
    folder = Path(folder)
    counter = 1
    while (candidate := folder / f"{prefix}_{counter:05d}{suffix}").exists():
        counter += 1
    return candidate
