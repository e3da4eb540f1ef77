"""Dead man's switch for a rollout driver: `python -m agent.rollout.watchdog JOURNAL RUN_ID`.

Started by the driver in its own session with the read end of a pipe on stdin. When stdin reaches
EOF the driver is gone (finished, crashed or SIGKILLed: the kernel closes its pipe either way).
If the journal then shows no terminal record for the run, traffic goes back to blue. Retries for a
while because the balancer may be briefly unreachable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from core.deadman import undo_after_eof

RETRY_FOR_S = 60.0


def restore_blue_unless_finished(journal_path: Path, run_id: str) -> None:
    # Imported once the driver is gone, not while the watchdog idles beside a live rollout.
    from agent.rollout.driver import restore_blue_from_journal
    from agent.rollout.journal import last_run

    state = last_run(journal_path)
    if state.run_id != run_id or state.terminal is not None:
        return
    # The driver either died, or exited after its own rollback failed (it says so in the journal):
    # the record says which, and that the driver is gone (its pipe closed).
    failed = state.last_of("rollback_error")
    reason = ("driver died mid-rollout" if failed is None
              else f"the driver's own rollback failed ({failed.get('error', '?')})") + ": watchdog restored blue"
    restore_blue_from_journal(journal_path, reason, "rolled_back", driver_alive=False)


def record_error(journal_path: Path, run_id: str, error: Exception) -> None:
    from agent.rollout.journal import Journal

    Journal(journal_path).append("watchdog_error", run_id=run_id, error=str(error))


def main(argv: list[str]) -> int:
    journal_path, run_id = Path(argv[0]), argv[1]
    return undo_after_eof(sys.stdin.buffer, lambda: restore_blue_unless_finished(journal_path, run_id),
                          retry_for_s=RETRY_FOR_S, pause_s=0.5,
                          give_up=lambda error: record_error(journal_path, run_id, error))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
