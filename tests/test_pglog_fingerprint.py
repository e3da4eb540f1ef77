"""The fingerprint cache never merges what libpg_query tells apart (nor splits what it joins).

Oracle: pglast's own fingerprint (libpg_query) of every generated statement, computed here
independently of the cache; the statements are generated shapes with identifiers that differ
only in digits, literals, comments holding quotes, E'' and $$ strings."""

from __future__ import annotations

import random
from collections import defaultdict

import pyarrow as pa
import pytest

from probes.pglog import analyse_logs
from probes.pglog.fingerprint import FingerprintCache

DIGITS_TO_ZERO = str.maketrans("0123456789", "0000000000")


def literal(rng: random.Random) -> str:
    choice = rng.randrange(6)
    if choice == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 10)))
    if choice == 1:
        return f"'{rng.choice(['a', 'it''s', 'x1', '--no', '/*'])}{rng.randrange(100)}'"
    if choice == 2:
        return f"E'q\\'{rng.randrange(100)}'"
    if choice == 3:
        return f"$${rng.randrange(100)} it's$$"
    if choice == 4:
        return f"{rng.randrange(1000)}.{rng.randrange(100)}"
    return f"${rng.randrange(1, 4)}"


def comment(rng: random.Random) -> str:
    return rng.choice(["", f" /* it's {rng.randrange(9)} */", f" -- don't {rng.randrange(9)}\n"])


def statement(rng: random.Random) -> str:
    table = rng.choice([f"t{rng.randrange(12)}", f'"T {rng.randrange(3)}"', "orders"])
    column = rng.choice([f"c{rng.randrange(4)}", "qty", f'"c {rng.randrange(2)}"'])
    shape = rng.randrange(10)
    if shape == 0:
        return f"SELECT {column} FROM {table}{comment(rng)} WHERE id = {literal(rng)}"
    if shape == 1:
        values = ", ".join(literal(rng) for _ in range(rng.randrange(1, 5)))
        return f"SELECT * FROM {table} WHERE {column} IN ({values})"
    if shape == 2:
        return f"UPDATE {table} SET {column} = {literal(rng)}{comment(rng)} WHERE k{rng.randrange(3)} = {literal(rng)}"
    if shape == 3:
        return f"INSERT INTO {table} ({column}) VALUES ({literal(rng)})"
    if shape == 4:
        return f"SELECT {column} FROM {table} ORDER BY {column} LIMIT {rng.randrange(1, 100)}"
    if shape == 5:
        return f"FETCH {rng.randrange(1, 50)} FROM cur{rng.randrange(3)}"
    if shape == 6:
        return f"SELECT {literal(rng)} AS a{rng.randrange(3)}, {literal(rng)}"
    if shape == 7:
        return rng.choice([f"MOVE {rng.randrange(9)} IN cur0", f"VACUUM {table}", f"LOCK {table}",
                           f"ALTER SEQUENCE s{rng.randrange(2)} RESTART WITH {rng.randrange(99)}",
                           f"COPY {table} FROM '/tmp/f{rng.randrange(9)}'"])
    if shape == 8:
        return f"EXECUTE p{rng.randrange(3)}({literal(rng)}, {literal(rng)})"
    return f"DECLARE cur{rng.randrange(2)} CURSOR FOR SELECT {column} FROM {table} WHERE a = {literal(rng)}"


def generated(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [statement(rng) for _ in range(count)]


def assert_same_partition(statements: list[str], ids: list[int]) -> None:
    from pglast import parser

    fingerprints_by_id = defaultdict(set)
    ids_by_fingerprint = defaultdict(set)
    for text, identifier in zip(statements, ids):
        fingerprint = parser.fingerprint(text)
        fingerprints_by_id[identifier].add(fingerprint)
        ids_by_fingerprint[fingerprint].add(identifier)
    merged = {i: f for i, f in fingerprints_by_id.items() if len(f) > 1}
    assert not merged, [s for s, i in zip(statements, ids) if i in merged][:6]
    assert all(len(found) == 1 for found in ids_by_fingerprint.values())
    assert len(ids_by_fingerprint) > 200  # the generator really makes many shapes


@pytest.mark.parametrize("with_digit_keys", [True, False])
def test_cache_partition_equals_libpg_query(with_digit_keys):
    statements = generated(4000, seed=15)
    cache = FingerprintCache()
    ids = []
    # Several blocks, so keys met in one block are reused by the next.
    for start in range(0, len(statements), 1000):
        block = statements[start:start + 1000]
        digit_keys = pa.array([s.translate(DIGITS_TO_ZERO) for s in block]) if with_digit_keys else None
        ids.extend(cache.ids(pa.array(block), digit_keys=digit_keys).to_pylist())
    assert_same_partition(statements, ids)
    assert cache.parser_calls < len(statements)  # the cache still saves parser calls


def test_log_rows_equal_libpg_query_fingerprints(tmp_path):
    """End to end through the fast path: one pg_queries row per libpg_query fingerprint."""
    from pglast import parser

    rng = random.Random(17)
    statements = [f"SELECT c{rng.randrange(30)} FROM t{rng.randrange(28)} WHERE id = {rng.randrange(10 ** 6)}"
                  for _ in range(3000)]
    lines = [f"2026-12-01 10:00:00.{i % 1000:03d} UTC [{100 + i % 50}] LOG:  duration: 0.{100 + i % 800} ms  "
             f"statement: {text}" for i, text in enumerate(statements)]
    log = tmp_path / "pg.log"
    log.write_text("\n".join(lines) + "\n")
    analysis = analyse_logs([log], prefix="%m [%p] ")
    rows = analysis.queries.to_pylist()
    expected = {parser.fingerprint(text) for text in statements}
    assert {row["fingerprint"] for row in rows} == expected
    assert sum(row["calls"] for row in rows) == len(statements)
