"""Bundle format 2 (syscalls per pid x syscall + syscall_buckets) and the reader's format 1 path,
on a bundle recorded by the format 1 agent (tests/fixtures/bundle_format1: a 3 s system-wide
audit on the test VM; only the syscalls table and its manifest kept, boot arguments scrubbed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from reports.bundle import BUNDLE_FORMAT, PROBE_STATUSES, Bundle

FORMAT1 = Path(__file__).with_name("fixtures") / "bundle_format1"


def test_format1_bundle_reads_as_format2_tables():
    bundle = Bundle(FORMAT1)
    assert bundle.format == 1 and BUNDLE_FORMAT == 2
    raw = pq.read_table(FORMAT1 / "syscalls.parquet")  # totals repeated on every bucket row
    syscalls = bundle.table("syscalls")
    pairs = {(pid, name) for pid, name in zip(raw.column("pid").to_pylist(), raw.column("syscall").to_pylist())}
    assert syscalls.num_rows == len(pairs) < raw.num_rows
    assert "bucket_count" not in syscalls.column_names
    # Oracle: the buckets of each pid x syscall add up to its count (how format 1 was written).
    buckets = bundle.table("syscall_buckets")
    assert bundle.has("syscall_buckets") and "syscall_buckets" in bundle.table_names()
    assert buckets.num_rows == raw.num_rows
    per_pair = buckets.group_by(["pid", "syscall"]).aggregate([("bucket_count", "sum")])
    summed = {(row["pid"], row["syscall"]): row["bucket_count_sum"] for row in per_pair.to_pylist()}
    counts = {(row["pid"], row["syscall"]): row["count"] for row in syscalls.to_pylist()}
    assert summed == counts
    # sum(count) is now the number of calls, not 1-36x it.
    assert pc.sum(syscalls.column("count")).as_py() == pc.sum(buckets.column("bucket_count")).as_py()
    assert pc.sum(raw.column("count")).as_py() > pc.sum(syscalls.column("count")).as_py()


def test_format1_bundle_stages_into_the_dataset_as_format2(tmp_path):
    from agent.fleet.layout import stage_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(FORMAT1, copy)
    staged = tmp_path / "staged"
    stage_bundle(copy, staged)
    tables = {path.parts[len(staged.parts)].removeprefix("table=") for path in staged.rglob("*.parquet")}
    assert {"syscalls", "syscall_buckets"} <= tables
    syscalls = pq.read_table(next(staged.glob("table=syscalls/*/*/*.parquet")))
    assert "bucket_count" not in syscalls.column_names


def test_partial_is_a_probe_status():
    assert "partial" in PROBE_STATUSES
