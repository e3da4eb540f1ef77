"""`guardian-agent compact`: one sorted zstd Parquet file per table × date × host partition.

A timer on every host writes one small file per table per run; a thousand hosts make hundreds
of thousands of files a day, and every engine pays per file. Compaction rewrites a partition's
run files into one file, sorted by run_id (row-group statistics then let readers skip runs).

Readers never see a partition with rows missing or doubled: the new file is written into a new
version directory under ROOT/_compacted/ (outside every reader's `table=*` glob), and the
partition path itself is swapped in one atomic step for a symlink to it — renameat2 with
RENAME_EXCHANGE the first time, when the partition is still a real directory (Linux 3.15+), and
a plain rename over the old symlink afterwards. DuckDB, pyarrow, polars and Spark follow the link.

A crash loses nothing: before the swap, the partition's file list is journalled (core.journal);
`compact` finishes or undoes an unfinished partition before doing anything else. Runs that an
uploader adds to the old directory while it is being compacted are moved into the new version
after the swap (invisible for a moment, never doubled, never lost).

S3 has no atomic multi-object swap, so an s3:// dataset is compacted with a catalog instead
(`--catalog URI`, iceberg.py): landed runs move into Apache Iceberg tables under ROOT/_iceberg,
and the catalog's compare-and-swap of each table's metadata pointer is the one atomic step.
Without a catalog an s3:// dataset is refused. A local dataset can use either way.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic import atomic_path, fsync_dir
from core.errors import BadInput, WorkFailed
from core.journal import append_record, read_journal_records

COMPACTED_DIR = "_compacted"
JOURNAL_NAME = "compact.journal"
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100
SORT_KEYS = ("run_id", "ts", "cpu", "pid")


@dataclass
class CompactReport:
    partitions: int = 0
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    recovered: int = 0


def exchange_paths(first: Path, second: Path) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); glibc 2.28+ has the wrapper."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE)
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"renameat2({first}, {second}): {os.strerror(error)}")


def kill_point(name: str) -> None:
    """Tests SIGKILL the process here (GUARDIAN_AGENT_KILL_AT=compact:NAME), as tune does."""
    if os.environ.get("GUARDIAN_AGENT_KILL_AT") == f"compact:{name}":
        os.kill(os.getpid(), 9)


def partitions(root: Path, cutoff: date) -> list[Path]:
    """Partitions (table=T/date=D/host=H) whose date is `cutoff` or earlier."""
    found = []
    for partition in sorted(root.glob("table=*/date=*/host=*")):
        try:
            day = date.fromisoformat(partition.parent.name.split("=", 1)[1])
        except ValueError:
            continue
        if day <= cutoff and partition.is_dir():
            found.append(partition)
    return found


def run_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".parquet"))


def sorted_rows(table: pa.Table, leading: tuple[str, ...] = ()) -> pa.Table:
    """Rows in run order, so row-group statistics let readers skip whole runs."""
    keys = [name for name in leading + SORT_KEYS if name in table.column_names]
    return table.sort_by([(key, "ascending") for key in keys]) if keys else table


def merged_table(directory: Path, names: list[str]) -> pa.Table:
    tables = [pq.read_table(directory / name) for name in names]
    # Runs written by different agent versions may carry extra columns: unify, never drop.
    return sorted_rows(pa.concat_tables(tables, promote_options="permissive"))


def version_dir(root: Path, partition: Path) -> Path:
    relative = partition.relative_to(root)
    return root / COMPACTED_DIR / relative / f"v{time.time_ns()}"


def compact_partition(root: Path, partition: Path, journal: Path, report: CompactReport) -> None:
    current = partition.resolve()
    names = run_files(current)
    if len(names) <= 1:
        return
    table = merged_table(current, names)
    target = version_dir(root, partition)
    target.mkdir(parents=True)
    with atomic_path(target / f"compacted-{target.name}.parquet") as temp:
        pq.write_table(table, temp, compression="zstd", row_group_size=128 * 1024, write_statistics=True)
    link_text = os.path.relpath(target, partition.parent)
    swap = root / COMPACTED_DIR / f".swap-{target.name}"
    os.symlink(link_text, swap)
    append_record(journal, {"op": "swap", "partition": str(partition.relative_to(root)),
                            "old": str(current), "new": str(target), "swap": str(swap), "files": names})
    kill_point("before-swap")
    if partition.is_symlink():
        os.replace(swap, partition)  # atomic: rename over the old link
        old = current
    else:
        exchange_paths(swap, partition)  # the partition is now the link; `swap` holds the old dir
        old = swap
    fsync_dir(partition.parent)
    kill_point("after-swap")
    finish_swap(Path(old), target, set(names))
    append_record(journal, {"op": "done", "partition": str(partition.relative_to(root))})
    report.partitions += 1
    report.files_before += len(names)
    report.files_after += 1
    report.rows += table.num_rows


def finish_swap(old: Path, new: Path, compacted: set[str]) -> None:
    """Move runs that arrived in the old directory during compaction, then drop it."""
    if old.is_dir() and not old.is_symlink():
        for name in run_files(old):
            if name not in compacted:
                os.replace(old / name, new / name)
        shutil.rmtree(old)
    elif old.is_symlink():
        old.unlink()


def recover(root: Path, journal: Path) -> int:
    """Finish or undo every partition a crashed compaction left between its two records."""
    if not journal.exists():
        return 0
    contents = read_journal_records(journal)
    pending: dict[str, dict] = {}
    for record in contents.records:
        if record.get("op") == "swap":
            pending[record["partition"]] = record
        elif record.get("op") == "done":
            pending.pop(record["partition"], None)
    for relative, record in pending.items():
        partition, new = root / relative, Path(record["new"])
        swapped = partition.is_symlink() and partition.resolve() == new.resolve()
        if swapped:
            old = Path(record["swap"]) if Path(record["swap"]).is_dir() else Path(record["old"])
            finish_swap(old, new, set(record["files"]))
        else:
            shutil.rmtree(new, ignore_errors=True)
            Path(record["swap"]).unlink(missing_ok=True)
        append_record(journal, {"op": "done", "partition": relative, "recovered": True})
    return len(pending)


def compact(root_text: str, older_than_days: float = 1.0, today: date | None = None,
            catalog_uri: str | None = None, endpoint_url: str | None = None,
            region: str | None = None) -> CompactReport:
    if catalog_uri:
        from agent.fleet.iceberg import compact_to_iceberg

        return compact_to_iceberg(root_text, catalog_uri, older_than_days, today, endpoint_url, region)
    if "://" in root_text:
        raise BadInput(f"compact: {root_text}: S3 has no atomic multi-object swap, so an S3 dataset is "
                       "compacted into Apache Iceberg tables: give --catalog sqlite:////path/catalog.db "
                       "(or set dataset.iceberg_catalog)")
    root = Path(root_text)
    if not root.is_dir():
        raise BadInput(f"--dataset {root_text}: no such directory")
    if not (older_than_days >= 0):
        raise BadInput("--older-than: must be a number of days ≥ 0")
    (root / COMPACTED_DIR).mkdir(exist_ok=True)
    journal = root / COMPACTED_DIR / JOURNAL_NAME
    report = CompactReport(recovered=recover(root, journal))
    cutoff = (today or date.today()) - timedelta(days=int(older_than_days))
    for partition in partitions(root, cutoff):
        try:
            compact_partition(root, partition, journal, report)
        except OSError as error:
            raise WorkFailed(f"compact: {partition}: {error.strerror or error}") from None
    journal.unlink(missing_ok=True)  # every partition is done: nothing left to recover
    return report
