"""The probe contract shared by every probe, plus the pieces the runner hands to probes.

A probe is a thin I/O shell: `check()` says whether it can run here (raising Unavailable with the
missing piece as an action), `collect(window)` gathers data over the shared window and returns
tables by name. Pure parsing/aggregation lives in `*_rows(...)` functions beside the probe so tests
can feed them recorded data.

Rolling use: a probe class with `rolling = True` can be prepared once and collected window after
window on the same instance. A caller that does so (the daemon's RollingAuditRun) sets
`probe.keep_attached = True` on the instance; collect() then returns exactly that window's data
and leaves its programs attached, and `close()` detaches at the end. Without the attribute (a
normal audit) collect() detaches when the window ends, as before.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pyarrow as pa

from core.errors import Unavailable
from core.host import Host

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
    """What a probe is told at construction: the host seam, target pids and named options.

    Options are the audit's probe options by name (iface, capture_filter, pg_dsn, profile,
    native, subprocesses, sample_rate_hz, blocking, jitter_cpus ...). A probe reads the ones it
    knows and ignores the rest.
    """

    host: Host = field(default_factory=Host.real)
    pids: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value


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
    name: ClassVar[str]  # also the Parquet file stem of its main table
    schema: ClassVar[pa.Schema]  # units in column names: _ns, _us, _ms, _bytes, _pct
    # Tables other than the main one (name -> schema), declared so tests can assert them.
    extra_schemas: ClassVar[dict[str, pa.Schema]]
    # One line for `guardian-agent probes`.
    description: ClassVar[str]
    # Seconds a probe may take after the window ends to detach and aggregate.
    finish_grace_s: ClassVar[float]

    def __init__(self, config: ProbeConfig) -> None: ...

    def check(self) -> None: ...  # raise Unavailable("why, and what to do")

    def collect(self, window: Window) -> dict[str, pa.Table]: ...  # table name -> rows


class ProbeBase:
    """Convenience base with the defaults of the contract."""

    name: ClassVar[str] = ""
    schema: ClassVar[pa.Schema] = pa.schema([])
    extra_schemas: ClassVar[dict[str, pa.Schema]] = {}
    description: ClassVar[str] = ""
    finish_grace_s: ClassVar[float] = 20.0
    # Probes that only run when asked for by name (heavy, intrusive, or needing a target).
    default_enabled: ClassVar[bool] = True

    def __init__(self, config: ProbeConfig | None = None) -> None:
        self.config = config or ProbeConfig()

    @property
    def host(self) -> Host:
        return self.config.host

    def check(self) -> None:  # pragma: no cover - overridden
        return None

    def collect(self, window: Window) -> dict[str, pa.Table]:  # pragma: no cover - overridden
        raise NotImplementedError


def require_root(what: str) -> None:
    """Raise Unavailable unless we run with effective uid 0 (CAP_BPF/CAP_PERFMON in practice)."""
    import os

    if os.geteuid() != 0:
        raise Unavailable(f"{what}: run as root")
