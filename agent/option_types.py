"""Click parameter types shared by every command (re-exported by agent/cli.py).

A module of its own, not agent/cli.py itself: the command modules need these at import time,
and agent/cli.py imports the command modules, so a type defined there would be a circular import.
"""

from __future__ import annotations

import math

import click

WEEK_S = 7 * 24 * 3600.0


class Seconds(click.ParamType):
    """A finite, bounded number of seconds. Python's float() takes 'nan', 'inf' and '1e12', and
    every one of those reached the window code (nan compares false with everything, so a
    `duration <= 0` check let it through)."""

    name = "seconds"

    def __init__(self, max_s: float = WEEK_S, min_s: float = 0.0):
        self.max_s = max_s
        self.min_s = min_s

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            try:
                number = float(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r}: give a finite number of seconds", param, ctx)
        if not self.min_s < number <= self.max_s:
            self.fail(f"{value!r}: give more than {self.min_s:g} and at most {self.max_s:g} seconds", param, ctx)
        return number


WINDOW_SECONDS = Seconds(WEEK_S)
INTERVAL_SECONDS = Seconds(3600.0)
