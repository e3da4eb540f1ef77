"""The report bundle (stable format).

    DIR/manifest.json     written LAST: present means complete
    DIR/<table>.parquet   zstd; written to a temp name, fsync'd, then os.replace()d
    DIR/<extras>          capture.pcap, stacks.svg, stacks.speedscope.json ...

Parquet key-value metadata repeats run_id and probe so a file copied out of its bundle still
says where it came from.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from core import __version__
from core.atomic import atomic_path, write_json_atomic, write_text_atomic
from core.errors import BadInput, WorkFailed
from core.host import Host, format_cpu_list

# Format 2: `syscalls` is one row per pid x syscall and `syscall_buckets` holds its buckets
# (format 1 repeated the totals on every bucket row); the reader still reads format 1.
BUNDLE_FORMAT = 2
READABLE_FORMATS = (1, 2)
MANIFEST_NAME = "manifest.json"
# partial: it ran but dropped data (maps full); the reason says how much.
PROBE_STATUSES = ("ok", "partial", "unavailable", "failed", "interrupted")


def new_run_id(hostname: str | None = None, now: float | None = None) -> str:
    """Sortable, unique and readable: 20261124T021500Z-myhost-3fa2c1."""
    stamp = datetime.fromtimestamp(now or time.time(), tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in (hostname or Host.real().hostname()))
    return f"{stamp}-{host[:40]}-{secrets.token_hex(3)}"


def validate_out_dir(path: Path) -> Path:
    """Check that DIR can become a bundle (absent, or an empty writable directory) without writing."""
    path = Path(path)
    try:
        return _validate_out_dir(path)
    except PermissionError as error:
        raise BadInput(f"--out {path}: permission denied ({error.filename or path})") from None


def _validate_out_dir(path: Path) -> Path:
    if path.exists():
        if not path.is_dir():
            raise BadInput(f"--out {path}: exists and is not a directory")
        if any(path.iterdir()):
            raise BadInput(f"--out {path}: directory is not empty (a bundle needs a fresh directory)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise BadInput(f"--out {path}: directory is not writable")
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {path}: cannot create it ({parent} is not a writable directory)")
    return path


def host_fingerprint(host: Host, tuning_profile: str | None = None) -> dict[str, Any]:
    return {
        "hostname": host.hostname(),
        "kernel": host.kernel_release(),
        "cpu_model": host.cpu_model(),
        "cores": len(host.online_cpus()),
        "isolated_cpus": format_cpu_list(host.isolated_cpus()),
        "cmdline": host.cmdline(),
        "boot_id": host.boot_id(),
        "tuning_profile": tuning_profile,
    }


def write_parquet_atomic(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `table` to `path` atomically (see atomic_path), zstd-compressed."""
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as temp:
        pq.write_table(table, temp, compression="zstd")


@dataclass
class ProbeRecord:
    name: str
    status: str
    reason: str = ""
    tables: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        if self.status not in PROBE_STATUSES:
            raise ValueError(f"bad probe status {self.status!r}")
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "tables": dict(self.tables),
            "seconds": round(self.seconds, 3),
        }


SYSCALL_BUCKETS = "syscall_buckets"
FORMAT1_BUCKET_COLUMNS = ("bucket_lo_ns", "bucket_hi_ns", "bucket_count")


def format1_syscalls(table: pa.Table) -> pa.Table:
    """A format 1 `syscalls` table (pid x syscall totals repeated on every bucket row) folded to
    format 2's one row per pid x syscall."""
    keys = ["pid", "syscall"]
    repeated = [name for name in table.column_names if name not in keys and name not in FORMAT1_BUCKET_COLUMNS]
    grouped = table.group_by(keys).aggregate([(name, "max") for name in repeated])
    grouped = grouped.rename_columns([name[:-4] if name.endswith("_max") and name[:-4] in repeated else name
                                      for name in grouped.column_names])
    order = [name for name in table.column_names if name in grouped.column_names]
    return grouped.select(order).sort_by([("pid", "ascending"), ("syscall", "ascending")])


def format1_buckets(table: pa.Table) -> pa.Table:
    """format 2's `syscall_buckets` from a format 1 `syscalls` table's bucket columns."""
    columns = [name for name in ("pid", "syscall", "syscall_nr", *FORMAT1_BUCKET_COLUMNS)
               if name in table.column_names]
    return table.select(columns)


@dataclass
class TableStream:
    writer: Any
    schema: pa.Schema
    rows: int = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table.replace_schema_metadata(self.schema.metadata))
            self.rows += table.num_rows


