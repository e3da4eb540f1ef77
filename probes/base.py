"""The probe contract shared by every probe, plus the pieces the runner hands to probes.

A probe is a thin I/O shell: `check()` says whether it can run here (raising Unavailable with the
missing piece as an action), `collect(window)` gathers data over the shared window and returns
tables by name. Pure parsing/aggregation lives in `*_rows(...)` functions beside the probe so tests
can feed them recorded data.

The whole contract is declared on `ProbeBase` with its defaults, and the runner and the daemon
call every hook directly (no getattr), in this order:

    check()            can it run here? raise Unavailable("the missing piece, as an action")
    prepare()          compile/attach/start before the window, so the window is exact
    collect(window)    gather over the shared window; return {table name: pa.Table}
    status_reason      read after collect(): why an ok/interrupted run is partial ("" = fine)
    partial            read after collect(): True when the probe dropped data (status `partial`)
    abandon()          the runner gave up waiting (window + finish_grace_s): stop children now
    headlines(tables)  one-line summaries for the audit's terminal output (a static method)
    extras             extra files the probe writes into the bundle (pcap, svg ...)

Rolling use: a probe class with `rolling = True` can be prepared once and collected window after
window on the same instance. The daemon's probe source (agent/runner.py: KeptProbes) calls
`keep_attached_between_windows()` on such an instance; collect() then returns exactly that
window's data and leaves its programs attached, and `close()` detaches at the end. A fresh
instance (a normal audit) detaches when its window ends.

Options: a probe reads its options with `self.option(name)`; every name is declared once, with
its type and default, in probes/options.py (the CLI flags and config validation come from there).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pyarrow as pa

from core.errors import Unavailable
from core.host import Host
from probes.options import BY_NAME, declared

__all__ = [
    "Probe",
    "ProbeConfig",
    "Window",
    "Unavailable",
    "FINDINGS_SCHEMA",
    "SEVERITIES",
    "finding",
    "findings_table",
    "rows_to_table",
]

SEVERITIES = ("critical", "warning", "info")

# The shared findings table (stable): any probe may return rows for it under the key "findings".
FINDINGS_SCHEMA = pa.schema(
    [
        pa.field("probe", pa.string(), nullable=False),
        pa.field("severity", pa.string(), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("recommendation", pa.string(), nullable=False),
    ]
)


def finding(probe: str, severity: str, subject: str, message: str, recommendation: str) -> dict:
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, not {severity!r}")
    return {
        "probe": probe,
        "severity": severity,
        "subject": subject,
        "message": message,
        "recommendation": recommendation,
    }


def findings_table(rows: list[dict]) -> pa.Table:
    return rows_to_table(rows, FINDINGS_SCHEMA)


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly `schema` from a list of row dicts (missing keys -> null)."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


@dataclass
class ProbeConfig:
    """What a probe is told at construction: the host seam, the targets and the option values.

    `options` holds the values given (by the CLI or the config) under the names declared in
    probes/options.py; a probe reads them through `ProbeBase.option`, which supplies defaults.
    `process_names` and `units` are targets like `pids`, resolved by the probes that follow
    processes (probes/targets.py).
    """

    host: Host = field(default_factory=Host.real)
    pids: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    process_names: tuple[str, ...] = ()
    units: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(BY_NAME))
        if unknown:  # a misspelled option must not silently fall back to the default
            raise LookupError(f"unknown probe option {unknown[0]!r}: declare it in probes/options.py")


class Window:
    """The one shared collection window: a deadline, an early-stop event and the bundle dir.

    Probes call `wait()` (or poll `remaining()`/`stopped`) to live exactly as long as the window,
    and write extra files (pcap, svg...) to `extra_path(name)`.
    """

    def __init__(self, duration_s: float, bundle_dir: Path, run_id: str = ""):
        if duration_s <= 0:
            raise ValueError("duration must be positive")
        self.duration_s = float(duration_s)
        self.bundle_dir = Path(bundle_dir)
        self.run_id = run_id
        self.started_monotonic = time.monotonic()
        self.started_wall = time.time()
        self.deadline = self.started_monotonic + self.duration_s
        self._stop = threading.Event()
        self._ended_early = False

    def restart(self) -> None:
        """Start the clock now (after probes have attached)."""
        self.started_monotonic = time.monotonic()
        self.started_wall = time.time()
        self.deadline = self.started_monotonic + self.duration_s

    def stop(self) -> None:
        """End the window early (Ctrl-C, SIGTERM, or a caller that has seen enough)."""
        if not self._stop.is_set() and time.monotonic() < self.deadline:
            self._ended_early = True
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def interrupted(self) -> bool:
        """True when the window was ended before its deadline."""
        return self._ended_early

    def remaining(self) -> float:
        if self._stop.is_set():
            return 0.0
        return max(0.0, self.deadline - time.monotonic())

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the window ends (or `timeout`); True when the window is over."""
        left = self.remaining()
        if timeout is not None:
            left = min(left, timeout)
        if left > 0:
            self._stop.wait(left)
        return self.remaining() <= 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started_monotonic

    def extra_path(self, name: str) -> Path:
        return self.bundle_dir / name


