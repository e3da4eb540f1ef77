"""Prometheus metrics for the fleet: node_exporter textfile-collector files and /metrics.

`daemon --textfile DIR` (and `collect --textfile DIR`) write two files, each atomically by
prometheus_client's own write_to_textfile (a temp file, then rename, so node_exporter never
reads half a file):

    DIR/guardian_window.prom  what the last window saw: syscall latency histograms (the log2
                              buckets of the syscalls probe as `le`), TCP sRTT per peer role,
                              CPU busy per CPU, findings by severity, tuning drift, probe status,
                              the last gate verdict (with --gate-record)
    DIR/guardian_agent.prom   the agent itself: CPU seconds, RSS, windows, paused seconds

The window file is written by whichever process ran the window (the daemon runs some windows in
a forked child), straight from the bundle before it is staged; the agent file by the daemon after
each window. `--listen 127.0.0.1:PORT` serves both files' metrics on /metrics, parsed back with
the client's parser, so the two ways to scrape always agree.

Units follow Prometheus conventions (seconds, bytes, ratios 0..1), not the bundle's _ns/_pct.
Histogram series are per syscall and process name (comm), not pid: pids churn, and a label per
pid would grow the series count without bound on a long-lived host.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from core.errors import BadInput
from reports.html_data import ReportSource, open_source, syscall_buckets, syscall_pairs

WINDOW_FILE = "guardian_window.prom"
AGENT_FILE = "guardian_agent.prom"
# Fixed log2 bucket bounds (256 ns .. ~17 s): the same `le` set on every series, so
# histogram_quantile() can sum series across hosts and processes.
LE_EXPONENTS = range(8, 35)
MAX_HISTOGRAM_SERIES = 50
SEVERITIES = ("critical", "warning", "info")


def parse_listen(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"--listen {text}: give HOST:PORT, e.g. 127.0.0.1:9817")
    return host.strip("[]"), int(port)


def validate_textfile_dir(path: Path | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"--textfile {path}: exists and is not a directory")
    if not path.exists() and not path.parent.is_dir():
        raise BadInput(f"--textfile {path}: parent directory {path.parent} does not exist")
    return path


# ---------------------------------------------------------------------------------------------
# families from a bundle


def window_families(source: ReportSource, gate_record: Path | None = None) -> list:
    families = []
    families += syscall_families(source)
    families += tcp_families(source)
    families += cpu_families(source)
    families += findings_families(source)
    families += tuning_families(source)
    families += probe_families(source)
    if gate_record is not None:
        families += gate_families(gate_record)
    return families


def syscall_families(source: ReportSource) -> list:
    # prometheus_client on first use, in every function here (110 ms to import): importing this
    # module stays cheap for the commands that only name its functions.
    from prometheus_client.core import HistogramMetricFamily

    pairs, buckets = syscall_pairs(source), syscall_buckets(source)
    if pairs is None or buckets is None:
        return []
    family = HistogramMetricFamily("guardian_syscall_latency_seconds",
                                   "Syscall latency in the last window (eBPF, log2 buckets)",
                                   labels=["syscall", "comm"])
    comm_of = dict(zip(zip(pairs["pid"].to_pylist(), pairs["syscall"].to_pylist()),
                       pairs["comm"].to_pylist() if "comm" in pairs.column_names else [""] * pairs.num_rows))
    totals: dict[tuple[str, str], list] = {}
    for pid, syscall, total_ns in zip(pairs["pid"].to_pylist(), pairs["syscall"].to_pylist(),
                                      pairs["total_ns"].to_pylist()):
        key = (syscall, comm_of.get((pid, syscall)) or "")
        totals.setdefault(key, [0, [0] * (len(LE_EXPONENTS) + 1)])[0] += total_ns or 0
    for pid, syscall, high_ns, count in zip(buckets["pid"].to_pylist(), buckets["syscall"].to_pylist(),
                                            buckets["bucket_hi_ns"].to_pylist(), buckets["bucket_count"].to_pylist()):
        key = (syscall, comm_of.get((pid, syscall)) or "")
        slots = totals.setdefault(key, [0, [0] * (len(LE_EXPONENTS) + 1)])[1]
        slots[_le_index(high_ns)] += count
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:MAX_HISTOGRAM_SERIES]
    for (syscall, comm), (total_ns, slots) in ranked:
        cumulative, running = [], 0
        for exponent, count in zip(LE_EXPONENTS, slots):
            running += count
            cumulative.append((_le_text(exponent), running))
        running += slots[-1]
        cumulative.append(("+Inf", running))
        family.add_metric([syscall, comm], cumulative, sum_value=total_ns / 1e9)
    return [family]


def _le_index(high_ns: int) -> int:
    """The first fixed bound >= the bucket's upper edge (the last slot is +Inf)."""
    for index, exponent in enumerate(LE_EXPONENTS):
        if high_ns <= (1 << exponent):
            return index
    return len(LE_EXPONENTS)


