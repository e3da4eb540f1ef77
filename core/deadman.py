"""The dead man's switch loop shared by the chaos and rollout watchdogs.

A watchdog holds the read end of a pipe whose write end only its agent holds. The kernel closes
that end when the agent exits however it exits (SIGKILL included), so EOF means "the agent is
gone". The watchdog then retries its undo until it works or a deadline passes, because what it
undoes may be briefly out of reach (a balancer restarting, a cgroup still busy). The last error is
recorded by the caller's `give_up` so a post-mortem says why nothing was undone.
"""

from __future__ import annotations

import time
from typing import BinaryIO, Callable


def wait_for_eof(stream: BinaryIO) -> None:
    """Block until the other end of the pipe is closed (or the read fails: also "gone")."""
    try:
        while stream.read(4096):
            pass
    except OSError:
        pass


def retry_until_deadline(attempt: Callable[[], None], *, retry_for_s: float, pause_s: float,
                         give_up: Callable[[Exception], None]) -> bool:
    """Call `attempt` until it returns without raising (True) or `retry_for_s` has passed (False,
    after `give_up(last_error)`; an OSError from give_up itself is swallowed: the disk the
    record goes to may be what failed)."""
    deadline = time.monotonic() + retry_for_s
    while True:
        try:
            attempt()
            return True
        except Exception as error:  # noqa: BLE001 - keep trying until the deadline
            if time.monotonic() > deadline:
                try:
                    give_up(error)
                except OSError:
                    pass
                return False
            time.sleep(pause_s)


def undo_after_eof(stream: BinaryIO, attempt: Callable[[], None], *, retry_for_s: float,
                   pause_s: float, give_up: Callable[[Exception], None]) -> int:
    """Wait for EOF on `stream`, then retry `attempt`; the watchdog's exit code (0 done, 1 not)."""
    wait_for_eof(stream)
    done = retry_until_deadline(attempt, retry_for_s=retry_for_s, pause_s=pause_s, give_up=give_up)
    return 0 if done else 1
