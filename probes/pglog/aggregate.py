"""Per-fingerprint aggregation of logged durations, with memory flat in the log's size.

Percentiles are over executions (not over per-minute sums, as pgBadger does): exact (every
duration kept) while a fingerprint has at most RAW_LIMIT calls, then from a fixed log-linear
histogram row exact to the microsecond below 1.024 ms and within 0.78 % above
(probes/pglog/histogram.py), clamped to the exact min and max. Calls, totals, min and max are
exact. See DurationAggregator for the caps (fingerprints, per-minute cells).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from probes.pglog.fingerprint import FingerprintCache
from probes.pglog.histogram import PERCENTILES, HistogramRows, grouped_percentiles_us

SOURCE_STATEMENT, SOURCE_PLAN = 0, 1
COUNTED_KINDS = ("statement", "execute")

PG_QUERIES_SCHEMA = pa.schema([
    ("fingerprint", pa.string()),
    ("query", pa.string()),
    ("calls", pa.int64()),
    ("total_ms", pa.float64()),
    ("mean_ms", pa.float64()),
    ("min_ms", pa.float64()),
    ("p50_ms", pa.float64()),
    ("p90_ms", pa.float64()),
    ("p99_ms", pa.float64()),
    ("p999_ms", pa.float64()),
    ("max_ms", pa.float64()),
    ("total_pct", pa.float64()),
    ("first_minute", pa.timestamp("s", tz="UTC")),
    ("last_minute", pa.timestamp("s", tz="UTC")),
    ("source", pa.string()),
    ("parsed", pa.bool_()),
    ("example", pa.string()),
])

PG_QUERY_MINUTES_SCHEMA = pa.schema([
    ("fingerprint", pa.string()),
    ("minute", pa.timestamp("s", tz="UTC")),
    ("calls", pa.int64()),
    ("total_ms", pa.float64()),
    ("mean_ms", pa.float64()),
    ("max_ms", pa.float64()),
    ("bucket_s", pa.int32()),   # width of the row's time bucket: 60 unless the series was widened
])

PG_LOG_ERRORS_SCHEMA = pa.schema([
    ("category", pa.string()),
    ("count", pa.int64()),
    ("file", pa.string()),
    ("first_line", pa.int64()),
    ("examples", pa.list_(pa.string())),
])

_OFFSET = re.compile(r"^([+-])(\d{1,2}):?(\d{2})?$")


def zone_offset_s(zone: str) -> int | None:
    """Seconds east of UTC for a zone as PostgreSQL prints it, or None when unknown."""
    if zone in ("UTC", "GMT", "Z", "UCT", ""):
        return 0
    match = _OFFSET.match(zone)
    if match:
        sign = -1 if match.group(1) == "-" else 1
        return sign * (int(match.group(2)) * 3600 + int(match.group(3) or 0) * 60)
    try:
        from zoneinfo import ZoneInfo

        # Abbreviations like CET/EST exist as fixed zones in tzdata; DST-ambiguous ones may not.
        offset = datetime(2000, 1, 1, tzinfo=ZoneInfo(zone)).utcoffset()
        return int(offset.total_seconds()) if offset is not None else None
    except Exception:
        return abbreviation_offsets_s().get(zone)


_ABBREVIATIONS: dict[str, int] | None = None


def abbreviation_offsets_s() -> dict[str, int]:
    """Zone abbreviations (CEST, MSK, EEST, JST...) that mean one UTC offset in every zone of the
    system's tz database over recent years (January and July of 2020-2026). Abbreviations that
    mean several offsets (IST: India, Ireland, Israel; CST: America, China) are left out, so
    they are reported as unknown instead of being guessed."""
    global _ABBREVIATIONS
    if _ABBREVIATIONS is None:
        from zoneinfo import ZoneInfo, available_timezones

        offsets: dict[str, set[int]] = {}
        for name in available_timezones():
            try:
                zone = ZoneInfo(name)
            except Exception:
                continue
            for year in range(2020, 2027):
                for month in (1, 7):
                    moment = datetime(year, month, 15, 12, tzinfo=zone)
                    abbreviation, offset = moment.tzname(), moment.utcoffset()
                    if abbreviation and abbreviation[0].isalpha() and offset is not None:
                        offsets.setdefault(abbreviation, set()).add(int(offset.total_seconds()))
        _ABBREVIATIONS = {abbreviation: found.pop() for abbreviation, found in offsets.items() if len(found) == 1}
    return _ABBREVIATIONS


class MinuteResolver:
    """Turns (minute, zone) strings into UTC epoch minutes, parsing each distinct value once."""

    def __init__(self) -> None:
        self.cache: dict[str, int] = {}
        self.unknown_zones: set[str] = set()

    def epoch_minutes(self, entries: pa.Table) -> pa.Array:
        if "epoch" in entries.column_names and entries.num_rows:
            seconds = pc.cast(entries.column("epoch"), pa.int64())
            return pc.divide(seconds, 60)
        keys = pc.binary_join_element_wise(entries.column("minute"), entries.column("zone"), " ")
        encoded = pc.dictionary_encode(keys).combine_chunks()
        values = []
        for key in encoded.dictionary.to_pylist():
            minute = self.cache.get(key)
            if minute is None:
                minute = self._parse(key)
                self.cache[key] = minute
            values.append(minute)
        return pc.take(pa.array(values, pa.int64()), encoded.indices)

    def epoch_minute(self, key: str) -> int:
        minute = self.cache.get(key)
        if minute is None:
            minute = self._parse(key)
            self.cache[key] = minute
        return minute

    def _parse(self, key: str) -> int:
        stamp, zone = key[:16], key[17:]
        try:
            local = datetime.strptime(stamp, "%Y-%m-%d %H:%M")
        except ValueError:
            return 0
        offset = zone_offset_s(zone)
        if offset is None:
            self.unknown_zones.add(zone)
            offset = 0
        utc = local.replace(tzinfo=timezone.utc) - timedelta(seconds=offset)
        return int(utc.timestamp()) // 60


# -- the aggregator --------------------------------------------------------------------------------
# State per fingerprint only: exact calls/sum/min/max/first/last per slot, the raw
# durations of slots with few calls (exact percentiles while small), one fixed histogram row per
# slot past that (probes/pglog/histogram.py, 5.9 kB), and per-minute cells whose total is capped
# by widening the series' buckets. None of it grows with the number of lines.
OTHER_SLOT = 0                       # the row the rarest shapes fold into past the cap
DEFAULT_MAX_FINGERPRINTS = 100_000
# 32 bytes a cell, and the finish turns each into a pg_query_minutes row (~100 bytes while it is
# built): 400,000 cells hold 2,000 busy shapes at 5-minute buckets for 16 hours (pgBadger's own
# default resolution), in ~13 MB while reading.
DEFAULT_MAX_MINUTE_CELLS = 400_000
# Slots with at most this many calls keep every duration (16 bytes each: up to 1 kB, a sixth
# of a histogram row; many shapes are called this rarely, and their percentiles stay exact).
RAW_LIMIT = 64
MINUTE_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 240, 360, 720, 1440)
_MINUTE_BITS = 27                    # minutes since 1970 fit until the year 2225
_MINUTE_MASK = (1 << _MINUTE_BITS) - 1
_BIG = np.iinfo(np.int64).max


def _numpy(values) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        values = values.to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.int64)


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def reduce_by_key(keys: np.ndarray, columns: list[np.ndarray], reducers: tuple[str, ...],
                  already_sorted: bool = False):
    """(unique sorted keys, each column reduced per key with 'sum' or 'max')."""
    if len(keys) == 0:
        return keys, columns
    order = None if already_sorted else np.argsort(keys, kind="stable")  # sorted: no gathered copies
    ordered = keys if order is None else keys[order]
    starts = _group_starts(ordered)
    # One column gathered at a time: the working copies are one column, not all of them.
    reduced = [(np.add if reducer == "sum" else np.maximum).reduceat(column if order is None else column[order], starts)
               for column, reducer in zip(columns, reducers)]
    return ordered[starts], reduced


class SparseCells:
    """int64-keyed cells with integer columns; blocks are reduced on arrival and merged into
    the state when they outgrow a quarter of it (so merging costs O(state) amortised per row)."""

    def __init__(self, reducers: tuple[str, ...]):
        self.reducers = reducers
        self.keys = np.empty(0, np.int64)
        self.columns = [np.empty(0, np.int64) for _ in reducers]
        self.pending: list[tuple[np.ndarray, list[np.ndarray]]] = []
        self.pending_rows = 0

    @property
    def rows(self) -> int:
        return len(self.keys) + self.pending_rows

    def add(self, keys: np.ndarray, columns: list[np.ndarray]) -> None:
        keys, columns = reduce_by_key(keys, columns, self.reducers)
        self.pending.append((keys, columns))
        self.pending_rows += len(keys)

    def due(self) -> bool:
        # A quarter of the state (at least 131,072 rows): merging stays O(state) per row
        # amortised, and the pending blocks and their merge copies stay small next to the state.
        return self.pending_rows >= max(1 << 17, len(self.keys) // 4)

    def compact(self, remap=None, keeps_order: bool = False) -> None:
        """Merge pending blocks into the state; `remap` rewrites every key first (`keeps_order`:
        it never reorders keys, as widening the minutes does, so no sort is needed)."""
        self._merge_pending()
        if remap is not None:
            keys, columns = remap(self.keys), self.columns
            self.release()   # only the remapped keys and the columns are held while reducing
            self.keys, self.columns = reduce_by_key(keys, columns, self.reducers, already_sorted=keeps_order)

    def release(self) -> None:
        self.keys, self.columns = np.empty(0, np.int64), [np.empty(0, np.int64) for _ in self.reducers]

    def _merge_pending(self) -> None:
        """Pending cells into the sorted state in place: matching keys are updated where they
        are, and only new keys cost a copy of the state (rare once the histogram is full)."""
        if not self.pending:
            return
        keys = np.concatenate([block[0] for block in self.pending])
        columns = [np.concatenate([block[1][index] for block in self.pending]) for index in range(len(self.reducers))]
        self.pending, self.pending_rows = [], 0
        keys, columns = reduce_by_key(keys, columns, self.reducers)
        if len(self.keys) == 0:
            self.keys, self.columns = keys, columns
            return
        position = np.searchsorted(self.keys, keys)
        match = self.keys[np.minimum(position, len(self.keys) - 1)] == keys
        hit = position[match]
        for state, column, reducer in zip(self.columns, columns, self.reducers):
            if reducer == "sum":
                state[hit] += column[match]
            else:
                state[hit] = np.maximum(state[hit], column[match])
        new = ~match
        if new.any():
            at = position[new]
            self.keys = np.insert(self.keys, at, keys[new])
            # Column by column, each old one freed as its copy is made (the peak is one column).
            for index, column in enumerate(columns):
                self.columns[index] = np.insert(self.columns[index], at, column[new])


class DurationAggregator:
    """Accumulates (fingerprint id, source, minute, duration) blocks into bounded state.

    A slot is (fingerprint id + 1) * 2 + source; slot 0 is "other". When more than
    `max_fingerprints` slots have calls, the rarest so far are folded into "other" (down to 90 %
    of the cap, so folding is rare) and their later executions go there too: a streaming
    choice, said in the finding. When the per-minute cells exceed `max_minute_cells`, the
    series' buckets widen (1, 2, 5, 10, 15, 30, 60 ... minutes) and the bundle says so."""

    def __init__(self, max_fingerprints: int = DEFAULT_MAX_FINGERPRINTS,
                 max_minute_cells: int = DEFAULT_MAX_MINUTE_CELLS) -> None:
        self.max_fingerprints = max_fingerprints
        self.max_minute_cells = max_minute_cells
        self.durations_counted = 0
        self.folded_shapes = 0
        self.width_index = 0
        self._size = 0
        # Per-slot arrays, empty until _grow sizes them (one row per fingerprint x source).
        empty = np.zeros(0, dtype=np.int64)
        self.calls = self.sum_us = self.min_us = self.max_us = empty
        self.first_minute = self.last_minute = empty
        self.seen = np.zeros(0, dtype=bool)
        self.route = empty
        self._grow(1024)
        self.histogram = HistogramRows()
        self.minute_cells = SparseCells(("sum", "sum", "max"))
        self.raw_slots: list[np.ndarray] = []
        self.raw_us: list[np.ndarray] = []
        self.raw_rows = 0                # durations in raw_slots/raw_us
        self.raw_settled_rows = 0        # of which already checked against RAW_LIMIT

    @property
    def minute_width(self) -> int:
        return MINUTE_WIDTHS[self.width_index]

    def _grow(self, size: int) -> None:
        if size <= self._size:
            return
        size = max(size, 2 * self._size)
        old = self._size

        def extended(array, fill, dtype=np.int64):
            new = np.full(size, fill, dtype=dtype)
            if old:
                new[:old] = array
            return new

        self.calls = extended(self.calls, 0)
        self.sum_us = extended(self.sum_us, 0)
        self.min_us = extended(self.min_us, _BIG)
        self.max_us = extended(self.max_us, 0)
        self.first_minute = extended(self.first_minute, _BIG)
        self.last_minute = extended(self.last_minute, 0)
        self.seen = extended(self.seen, False, bool)
        route = np.arange(size, dtype=np.int64)
        if old:
            route[:old] = self.route
        self.route = route
        self._size = size

    def add(self, fingerprint_ids, sources, minutes, durations_us) -> None:
        us = _numpy(durations_us)
        if len(us) == 0:
            return
        self.durations_counted += len(us)
        original = (_numpy(fingerprint_ids) + 1) * 2 + _numpy(sources)
        self._grow(int(original.max()) + 1)
        self.seen[original] = True
        slots = self.route[original]
        minute = np.maximum(_numpy(minutes), 0)
        self._add_exact(slots, us, minute)
        width = self.minute_width
        self.minute_cells.add((slots << _MINUTE_BITS) | (minute // width * width),
                              [np.ones(len(us), np.int64), us, us])
        # A duration goes raw while its slot has few calls, else to the slot's histogram row; a
        # slot's earlier raw durations follow into the row when the raw ones are settled.
        small = self.calls[slots] <= RAW_LIMIT
        if small.any():
            self.raw_slots.append(slots[small])
            self.raw_us.append(us[small])
            self.raw_rows += int(small.sum())
        if not small.all():
            busy = slots[~small]
            self.histogram.add(busy, us[~small])
        if self.minute_cells.due() or self.raw_rows - self.raw_settled_rows >= max(1 << 18, self.raw_settled_rows):
            self._compact()

    def _settle_raw(self) -> None:
        """Raw durations of slots past RAW_LIMIT calls move into their histogram rows."""
        if not self.raw_slots:
            return
        slots, us = np.concatenate(self.raw_slots), np.concatenate(self.raw_us)
        busy = self.calls[slots] > RAW_LIMIT
        if busy.any():
            self.histogram.add(slots[busy], us[busy])
            slots, us = slots[~busy], us[~busy]
        self.raw_slots, self.raw_us = [slots], [us]
        self.raw_rows = self.raw_settled_rows = len(slots)

    def _add_exact(self, slots: np.ndarray, us: np.ndarray, minute: np.ndarray) -> None:
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        starts = _group_starts(ordered)
        unique = ordered[starts]
        self.calls[unique] += np.diff(np.r_[starts, len(ordered)])
        self.sum_us[unique] += np.add.reduceat(us[order], starts)
        self.min_us[unique] = np.minimum(self.min_us[unique], np.minimum.reduceat(us[order], starts))
        self.max_us[unique] = np.maximum(self.max_us[unique], np.maximum.reduceat(us[order], starts))
        self.first_minute[unique] = np.minimum(self.first_minute[unique], np.minimum.reduceat(minute[order], starts))
        self.last_minute[unique] = np.maximum(self.last_minute[unique], np.maximum.reduceat(minute[order], starts))

    def _compact(self) -> None:
        self.minute_cells.compact()
        self._settle_raw()
        while self.minute_cells.rows > self.max_minute_cells and self.width_index + 1 < len(MINUTE_WIDTHS):
            self.width_index += 1
            width = self.minute_width
            self.minute_cells.compact(lambda keys: (keys & ~_MINUTE_MASK) | ((keys & _MINUTE_MASK) // width * width),
                                      keeps_order=True)
        active = np.flatnonzero(self.calls[1:self._size] > 0) + 1
        # Plans of fingerprints that also have statement entries are dropped at the end: they
        # neither count toward the cap nor fold (their calls would count twice in "other").
        active = active[~((active % 2 == 1) & self.seen[active - 1])]
        if len(active) > self.max_fingerprints:
            self._fold(active)

    def _fold(self, active: np.ndarray) -> None:
        keep = int(self.max_fingerprints * 0.9)
        folded = active[np.argsort(self.calls[active], kind="stable")][: len(active) - keep]
        self.folded_shapes += len(folded)
        other = OTHER_SLOT
        self.calls[other] += self.calls[folded].sum()
        self.sum_us[other] += self.sum_us[folded].sum()
        self.min_us[other] = min(self.min_us[other], self.min_us[folded].min())
        self.max_us[other] = max(self.max_us[other], self.max_us[folded].max())
        self.first_minute[other] = min(self.first_minute[other], self.first_minute[folded].min())
        self.last_minute[other] = max(self.last_minute[other], self.last_minute[folded].max())
        self.calls[folded], self.sum_us[folded], self.max_us[folded] = 0, 0, 0
        self.min_us[folded], self.first_minute[folded], self.last_minute[folded] = _BIG, _BIG, 0
        # Slots already folded route to "other": every key is rewritten through the route.
        self.route[folded] = other
        self.route = self.route[self.route]
        route = self.route
        self.histogram.fold(folded, other)
        self.minute_cells.compact(lambda keys: (route[keys >> _MINUTE_BITS] << _MINUTE_BITS) | (keys & _MINUTE_MASK))
        if self.raw_slots:
            self.raw_slots = [route[np.concatenate(self.raw_slots)]]
            self.raw_us = [np.concatenate(self.raw_us)]
            self._settle_raw()   # "other" may be past RAW_LIMIT now

    def _percentiles_us(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Exact from the raw durations for slots with few calls, else from the histogram;
        clamped to the exact min and max."""
        result = {name: np.zeros(len(slots), np.int64) for name, _ in PERCENTILES}
        calls = self.calls[slots]
        small = calls <= RAW_LIMIT
        if small.any():
            raw_slots, raw_us = np.concatenate(self.raw_slots), np.concatenate(self.raw_us)
            order = np.lexsort((raw_us, raw_slots))
            found = grouped_percentiles_us(raw_slots[order], raw_us[order], np.ones(len(order), np.int64),
                                           slots[small], calls[small])
            for name in result:
                result[name][small] = found[name]
        if (~small).any():
            found = self.histogram.percentiles_us(slots[~small])
            for name in result:
                result[name][~small] = found[name]
        for name in result:
            result[name] = np.clip(result[name], self.min_us[slots], self.max_us[slots])
        return result

    def finish(self, cache: FingerprintCache) -> tuple[pa.Table, pa.Table]:
        self._compact()
        size = self._size
        # auto_explain logs a plan for statements the duration log may also have counted; plans
        # only count for fingerprints that have no statement/execute entries at all.
        shadowed = np.zeros(size, dtype=bool)
        plan_slots = np.arange(3, size, 2)
        shadowed[plan_slots] = self.seen[plan_slots - 1]
        slots = np.flatnonzero((self.calls[:size] > 0) & ~shadowed)
        if len(slots) == 0:
            return PG_QUERIES_SCHEMA.empty_table(), PG_QUERY_MINUTES_SCHEMA.empty_table()
        names, queries, parsed, examples = self._labels(slots, cache)
        calls = self.calls[slots]
        total_us = self.sum_us[slots]
        grand_total_us = int(total_us.sum()) or 1
        percentiles = self._percentiles_us(slots)
        columns = {
            "fingerprint": names, "query": queries, "calls": calls,
            "total_ms": total_us / 1000.0, "mean_ms": total_us / 1000.0 / calls,
            "min_ms": self.min_us[slots] / 1000.0,
            **{name: values / 1000.0 for name, values in percentiles.items()},
            "max_ms": self.max_us[slots] / 1000.0,
            "total_pct": 100.0 * total_us / grand_total_us,
            "first_minute": pa.array(self.first_minute[slots] * 60, pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            "last_minute": pa.array(self.last_minute[slots] * 60, pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            "source": ["plan" if slot % 2 else "statement" for slot in slots.tolist()],
            "parsed": pa.array(parsed, pa.bool_()), "example": pa.array(examples, pa.string()),
        }
        queries_table = pa.table(columns, schema=PG_QUERIES_SCHEMA)
        queries_table = queries_table.take(pc.sort_indices(queries_table, [("total_ms", "descending")]))
        # The histogram is done with: free it before the minute table is built (the finish is
        # the run's peak otherwise).
        self.histogram.release()
        self.raw_slots, self.raw_us, self.raw_rows, self.raw_settled_rows = [], [], 0, 0
        minute_table = self._minute_table(shadowed, dict(zip(slots.tolist(), names)))
        self.minute_cells.release()
        return queries_table, minute_table

    def _labels(self, slots: np.ndarray, cache: FingerprintCache):
        names, queries, parsed, examples = [], [], [], []
        for slot in slots.tolist():
            if slot == OTHER_SLOT:
                names.append("other")
                queries.append(f"(the {self.folded_shapes:,} rarest statement shapes beyond "
                               f"{self.max_fingerprints:,} fingerprints)")
                parsed.append(None)
                examples.append(None)
                continue
            fingerprint = slot // 2 - 1
            names.append(cache.fingerprints[fingerprint])
            queries.append(cache.queries[fingerprint])
            parsed.append(cache.parsed[fingerprint])
            examples.append(cache.examples[fingerprint] or None)
        return names, queries, parsed, examples

    def _minute_table(self, shadowed: np.ndarray, name_of_slot: dict[int, str]) -> pa.Table:
        keys = self.minute_cells.keys
        calls, sum_us, max_us = self.minute_cells.columns
        slot = keys >> _MINUTE_BITS
        kept = ~shadowed[slot]
        if not kept.all():
            slot, keys, calls, sum_us, max_us = (array[kept] for array in (slot, keys, calls, sum_us, max_us))
        # Keys are sorted by slot: each slot's rows are one run, named once.
        starts = _group_starts(slot) if len(slot) else np.empty(0, np.int64)
        run_index = np.zeros(len(slot), np.int32)
        run_index[starts[1:]] = 1
        names = pa.array([name_of_slot[int(s)] for s in slot[starts]], pa.string())
        total_ms = sum_us / 1000.0
        return pa.table({
            "fingerprint": names.take(pa.array(np.cumsum(run_index, dtype=np.int32))),
            "minute": pa.array((keys & _MINUTE_MASK) * 60, pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            "calls": calls, "total_ms": total_ms, "mean_ms": total_ms / calls,
            "max_ms": max_us / 1000.0,
            "bucket_s": np.full(len(slot), self.minute_width * 60, np.int32),
        }, schema=PG_QUERY_MINUTES_SCHEMA)