def _le_text(exponent: int) -> str:
    return repr((1 << exponent) / 1e9)


def tcp_families(source: ReportSource) -> list:
    from prometheus_client.core import GaugeMetricFamily

    table = source.table("tcp")
    if table is None or "srtt_us_p50" not in table.column_names:
        return []
    if "role" not in table.column_names:
        table = table.append_column("role", pa.array(["unlabelled"] * table.num_rows))
    table = table.filter(pc.is_valid(table["srtt_us_p50"]))
    connections = GaugeMetricFamily("guardian_tcp_connections", "TCP connections with sRTT samples in the window",
                                    labels=["role"])
    median = GaugeMetricFamily("guardian_tcp_srtt_median_seconds",
                               "Median over connections of each connection's p50 smoothed RTT", labels=["role"])
    worst = GaugeMetricFamily("guardian_tcp_srtt_max_seconds", "Largest smoothed RTT seen", labels=["role"])
    if table.num_rows:
        grouped = table.group_by(["role"], use_threads=False).aggregate(
            [("srtt_us_p50", "approximate_median"), ("srtt_us_max", "max"), ("srtt_us_p50", "count")])
        for row in grouped.to_pylist():
            role = row["role"] or "unlabelled"
            connections.add_metric([role], row["srtt_us_p50_count"])
            median.add_metric([role], (row["srtt_us_p50_approximate_median"] or 0) / 1e6)
            worst.add_metric([role], (row["srtt_us_max_max"] or 0) / 1e6)
    return [connections, median, worst]


def cpu_families(source: ReportSource) -> list:
    from prometheus_client.core import GaugeMetricFamily

    table = source.table("host")
    if table is None or table.num_rows == 0 or "busy_pct" not in table.column_names:
        return []
    family = GaugeMetricFamily("guardian_cpu_busy_ratio", "Mean CPU busy share over the window (cpu=-1: host)",
                               labels=["cpu"])
    grouped = table.group_by(["cpu"], use_threads=False).aggregate([("busy_pct", "mean")])
    for cpu, busy in sorted(zip(grouped["cpu"].to_pylist(), grouped["busy_pct_mean"].to_pylist())):
        family.add_metric([str(cpu)], (busy or 0.0) / 100)
    return [family]


def findings_families(source: ReportSource) -> list:
    from prometheus_client.core import GaugeMetricFamily

    table = source.table("findings")
    family = GaugeMetricFamily("guardian_findings", "Findings in the last window by severity and probe",
                               labels=["severity", "probe"])
    counts: dict[tuple[str, str], int] = {}
    if table is not None:
        for severity, probe in zip(table["severity"].to_pylist(), table["probe"].to_pylist()):
            counts[(severity, probe)] = counts.get((severity, probe), 0) + 1
    for severity in SEVERITIES:  # zeros too: an alert on "critical > 0" needs the series to exist
        if not any(key[0] == severity for key in counts):
            counts[(severity, "")] = 0
    for (severity, probe), count in sorted(counts.items()):
        family.add_metric([severity, probe], count)
    return [family]


def tuning_families(source: ReportSource) -> list:
    from prometheus_client.core import GaugeMetricFamily

    table = source.table("kernel")
    if table is None:
        return []
    profiles = table["profile"].to_pylist() if "profile" in table.column_names else [""] * table.num_rows
    drift = GaugeMetricFamily("guardian_tuning_drift_items", "Tuning items out of the profile (kernel audit)",
                              labels=["profile"])
    items = GaugeMetricFamily("guardian_tuning_items", "Tuning items audited", labels=["profile"])
    by_profile: dict[str, list[int]] = {}
    for profile, compliant in zip(profiles, table["compliant"].to_pylist()):
        entry = by_profile.setdefault(profile or "", [0, 0])
        entry[0] += compliant is False
        entry[1] += 1
    for profile, (off, total) in sorted(by_profile.items()):
        drift.add_metric([profile], off)
        items.add_metric([profile], total)
    return [drift, items]