class BundleWriter:
    """Writes one bundle. Create it only after validate_out_dir(); call finish() last."""

    def __init__(self, out_dir: Path, run_id: str | None = None, host: Host | None = None):
        self.out_dir = validate_out_dir(Path(out_dir))
        self.host = host or Host.real()
        self.run_id = run_id or new_run_id(self.host.hostname())
        self.created_out_dir = not self.out_dir.exists()
        self.failure: WorkFailed | None = None
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BadInput(f"--out {self.out_dir}: cannot create it ({error.strerror})") from None
        self.started_at = datetime.now(timezone.utc)
        self._started_monotonic = time.monotonic()
        self.probes: list[ProbeRecord] = []
        self.tables_written: dict[str, int] = {}
        self.extras: list[str] = []
        self.finished = False

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def write_table(self, name: str, table: pa.Table, probe: str) -> int:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"table name {name!r} must be alphanumeric/underscore")
        if name in self.tables_written:
            raise ValueError(f"table {name!r} written twice in one bundle")
        with self._abort_on_os_error(f"{name}.parquet"):
            write_parquet_atomic(
                table,
                self.path(f"{name}.parquet"),
                {"run_id": self.run_id, "probe": probe, "table": name, "agent_version": __version__},
            )
        self.tables_written[name] = table.num_rows
        return table.num_rows

    @contextlib.contextmanager
    def table_stream(self, name: str, schema: pa.Schema, probe: str) -> Iterator["TableStream"]:
        """Write table `name` batch by batch (`.write(table)`): one Parquet file, row group per
        batch, put in place atomically when the block ends, so a table larger than memory
        never has to be whole in memory."""
        if name in self.tables_written:
            raise ValueError(f"table {name!r} written twice in one bundle")
        metadata = {"run_id": self.run_id, "probe": probe, "table": name, "agent_version": __version__}
        schema = schema.with_metadata({**(schema.metadata or {}),
                                       **{k.encode(): str(v).encode() for k, v in metadata.items()}})
        with self._abort_on_os_error(f"{name}.parquet"), atomic_path(self.path(f"{name}.parquet")) as temp:
            stream = TableStream(pq.ParquetWriter(temp, schema, compression="zstd"), schema)
            try:
                yield stream
            finally:
                stream.writer.close()
        self.tables_written[name] = stream.rows

    @contextlib.contextmanager
    def _abort_on_os_error(self, what: str):
        """A write that fails (disk full, quota, I/O error) ends the bundle: everything this run
        put under --out is removed, since Parquet files without a manifest look like data
        nobody can trust, and every later write raises the same one-line error."""
        if self.failure is not None:
            raise self.failure
        try:
            yield
        except OSError as error:
            self.discard()
            self.failure = WorkFailed(
                f"--out {self.out_dir}: {error.strerror or error} while writing {what}; "
                "removed the incomplete bundle")
            raise self.failure from None

    def discard(self) -> None:
        """Remove what this run wrote: --out was absent or empty when it started, so all of it."""
        if not self.out_dir.is_dir():
            return
        for entry in self.out_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if self.created_out_dir:
            try:
                self.out_dir.rmdir()
            except OSError:
                pass

    def add_probe(self, record: ProbeRecord) -> None:
        self.probes.append(record)

    def add_extra(self, name: str) -> None:
        if name not in self.extras:
            self.extras.append(name)

    def write_extra(self, name: str, text: str) -> None:
        """Write a text extra (an SVG, a journal copy) atomically and list it in the manifest."""
        with self._abort_on_os_error(name):
            write_text_atomic(text, self.path(name))
        self.add_extra(name)

    def finish(self, tuning_profile: str | None = None, extra: dict[str, Any] | None = None) -> dict:
        """Write manifest.json last. After this the bundle is complete."""
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "agent": __version__,
            "run_id": self.run_id,
            "host": host_fingerprint(self.host, tuning_profile),
            "started_at": self.started_at.isoformat(),
            "duration_s": round(time.monotonic() - self._started_monotonic, 3),
            "probes": [record.as_dict() for record in self.probes],
            "tables": dict(self.tables_written),
            "extras": sorted(e for e in self.extras if self.path(e).exists()),
        }
        if extra:
            manifest.update(extra)
        with self._abort_on_os_error(MANIFEST_NAME):
            write_json_atomic(manifest, self.path(MANIFEST_NAME))
        self.finished = True
        return manifest


class Bundle:
    """A complete bundle on disk, read back."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not self.path.is_dir():
            raise BadInput(f"{self.path}: not a bundle directory")
        if not manifest_path.exists():
            raise BadInput(f"{self.path}: incomplete bundle (no {MANIFEST_NAME})")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except ValueError as error:
            raise BadInput(f"{manifest_path}: unreadable manifest ({error})") from None
        if self.manifest.get("format") not in READABLE_FORMATS:
            raise BadInput(f"{manifest_path}: unsupported bundle format {self.manifest.get('format')!r}")
        self.format: int = self.manifest["format"]

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def table_names(self) -> list[str]:
        names = {p.stem for p in self.path.glob("*.parquet")}
        if self.format == 1 and "syscalls" in names:
            names.add(SYSCALL_BUCKETS)
        return sorted(names)

    def has(self, table: str) -> bool:
        if self.format == 1 and table == SYSCALL_BUCKETS:
            table = "syscalls"
        return (self.path / f"{table}.parquet").exists()

    def table(self, name: str) -> pa.Table:
        """A table as format 2 defines it, whatever the bundle's format."""
        stored = "syscalls" if self.format == 1 and name == SYSCALL_BUCKETS else name
        file = self.path / f"{stored}.parquet"
        if not file.exists():
            raise KeyError(name)
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as error:
            # A truncated or bit-flipped file (a copy cut short, a bad disk) is the input's fault.
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise BadInput(f"{file}: not a readable Parquet file ({reason})") from None
        if self.format == 1 and stored == "syscalls":
            return format1_buckets(table) if name == SYSCALL_BUCKETS else format1_syscalls(table)
        return table

    def probe(self, name: str) -> dict[str, Any] | None:
        for record in self.manifest.get("probes", []):
            if record["name"] == name:
                return record
        return None
