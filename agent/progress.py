"""Progress on a terminal for long file work (pcap, pg-log); silent when stderr is not a tty."""

from __future__ import annotations

import sys
import time
from typing import Callable


def terminal_progress(label: str) -> Callable[[int, int], None] | None:
    """A progress callback that redraws one stderr line at most every 0.5 s, on a terminal only."""
    try:
        if not sys.stderr.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    state = {"shown": 0.0, "started": time.monotonic()}

    def progress(done_bytes: int, total_bytes: int) -> None:
        now = time.monotonic()
        if now - state["shown"] < 0.5 and done_bytes < total_bytes:
            return
        state["shown"] = now
        percent = 100.0 * done_bytes / total_bytes if total_bytes else 100.0
        rate = done_bytes / max(now - state["started"], 1e-6) / 1e6
        sys.stderr.write(f"\r… {label}: {percent:5.1f}% ({rate:.0f} MB/s)")
        if done_bytes >= total_bytes:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return progress