def probe_families(source: ReportSource) -> list:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily("guardian_probe_up", "1 when the probe's last window was ok", labels=["probe", "status"])
    for record in source.manifest.get("probes", []):
        status = record.get("status", "")
        family.add_metric([record.get("name", ""), status], 1 if status in ("ok", "interrupted") else 0)
    return [family]


def gate_families(record_dir: Path) -> list:
    from prometheus_client.core import GaugeMetricFamily

    try:
        source = open_source(record_dir)
    except BadInput:
        return []
    table = source.table("gate_decisions")
    if table is None or table.num_rows == 0:
        return []
    latest = table.take(pc.sort_indices(table, [("decided_at", "descending")])).slice(0, 1).to_pylist()[0]
    verdict = GaugeMetricFamily("guardian_gate_last_verdict", "1 for the verdict of the last gate decision",
                                labels=["verdict", "context"])
    for name in ("pass", "fail", "inconclusive", "marginal"):
        verdict.add_metric([name, latest.get("context") or ""], 1 if latest["verdict"] == name else 0)
    when = GaugeMetricFamily("guardian_gate_last_decision_timestamp_seconds", "When the last gate decision was made")
    when.add_metric([], latest["decided_at"].timestamp())
    return [verdict, when]


def agent_families(state: dict) -> list:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    cpu = CounterMetricFamily("guardian_agent_cpu_seconds", "CPU time the agent used (user+system, children too)")
    cpu.add_metric([], float(state.get("cpu_s_total", 0.0)))
    rss = GaugeMetricFamily("guardian_agent_resident_memory_bytes", "Resident memory of the agent")
    rss.add_metric([], float(state.get("rss_bytes", 0)))
    windows = CounterMetricFamily("guardian_agent_windows", "Windows the agent has completed")
    windows.add_metric([], float(state.get("windows", 0)))
    paused = CounterMetricFamily("guardian_agent_budget_paused_seconds",
                                 "Seconds not observed because the CPU budget paused the agent")
    paused.add_metric([], float(state.get("paused_s_total", 0.0)))
    pending = GaugeMetricFamily("guardian_agent_spool_pending_runs", "Runs waiting in the spool for the store")
    pending.add_metric([], float(state.get("pending_runs", 0)))
    return [cpu, rss, windows, paused, pending]


# ---------------------------------------------------------------------------------------------
# writing and serving


class _Families:
    """A collector that yields the families it is given (prometheus_client's custom-collector API)."""

    def __init__(self, families: Iterable):
        self.families = list(families)

    def collect(self):
        return iter(self.families)


def write_families(directory: Path, name: str, families: list) -> Path:
    from prometheus_client import CollectorRegistry, write_to_textfile

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    write_to_textfile(str(path), registry)  # temp file + os.rename: atomic for node_exporter
    return path


class TextfileExporter:
    """The daemon's and collect's hook: one call per window, one per agent state update."""

    def __init__(self, directory: Path | None, listen: tuple[str, int] | None = None,
                 gate_record: Path | None = None):
        import tempfile

        self._scratch = None
        if directory is None and listen is not None:
            self._scratch = tempfile.TemporaryDirectory(prefix="guardian-metrics-")
            directory = Path(self._scratch.name)
        self.directory = directory
        self.listen = listen
        self.gate_record = gate_record
        self._server = None

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def window_done(self, bundle_dir: Path) -> Path | None:
        if not self.enabled:
            return None
        return write_families(self.directory, WINDOW_FILE, window_families(open_source(bundle_dir), self.gate_record))

    def agent_state(self, state: dict) -> Path | None:
        if not self.enabled:
            return None
        return write_families(self.directory, AGENT_FILE, agent_families(state))

    def start_server(self) -> None:
        if self.listen is None or self._server is not None:
            return
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_TextfileReader(self.directory))
        host, port = self.listen
        try:
            self._server = start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            raise BadInput(f"--listen {host}:{port}: {error.strerror or error}") from None

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._server = None
        if self._scratch is not None:
            self._scratch.cleanup()


class _TextfileReader:
    """Serves what the textfiles say, parsed with the client's parser (no second source of truth)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._lock = threading.Lock()

    def collect(self):
        from prometheus_client.parser import text_string_to_metric_families

        with self._lock:
            for name in (WINDOW_FILE, AGENT_FILE):
                path = self.directory / name
                try:
                    text = path.read_text()
                except OSError:
                    continue
                yield from text_string_to_metric_families(text)

