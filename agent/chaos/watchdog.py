"""Dead man's switch for a chaos run: `python -m agent.chaos.watchdog STATE_DIR RUN_ID`.

Started by the runner in its own session, with the read end of a pipe on stdin. The kernel closes
the agent's end when the agent dies however it dies (SIGKILL included), so EOF on stdin means
"the agent is gone": the watchdog then undoes the run's active faults from the journal alone
(tc qdiscs, cgroup limits, frozen processes: what the kernel does not remove by itself).
The fault modules are imported BEFORE it says ready, so the undo starts within milliseconds of
the agent's death instead of after a cold import (~0.3 s here).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

RETRY_FOR_S = 30.0


def main(argv: list[str]) -> int:
    directory, run_id = Path(argv[0]), argv[1]
    import agent.chaos.faults  # noqa: F401 - warm: every injector's undo ready before the agent goes on
    from agent.chaos import journal
    from agent.chaos.sweep import sweep

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            sweep(directory, by="watchdog", run_id=run_id)
            return 0
        except Exception as error:  # noqa: BLE001 - keep trying until the deadline
            if time.monotonic() > deadline:
                try:
                    journal.append(directory, "watchdog_error", run_id=run_id, error=str(error))
                except OSError:
                    pass
                return 1
            time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
