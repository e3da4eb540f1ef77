"""Dead man's switch for a rollout driver: `python -m agent.rollout.watchdog JOURNAL RUN_ID`.

Started by the driver in its own session with the read end of a pipe on stdin. When stdin reaches
EOF the driver is gone (finished, crashed or SIGKILLed: the kernel closes its pipe either way).
If the journal then shows no terminal record for the run, traffic goes back to blue. Retries for a
while because the balancer may be briefly unreachable.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

RETRY_FOR_S = 60.0


def main(argv: list[str]) -> int:
    journal_path, run_id = Path(argv[0]), argv[1]
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    from agent.rollout.driver import restore_blue_from_journal
    from agent.rollout.journal import Journal, last_run

    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            state = last_run(journal_path)
            if state.run_id != run_id or state.terminal is not None:
                return 0
            restore_blue_from_journal(journal_path, "driver died mid-rollout: watchdog restored blue",
                                      "rolled_back", driver_alive=False)
            return 0
        except Exception as error:  # noqa: BLE001 - keep trying until the deadline
            if time.monotonic() > deadline:
                try:
                    Journal(journal_path).append("watchdog_error", run_id=run_id, error=str(error))
                except OSError:
                    pass
                return 1
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
