"""Real disk faults for tests: a tiny tmpfs that can be filled up.

``tiny_tmpfs(path)`` mounts a small tmpfs at ``path`` (root only: CI and this machine run the
tests as root) and skips the calling test with the reason when mounting is not permitted;
``fill(directory)`` takes every free block of the filesystem, so the next write that needs a new
block meets ENOSPC exactly as on a real full disk.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "512k") -> Iterator[Path]:
    """A real, tiny filesystem at ``path``; skips the test (saying why) when mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount for a real full disk: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Take every free block of the filesystem holding ``directory``; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass  # ENOSPC: the filesystem is full
    finally:
        os.close(fd)
    return filler
