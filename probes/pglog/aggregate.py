"""Per-fingerprint aggregation of logged durations, with flat memory.

Percentiles are over executions (not over per-minute sums, as pgBadger does), from a histogram
that is exact to the microsecond below 100 ms (the log's own resolution) and keeps 4 significant
digits above (error < 0.1 %), so memory is bounded by the number of distinct durations, not by
the number of lines. Calls, totals and the maximum are exact.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from probes.pglog.fingerprint import FingerprintCache

SOURCE_STATEMENT, SOURCE_PLAN = 0, 1
COUNTED_KINDS = ("statement", "execute")
EXACT_BELOW_US = 100_000
PERCENTILES = (("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99), ("p999_ms", 0.999))

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


def duration_buckets_us(durations_us: np.ndarray) -> np.ndarray:
    """Histogram key per duration: exact below EXACT_BELOW_US, 4 significant digits above."""
    buckets = durations_us.copy()
    large = durations_us >= EXACT_BELOW_US
    if large.any():
        values = durations_us[large]
        step = 10 ** (np.floor(np.log10(values)).astype(np.int64) - 3)
        buckets[large] = (values // step) * step
    return buckets


def bucket_middle_us(bucket_us: int) -> int:
    """The middle of the histogram bucket whose key (lower edge) is bucket_us."""
    if bucket_us < EXACT_BELOW_US:
        return bucket_us
    step = 10 ** (int(math.floor(math.log10(bucket_us))) - 3)
    return bucket_us + step // 2


class DurationAggregator:
    """Accumulates (fingerprint id, source, minute, duration) blocks into compact partials."""

    COMPACT_EVERY = 16

    def __init__(self) -> None:
        self.histograms: list[pa.Table] = []
        self.minutes: list[pa.Table] = []
        self.durations_counted = 0

    def add(self, fingerprint_ids: pa.Array, sources: pa.Array, minutes: pa.Array,
            durations_us: pa.Array) -> None:
        if len(durations_us) == 0:
            return
        self.durations_counted += len(durations_us)
        buckets = pa.array(duration_buckets_us(durations_us.to_numpy(zero_copy_only=False)))
        table = pa.table({"fp": fingerprint_ids, "source": sources, "minute": minutes,
                          "us": durations_us, "bucket": buckets})
        self.histograms.append(table.group_by(["fp", "source", "bucket"], use_threads=False)
                               .aggregate([("us", "count")]).rename_columns(["fp", "source", "bucket", "n"]))
        self.minutes.append(table.group_by(["fp", "source", "minute"], use_threads=False)
                            .aggregate([("us", "count"), ("us", "sum"), ("us", "max"), ("us", "min")])
                            .rename_columns(["fp", "source", "minute", "n", "sum_us", "max_us", "min_us"]))
        if len(self.histograms) >= self.COMPACT_EVERY:
            self._compact()

    def _compact(self) -> None:
        if len(self.histograms) > 1:
            merged = pa.concat_tables(self.histograms)
            self.histograms = [merged.group_by(["fp", "source", "bucket"], use_threads=False)
                               .aggregate([("n", "sum")]).rename_columns(["fp", "source", "bucket", "n"])]
        if len(self.minutes) > 1:
            merged = pa.concat_tables(self.minutes)
            self.minutes = [merged.group_by(["fp", "source", "minute"], use_threads=False)
                            .aggregate([("n", "sum"), ("sum_us", "sum"), ("max_us", "max"), ("min_us", "min")])
                            .rename_columns(["fp", "source", "minute", "n", "sum_us", "max_us", "min_us"])]

    def finish(self, cache: FingerprintCache) -> tuple[pa.Table, pa.Table]:
        self._compact()
        if not self.minutes:
            return PG_QUERIES_SCHEMA.empty_table(), PG_QUERY_MINUTES_SCHEMA.empty_table()
        minutes = self.minutes[0]
        histogram = self.histograms[0]
        # auto_explain logs a plan for statements the duration log may also have counted; plans
        # only count for fingerprints that have no statement/execute entries at all.
        has_statement = set(pc.unique(pc.filter(minutes.column("fp"),
                                                pc.equal(minutes.column("source"), SOURCE_STATEMENT))).to_pylist())

        def keep(table: pa.Table) -> pa.Table:
            plan_shadowed = pc.and_(pc.equal(table.column("source"), SOURCE_PLAN),
                                    pc.is_in(table.column("fp"), pa.array(sorted(has_statement), pa.int32())))
            return table.filter(pc.invert(plan_shadowed))

        minutes, histogram = keep(minutes), keep(histogram)
        per_query = minutes.group_by(["fp", "source"], use_threads=False).aggregate(
            [("n", "sum"), ("sum_us", "sum"), ("max_us", "max"), ("min_us", "min"),
             ("minute", "min"), ("minute", "max")]).to_pydict()
        quantiles = histogram_quantiles(histogram)
        grand_total_us = sum(per_query["sum_us_sum"]) or 1
        rows = []
        for index, fp in enumerate(per_query["fp"]):
            calls = per_query["n_sum"][index]
            total_us = per_query["sum_us_sum"][index]
            row = {
                "fingerprint": cache.fingerprints[fp],
                "query": cache.queries[fp],
                "calls": calls,
                "total_ms": total_us / 1000.0,
                "mean_ms": total_us / 1000.0 / calls,
                "min_ms": per_query["min_us_min"][index] / 1000.0,
                "max_ms": per_query["max_us_max"][index] / 1000.0,
                "total_pct": 100.0 * total_us / grand_total_us,
                "first_minute": datetime.fromtimestamp(per_query["minute_min"][index] * 60, timezone.utc),
                "last_minute": datetime.fromtimestamp(per_query["minute_max"][index] * 60, timezone.utc),
                "source": "plan" if per_query["source"][index] == SOURCE_PLAN else "statement",
                "parsed": cache.parsed[fp],
                "example": cache.examples[fp] or None,
            }
            low_us, high_us = per_query["min_us_min"][index], per_query["max_us_max"][index]
            for name, value in quantiles.get((fp, per_query["source"][index]), {}).items():
                # A bucket above 100 ms stands for its whole 4-significant-digit step: report its
                # middle, and never a value outside the exact minimum and maximum.
                row[name] = min(max(bucket_middle_us(value), low_us), high_us) / 1000.0
            rows.append(row)
        rows.sort(key=lambda row: -row["total_ms"])
        queries = pa.Table.from_pylist(rows, schema=PG_QUERIES_SCHEMA)

        fingerprint_names = pa.array(cache.fingerprints, pa.string())
        series = minutes.group_by(["fp", "minute"], use_threads=False).aggregate(
            [("n", "sum"), ("sum_us", "sum"), ("max_us", "max")])
        series = series.sort_by([("fp", "ascending"), ("minute", "ascending")])
        total_ms = pc.divide(pc.cast(series.column("sum_us_sum"), pa.float64()), 1000.0)
        minute_table = pa.table({
            "fingerprint": pc.take(fingerprint_names, series.column("fp")),
            "minute": pc.cast(pc.multiply(series.column("minute"), 60), pa.timestamp("s", tz="UTC")),
            "calls": series.column("n_sum"),
            "total_ms": total_ms,
            "mean_ms": pc.divide(total_ms, pc.cast(series.column("n_sum"), pa.float64())),
            "max_ms": pc.divide(pc.cast(series.column("max_us_max"), pa.float64()), 1000.0),
        }, schema=PG_QUERY_MINUTES_SCHEMA)
        return queries, minute_table


def histogram_quantiles(histogram: pa.Table) -> dict[tuple[int, int], dict[str, int]]:
    """Nearest-rank percentiles per (fp, source): the smallest duration d such that at least
    ceil(p * calls) executions took <= d."""
    if histogram.num_rows == 0:
        return {}
    ordered = histogram.sort_by([("fp", "ascending"), ("source", "ascending"), ("bucket", "ascending")])
    fp = ordered.column("fp").to_numpy()
    source = ordered.column("source").to_numpy()
    bucket = ordered.column("bucket").to_numpy()
    counts = ordered.column("n").to_numpy()
    group_key = fp.astype(np.int64) * 4 + source.astype(np.int64)
    starts = np.flatnonzero(np.r_[True, group_key[1:] != group_key[:-1]])
    ends = np.r_[starts[1:], len(group_key)]
    results = {}
    for start, end in zip(starts, ends):
        cumulative = np.cumsum(counts[start:end])
        total = int(cumulative[-1])
        values = {}
        for name, fraction in PERCENTILES:
            rank = max(1, math.ceil(fraction * total - 1e-9))
            values[name] = int(bucket[start + int(np.searchsorted(cumulative, rank))])
        results[(int(fp[start]), int(source[start]))] = values
    return results
