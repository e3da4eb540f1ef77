"""Generated PostgreSQL stderr logs for the pg-log memory curves (benchmarks/bench_pglog.py).

A log of SHAPES distinct statement shapes (each its own libpg_query fingerprint: the table and
column names differ, spelled in letters so the shapes differ in more than their digits), used
with Zipf-like frequencies (shape k about 1/(k+10) as often as the first), each with its own
log-normal duration (median between 20 us and 20 ms, sigma 1, clipped to 10 us-900 ms), 200
entries per second of log time (so a 1.6 GB log spans about 17 hours, 1,000 minutes: the
per-minute series grows with the log, as on a real server). Literals vary on every line.

    python benchmarks/pglog_generate.py OUT.log --size-mb 100 --shapes 2000
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import numpy as np

PREFIX_FORMAT = "%m [%p] %q%u@%d "
ENTRIES_PER_SECOND = 200
_LETTERS = string.ascii_lowercase


def _name(number: int, width: int = 4) -> str:
    letters = []
    for _ in range(width):
        number, digit = divmod(number, 26)
        letters.append(_LETTERS[digit])
    return "".join(letters)


def shape_templates(shapes: int) -> list[str]:
    """One statement per shape with a '{}' where the literals go."""
    templates = []
    for shape in range(shapes):
        table, column = _name(shape), _name(shape * 7 + 3, 3)
        kind = shape % 4
        if kind == 0:
            templates.append(f"SELECT id, c_{column} FROM t_{table} WHERE id = {{0}}")
        elif kind == 1:
            templates.append(f"UPDATE t_{table} SET c_{column} = c_{column} + {{0}} WHERE id = {{1}}")
        elif kind == 2:
            templates.append(f"INSERT INTO t_{table} (id, c_{column}) VALUES ({{0}}, 'v{{1}}')")
        else:
            templates.append(f"SELECT count(*) FROM t_{table} WHERE c_{column} > {{0}} AND name = 'n{{1}}'")
    return templates


def write_log(path: Path, size_bytes: int, shapes: int, seed: int = 1, chunk_entries: int = 50_000) -> dict:
    """Write the log (plain stderr, Debian's default prefix); returns what was written."""
    generator = np.random.default_rng(seed)
    templates = shape_templates(shapes)
    weights = 1.0 / (np.arange(shapes) + 10.0)
    cumulative = np.cumsum(weights / weights.sum())
    medians_us = np.exp(generator.uniform(np.log(20), np.log(20_000), shapes))
    start_ms = int(np.datetime64("2026-11-30T00:00:00", "ms").astype(np.int64))
    written = entries = 0
    with open(path, "wb") as out:
        while written < size_bytes:
            shape = np.minimum(np.searchsorted(cumulative, generator.random(chunk_entries)), shapes - 1)
            durations_us = np.clip(medians_us[shape] * np.exp(generator.normal(0, 1, chunk_entries)),
                                   10, 900_000).astype(np.int64)
            times_ms = start_ms + (entries + np.arange(chunk_entries)) * (1000 // ENTRIES_PER_SECOND)
            stamps = np.datetime_as_string(times_ms.astype("datetime64[ms]"), unit="ms")
            literals = generator.integers(1, 10_000_000, (chunk_entries, 2))
            pids = generator.integers(1000, 1064, chunk_entries)
            lines = [
                f"{stamp[:10]} {stamp[11:]} UTC [{pid}] app@bench LOG:  duration: {us // 1000}.{us % 1000:03d} ms"
                f"  statement: {templates[k].format(a, b)}\n"
                for stamp, pid, us, k, a, b in zip(stamps.tolist(), pids.tolist(), durations_us.tolist(),
                                                   shape.tolist(), literals[:, 0].tolist(), literals[:, 1].tolist())]
            data = "".join(lines).encode()
            out.write(data)
            written += len(data)
            entries += chunk_entries
    return {"bytes": written, "entries": entries, "shapes": shapes,
            "minutes": entries // ENTRIES_PER_SECOND // 60 + 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--shapes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args()
    print(write_log(arguments.out, int(arguments.size_mb * 1e6), arguments.shapes, arguments.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
