"""Safe file writing: atomic, never over an existing file, no temporary left behind.

A file being written lives under a hidden temporary name beside its target,
``.<name>.<pid>.<token>.tmp`` (``pid`` the writing process), and is moved into place only once it
is complete. What removes a temporary:

- an error or an exception during the write (the ``finally`` of :func:`atomic_path`);
- SIGTERM or SIGHUP, once :func:`install_cleanup_handlers` has run in the main thread (the node pack
  does it when ComfyUI loads it): the handler removes this process's temporaries, then the signal
  does what it did before (the previous handler runs, or the process terminates);
- the next save into the same folder, by any process: it removes the temporaries of our naming whose
  writer is gone (its pid is not alive, or is this process's pid without a save of ours in progress).

SIGKILL (and a power cut, or ``os._exit``) cannot be caught: the temporary stays until the next
save into that folder removes it, or until it is deleted by hand. It never appears under the
final name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "FileExistsRefusal",
    "atomic_path",
    "check_name_fits",
    "install_cleanup_handlers",
    "next_free_path",
    "remove_stale_temporaries",
]

log = logging.getLogger("ditprune")

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.(?P<token>[0-9a-f]{8})\.tmp$")
_LEGACY_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # before 0.x: no pid, so no way to tell it is stale

# The temporaries this process is writing now. Process-wide on purpose: a signal handler must find
# them whichever thread writes (ComfyUI runs prompts in a worker thread). An RLock, because the handler
# runs in the main thread, possibly while that thread holds the lock.
_live: set[Path] = set()
_live_lock = threading.RLock()
_CLEANUP_SIGNALS = ("SIGTERM", "SIGHUP")


class FileExistsRefusal(FileExistsError):
    """The target exists; ditprune never overwrites files silently."""


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) allowed where ``folder``, or its nearest existing parent, is."""
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            try:
                return int(os.pathconf(candidate, "PC_NAME_MAX"))
            except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer
                break
    return 255


def check_name_fits(path: str | Path) -> None:
    """Refuse a path the filesystem cannot create because a name in it is too long.

    Checks every component of ``path`` against the filesystem's name limit (``PC_NAME_MAX`` of the
    nearest existing folder, usually 255 bytes) and the whole path against ``PC_PATH_MAX``.

    Raises:
        ValueError: naming the component, its length in bytes and the limit.
    """
    path = Path(path).absolute()
    limit = _name_max(path.parent)
    for part in path.parts[1:]:
        size = len(os.fsencode(part))
        if size > limit:
            what = "file name" if part == path.name else f"folder name {part[:40]!r}..."
            raise ValueError(
                f"{path}: the {what} is {size} bytes long; this filesystem allows {limit}: choose a "
                "shorter name"
            )
    try:
        path_max = int(os.pathconf(_existing(path), "PC_PATH_MAX"))
    except (AttributeError, OSError, ValueError):
        return
    if len(os.fsencode(str(path))) >= path_max:
        raise ValueError(f"{path}: the path is longer than this filesystem allows ({path_max} bytes)")


