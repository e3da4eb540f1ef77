"""Atomic file writes: a reader sees the old file or the whole new one, even after a crash.

The one implementation for bundles, the fleet store, the daemon's state and every extra file a
probe writes; nothing else in the project should open a final path for writing directly.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp name beside `path`; on success fsync it, os.replace() it into place and fsync
    the directory, so a reader sees the old file or the whole new one, even after a crash."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(payload: Any, path: Path) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(text: str, path: Path) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text)
