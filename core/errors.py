"""Typed errors and the exit codes they map to. Library code raises these; only agent/cli.py
turns them into exit codes (and is the only module that calls sys.exit)."""

# The CLI's exit codes, documented in `guardian-agent --help`.
EXIT_OK = 0
EXIT_FAILED = 1         # the work failed, or the gate failed
EXIT_BAD_INPUT = 2      # bad input or usage: nothing was written or changed
EXIT_DRIFT = 3          # drift found (tune plan/status; rollback kept values changed by others)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM before the command finished (128 + SIGINT)


class GuardianError(Exception):
    """Base class: the message is one clear line meant for the user."""

    exit_code = 1


class BadInput(GuardianError):
    """The user gave something we cannot use (flag, file, profile, DSN...). Exit 2."""

    exit_code = 2


class WorkFailed(GuardianError):
    """The work itself failed (nothing wrong with the input). Exit 1."""

    exit_code = 1


class Unavailable(GuardianError):
    """A probe cannot run on this host. The message names the missing piece as an action."""

    exit_code = 1