def _existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def _temp_path(path: Path) -> Path:
    """``.<name>.<pid>.<token>.tmp`` beside ``path``, ``name`` shortened if the whole would not fit."""
    tail = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    room = _name_max(path.parent) - len(os.fsencode(tail)) - 1
    name = path.name
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return path.with_name(f".{name}{tail}")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists; True when that cannot be told (never remove a live save)."""
    if pid <= 0:
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, another user's
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries of our naming in ``folder`` that no save is writing any more.

    A temporary is stale when the pid in its name is not alive, or is this process's own pid while
    this process has no save writing it (the pid was reused, e.g. by a restarted container). A
    temporary of a live process is kept, even when that pid was reused by an unrelated process.
    Temporaries of the older naming (without a pid) are never removed, only named in a warning.

    Returns:
        the paths removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    legacy: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    with _live_lock:
        live = set(_live)
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None:
            if _LEGACY_TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
                legacy.append(entry.path)
            continue
        path = Path(entry.path)
        pid = int(match["pid"])
        if path in live or not entry.is_file(follow_symlinks=False):
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove the stale temporary %s: %s", path, exc)
            continue
        log.info("removed %s, left by an interrupted save (process %d)", path, pid)
        removed.append(path)
    if legacy:
        log.warning(
            "temporaries of an interrupted save by an older ditprune remain in %s: %s; delete them "
            "by hand when no save is running",
            folder,
            ", ".join(legacy),
        )
    return removed


def _remove_live_temporaries() -> None:
    with _live_lock:
        paths = list(_live)
    for path in paths:
        with contextlib.suppress(OSError):  # in a signal handler: nothing better to do than to go on
            path.unlink(missing_ok=True)


Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _cleanup_handler(previous: Handler) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            # a Python handler may not end the process (a graceful-shutdown flag): remove the
            # temporaries only if it leaves by an exception (SystemExit, KeyboardInterrupt ...)
            try:
                previous(signum, frame)
            except BaseException:
                _remove_live_temporaries()
                raise
            return
        # SIG_DFL (or a handler not set from Python): remove, then terminate as the signal would
        _remove_live_temporaries()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    handler.ditprune_cleanup = True  # type: ignore[attr-defined]
    return handler


def install_cleanup_handlers() -> list[str]:
    """Make SIGTERM and SIGHUP remove this process's save temporaries before they act.

    Signal handlers can be installed only from the main thread; call this once from there (the
    ComfyUI node pack does it when it is loaded). Each handler chains to the one it replaces: a
    previous Python handler still runs, a default action still terminates the process. Ignored
    signals stay ignored. Calling it again changes nothing.

    Returns:
        the names of the signals whose handler was installed by this call.
    """
    if threading.current_thread() is not threading.main_thread():
        log.debug("cleanup handlers not installed: not in the main thread")
        return []
    installed = []
    for name in _CLEANUP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:  # no SIGHUP on Windows
            continue
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN or getattr(previous, "ditprune_cleanup", False):
            continue
        signal.signal(signum, _cleanup_handler(previous))
        installed.append(name)
    return installed


#: errnos of a write that ran out of room: the disk is full, a quota is reached, the file too large
_FULL_DISK = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if e is not None
)


@contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place atomically.

    The temporary file is removed on any error, so a half-written file never appears under the
    final name (and see the module docstring for signals). Without ``overwrite`` an existing target
    is refused (before and after writing: the final move uses a hard link, which fails if another
    writer got there first). Stale temporaries of interrupted saves in the folder are removed first
    (:func:`remove_stale_temporaries`).

    Raises:
        FileExistsRefusal: ``path`` exists and ``overwrite`` is False.
        ValueError: a name in ``path`` is longer than the filesystem allows.
        OSError: the disk (or quota) filled up while writing: the same errno, with a message that
            names ``path`` and says that nothing was saved.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsRefusal(f"{path} already exists; choose another name or delete it first")
    check_name_fits(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = _temp_path(path)
    with _live_lock:
        _live.add(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(
                f"the temporary file of {path} was removed while it was written (a termination signal?); "
                "nothing was saved"
            )
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
    except OSError as exc:
        if exc.errno not in _FULL_DISK:
            raise
        # the bare "[Errno 28] No space left on device" names no file: say which, and what to do
        raise OSError(
            exc.errno,
            f"{path}: {exc.strerror or 'no space left'} while writing it (needs more free space in "
            f"{path.parent}); nothing was saved: free some space there or save to another folder",
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
        with _live_lock:
            _live.discard(tmp)


def next_free_path(folder: str | Path, prefix: str, suffix: str) -> Path:
    """``folder/prefix_00001suffix`` with the first counter not taken (ComfyUI's naming)."""
    folder = Path(folder)
    counter = 1
    while (candidate := folder / f"{prefix}_{counter:05d}{suffix}").exists():
        counter += 1
    return candidate
