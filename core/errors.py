"""Typed errors. Library code raises these; only agent/cli.py turns them into exit codes."""


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
