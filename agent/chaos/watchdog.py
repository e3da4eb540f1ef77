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
from pathlib import Path

from core.deadman import undo_after_eof

RETRY_FOR_S = 30.0


def main(argv: list[str]) -> int:
    directory, run_id = Path(argv[0]), argv[1]
    import agent.chaos.faults  # noqa: F401 - warm: every injector's undo ready before the agent goes on
    from agent.chaos import journal
    from agent.chaos.sweep import sweep

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    return undo_after_eof(sys.stdin.buffer, lambda: sweep(directory, by="watchdog", run_id=run_id),
                          retry_for_s=RETRY_FOR_S, pause_s=0.2,
                          give_up=lambda error: journal.append(directory, "watchdog_error",
                                                               run_id=run_id, error=str(error)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
