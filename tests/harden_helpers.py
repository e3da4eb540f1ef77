"""Helpers shared by the tests/test_harden_*.py files."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(mount_point: Path, options: str):
    """A real tmpfs (e.g. "size=16384" or "ro,size=64k") mounted for the block, unmounted after.
    Root ignores mode bits, so a full or read-only disk has to be a real filesystem."""
    if os.geteuid() != 0:
        pytest.skip("LIVE TEST SKIPPED: mounting a tmpfs needs root")
    mount_point.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], check=True,
                   capture_output=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)