class Probe(Protocol):
    """The contract the runner and daemon rely on; ProbeBase gives every hook its default."""

    name: ClassVar[str]  # also the Parquet file stem of its main table
    schema: ClassVar[pa.Schema]  # units in column names: _ns, _us, _ms, _bytes, _pct
    # Tables other than the main one (name -> schema), declared so tests can assert them.
    extra_schemas: ClassVar[dict[str, pa.Schema]]
    description: ClassVar[str]  # one line for `guardian-agent probes`
    finish_grace_s: ClassVar[float]  # seconds after the window to detach and aggregate
    default_enabled: ClassVar[bool]  # False: runs only when asked for by name
    rolling: ClassVar[bool]  # one instance can collect window after window (the daemon)
    extras: ClassVar[tuple[str, ...]]  # extra bundle files the probe may write
    status_reason: str  # set by collect(): why a run is partial ("" when it is not)
    partial: bool  # set by collect(): data was dropped (maps full): the status is `partial`

    def __init__(self, config: ProbeConfig) -> None: ...
    def check(self) -> None: ...  # raise Unavailable("why, and what to do")
    def prepare(self) -> None: ...
    def collect(self, window: Window) -> dict[str, pa.Table]: ...  # table name -> rows
    def abandon(self) -> None: ...
    def keep_attached_between_windows(self) -> None: ...
    def close(self) -> None: ...
    @staticmethod
    def headlines(tables: dict[str, pa.Table]) -> list[str]: ...


class ProbeBase:
    """The contract with its defaults: a probe overrides what it needs."""

    name: ClassVar[str] = ""
    schema: ClassVar[pa.Schema] = pa.schema([])
    extra_schemas: ClassVar[dict[str, pa.Schema]] = {}
    description: ClassVar[str] = ""
    finish_grace_s: ClassVar[float] = 20.0
    # Probes that only run when asked for by name (heavy, intrusive, or needing a target).
    default_enabled: ClassVar[bool] = True
    rolling: ClassVar[bool] = False
    extras: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ProbeConfig | None = None) -> None:
        self.config = config or ProbeConfig()
        self.status_reason = ""
        self.partial = False
        self.keep_attached = False

    @property
    def host(self) -> Host:
        return self.config.host

    def option(self, name: str) -> Any:
        """The value of a declared option (probes/options.py), or its declared default."""
        option = declared(name, self.name)
        value = self.config.options.get(name)
        return option.default if value is None else value

    def check(self) -> None:
        return None

    def prepare(self) -> None:
        return None

    def collect(self, window: Window) -> dict[str, pa.Table]:  # pragma: no cover - overridden
        raise NotImplementedError

    def abandon(self) -> None:
        return None

    def keep_attached_between_windows(self) -> None:
        """Rolling use (only for `rolling` probes): collect() leaves its programs attached."""
        if not self.rolling:
            raise TypeError(f"probe {self.name} is not rolling: it cannot stay attached between windows")
        self.keep_attached = True

    def close(self) -> None:
        return None

    @staticmethod
    def headlines(tables: dict[str, pa.Table]) -> list[str]:
        return []


def require_root(what: str) -> None:
    """Raise Unavailable unless we run with effective uid 0 (CAP_BPF/CAP_PERFMON in practice)."""
    if os.geteuid() != 0:
        raise Unavailable(f"{what}: run as root")
