"""The 100% stage's guard: a thread that puts blue back the moment green is not UP.

At 100% blue has weight 0, and HAProxy never routes to a weight-0 server, not even when every
other server is DOWN: a green that goes DOWN then is an outage (503 "no server available") until
blue's weight is back. The driver's own loop cannot watch closely enough, because each look runs
the gate (hundreds of milliseconds on thousands of samples on a loaded host), so this thread
reads green's state every `interval_s` and writes the rollback weights itself. It acts at the
first failed check ("UP 1/2"), while HAProxy still routes to green, so blue usually takes over
before any request fails. The driver then sees `problem` at its next tick and rolls back (again:
the write is idempotent) with the journal, the post-mortem and the notifications.

`lock` is held by the driver around every weight change of the stage (the crossover's flips), so
a flip and the guard's rollback write never interleave.
"""

from __future__ import annotations

import threading
import time

from core.errors import WorkFailed
from agent.rollout.adapters import TrafficAdapter

# One `show stat` and three small admin-socket commands per read, about 1 ms. Under HAProxy's
# 100 ms check interval a green with one failed check ("UP 1/2") is seen before the second one.
GUARD_INTERVAL_S = 0.05


class AloneGuard:
    def __init__(self, adapter: TrafficAdapter, green_name: str, active: bool = True,
                 interval_s: float = GUARD_INTERVAL_S):
        """`active` False: no thread (the split stages: HAProxy moves a DOWN green's share to blue
        by itself); the lock and `problem` still exist, so the driver's loop is the same."""
        self.adapter = adapter
        self.active = active
        self.green_name = green_name
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.problem = ""  # set once, when the guard has acted
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "AloneGuard":
        if not self.active:
            return self
        self._thread = threading.Thread(target=self._watch, name="rollout-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        first_instance = None
        while not self._stop.wait(self.interval_s):
            try:
                view = self.adapter.observe()
            except WorkFailed:
                continue  # unreadable: the driver's next look says so and rolls back
            if view is None:
                return  # the balancer cannot be read back: nothing to guard with
            first_instance = first_instance or view.instance
            if view.green.routable:
                continue
            seen = time.monotonic()
            with self.lock:
                try:
                    self.adapter.set_weights(100, 0)
                    outcome = f"the guard put blue back {(time.monotonic() - seen) * 1000:.0f} ms after seeing it"
                except Exception as error:  # noqa: BLE001 - the driver's rollback tries again
                    outcome = f"the guard could not put blue back: {error}"
                # A restarted balancer starts its checks afresh: say so, it is the likelier story.
                restarted = (f"; the balancer restarted ({first_instance} -> {view.instance})"
                             if view.instance != first_instance else "")
                self.problem = f"green ({self.green_name}) is {view.green.state} in the balancer{restarted} ({outcome})"
            return
