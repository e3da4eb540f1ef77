"""core/deadman.py: the watchdogs' loop waits for the pipe to close, then retries until a deadline."""

from __future__ import annotations

import os
import threading
import time

from core.deadman import retry_until_deadline, undo_after_eof


def test_undo_runs_only_after_the_writer_closes_and_retries_until_it_works():
    read_fd, write_fd = os.pipe()
    events: list[str] = []
    failures_left = [2]

    def attempt() -> None:
        events.append("attempt")
        if failures_left[0]:
            failures_left[0] -= 1
            raise RuntimeError("balancer restarting")

    def close_writer_later() -> None:
        os.write(write_fd, b"still alive\n")
        time.sleep(0.2)
        events.append("closed")
        os.close(write_fd)

    closer = threading.Thread(target=close_writer_later)
    closer.start()
    with os.fdopen(read_fd, "rb", buffering=0) as stream:
        code = undo_after_eof(stream, attempt, retry_for_s=5.0, pause_s=0.01,
                              give_up=lambda error: events.append(f"gave up: {error}"))
    closer.join()
    assert code == 0
    assert events == ["closed", "attempt", "attempt", "attempt"]


def test_gives_up_after_the_deadline_with_the_last_error_even_if_recording_it_fails():
    errors: list[str] = []
    calls = [0]

    def attempt() -> None:
        calls[0] += 1
        raise RuntimeError(f"failure {calls[0]}")

    def give_up(error: Exception) -> None:
        errors.append(str(error))
        raise OSError("disk full")  # swallowed: the watchdog still exits with its code

    started_s = time.monotonic()
    assert retry_until_deadline(attempt, retry_for_s=0.15, pause_s=0.02, give_up=give_up) is False
    assert 0.15 <= time.monotonic() - started_s < 2.0
    assert calls[0] >= 3 and errors == [f"failure {calls[0]}"]
