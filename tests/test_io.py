"""Atomic writes: temporaries never outlive a save, whether it fails, is signalled or was killed."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ditprune_core.util.io import (
    FileExistsRefusal,
    atomic_path,
    check_name_fits,
    remove_stale_temporaries,
)
from ditprune_core.util.safetensors_io import write_safetensors

REPO = Path(__file__).resolve().parents[1]
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and pids")

# A save into argv[1] of 12 lazy 16 MB tensors, each made 0.25 s after the one before, run in a worker
# thread while the main thread waits, as ComfyUI runs prompts; the handlers are installed first, from the
# main thread, as the node pack does when it loads.
_SLOW_SAVE = textwrap.dedent(
    """
    import sys, threading, time
    import torch
    from ditprune_core.util.io import install_cleanup_handlers
    from ditprune_core.util.safetensors_io import LazyTensor, write_safetensors

    # a process started from a terminal has SIGHUP's default action; under nohup (or with SIGHUP
    # ignored by a parent) it is inherited as ignored, and ignored signals stay ignored: restore the
    # default first, so that the test asks the same of the handler wherever the suite runs
    import signal
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    install_cleanup_handlers()

    def slow() -> torch.Tensor:
        time.sleep(0.25)
        return torch.ones(2048, 2048)

    tensors = {f"t{i}": LazyTensor((2048, 2048), torch.float32, slow) for i in range(12)}
    worker = threading.Thread(target=write_safetensors, args=(sys.argv[1] + "/x.safetensors", tensors))
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
    """
)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp(folder: Path, name: str, pid: int, token: str = "0123abcd") -> Path:
    path = folder / f".{name}.{pid}.{token}.tmp"
    path.write_bytes(b"partial")
    return path


@POSIX
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_during_a_save_leaves_no_temporary(tmp_path: Path, signum: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(tmp_path)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 16 << 20 for p in tmp_path.glob(".x.safetensors.*.tmp")):
            assert proc.poll() is None, "the save ended before it could be signalled"
            assert time.monotonic() < deadline, "the save never started writing"
            time.sleep(0.02)
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == -signum  # terminated as the signal would, not by an exception
    finally:
        proc.kill()
    assert list(tmp_path.iterdir()) == []


@POSIX
def test_stale_temporaries_are_removed_on_the_next_save_live_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _temp(tmp_path, "a.safetensors", _dead_pid())
        mine = _temp(tmp_path, "b.safetensors", os.getpid())  # same pid, no save of ours: a reused pid
        live = _temp(tmp_path, "c.safetensors", sleeper.pid)
        legacy = tmp_path / ".d.safetensors.0123abcd.tmp"  # older ditprune naming, no pid: left alone
        legacy.write_bytes(b"old")
        foreign = tmp_path / ".e.safetensors.123.not-ours.tmp"
        foreign.write_bytes(b"?")
        with caplog.at_level(logging.WARNING, logger="ditprune"):
            write_safetensors(tmp_path / "new.safetensors", {"w": torch.ones(2)})
        assert not dead.exists() and not mine.exists()
        assert live.exists() and legacy.exists() and foreign.exists()
        assert (tmp_path / "new.safetensors").exists()
        assert str(legacy) in caplog.text
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_save_in_progress_keeps_its_temporary(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "first.bin") as first:
        first.write_bytes(b"half")
        assert str(os.getpid()) in first.name
        assert remove_stale_temporaries(tmp_path) == []
        with atomic_path(tmp_path / "second.bin") as second:  # a second save in the same folder
            second.write_bytes(b"2")
            assert first.exists()
        assert first.exists() and (tmp_path / "second.bin").read_bytes() == b"2"
    assert (tmp_path / "first.bin").read_bytes() == b"half"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.bin", "second.bin"]


def test_failed_save_leaves_nothing_and_existing_files_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsRefusal, match="already exists"), atomic_path(target):
        pass
    assert target.read_bytes() == b"keep"


def test_the_longest_name_the_filesystem_allows_still_saves(tmp_path: Path) -> None:
    limit = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    name = "n" * (limit - len(".safetensors")) + ".safetensors"
    write_safetensors(tmp_path / name, {"w": torch.ones(2)})  # its temporary's name is shortened to fit
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_names_too_long_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    limit = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    long = tmp_path / "sub" / ("é" * limit + ".safetensors")
    with pytest.raises(ValueError, match=rf"file name is {2 * limit + 12} bytes long; .* allows {limit}"):
        check_name_fits(long)
    with pytest.raises(ValueError, match=r"name is .* bytes long"):
        write_safetensors(long, {"w": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []
    check_name_fits(tmp_path / "sub" / "fine.safetensors")  # a folder that does not exist yet is fine


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) for a real full disk")
def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """The kernel's own ENOSPC (writes to /dev/full fail with it), through a temporary that is a link
    to /dev/full: the error names the file, keeps the errno, and nothing is left behind."""
    import errno

    from ditprune_core.util import io

    real_temp = io._temp_path

    def full_temp(path: Path) -> Path:
        tmp = real_temp(path)
        tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(io, "_temp_path", full_temp)
    target = tmp_path / "big.safetensors"
    with pytest.raises(OSError, match=r"big\.safetensors: No space left on device while writing it") as info:
        write_safetensors(target, {"w": torch.ones(64, 64)})
    assert info.value.errno == errno.ENOSPC
    assert "nothing was saved" in str(info.value)
    assert list(tmp_path.iterdir()) == []
