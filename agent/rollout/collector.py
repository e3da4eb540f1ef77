"""KPI samples for blue and green: from requests the driver sends through the frontend
(LoadCollector), or from the real traffic's HAProxy log lines (HAProxyLogCollector).

Each worker keeps one HTTP/1.1 keep-alive connection to the frontend (the balancer decides per
request), times request -> full response with perf_counter_ns, and attributes the sample to blue
or green by the header the balancer adds (HAProxy: `http-response set-header X-Served-By %s`).
Samples become a turns-like table, so the gate judges them exactly as it judges bundles.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow as pa

from agent.rollout.plan import KpiSettings

SAMPLES_SCHEMA = pa.schema([
    ("flow", pa.string()),
    ("ts", pa.timestamp("ns", tz="UTC")),
    ("latency_ns", pa.int64()),
    ("request_bytes", pa.int64()),
    ("response_bytes", pa.int64()),
    ("version", pa.string()),
    ("stage", pa.int32()),
    ("status", pa.int32()),
    ("error", pa.bool_()),
])


# Stage numbers of samples taken before the first stage: a short warm-up (connections, caches),
# then blue alone at 100% for kpi.baseline_s, the load-for-load reference of the 100% stage.
WARMUP_STAGE = -2
BASELINE_STAGE = -1


class Unattributed:
    """Requests no version can be charged with (no response, or no version header), per stage."""

    def __init__(self) -> None:
        self.by_stage: dict[int, int] = {}

    def add(self, stage: int) -> None:
        self.by_stage[stage] = self.by_stage.get(stage, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_stage.values())


@dataclass
class Sample:
    version: str
    stage: int
    ts_ns: int
    latency_ns: int
    status: int
    error: bool
    request_bytes: int
    response_bytes: int


class LoadCollector:
    def __init__(self, settings: KpiSettings, blue_name: str, green_name: str):
        self.settings = settings
        self.versions = {blue_name: "blue", green_name: "green"}
        parts = urlsplit(settings.url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.stage = WARMUP_STAGE
        self.samples: list[Sample] = []
        self.unattributed = Unattributed()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.settings.concurrency):
            thread = threading.Thread(target=self._worker, name=f"kpi-load-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.timeout_s + 1)

    def set_stage(self, stage: int) -> None:
        self.stage = stage

    def _worker(self) -> None:
        connection = None
        request_bytes = len(f"GET {self.target} HTTP/1.1\r\nHost: {self.host}\r\n\r\n")
        pause = 1.0 / self.settings.rate_hz if self.settings.rate_hz > 0 else 0.0
        while not self._stop.is_set():
            stage = self.stage
            if connection is None:
                connection = http.client.HTTPConnection(self.host, self.port, timeout=self.settings.timeout_s)
            started = time.perf_counter_ns()
            wall = time.time_ns()
            try:
                connection.request("GET", self.target)
                response = connection.getresponse()
                body = response.read()
                latency = time.perf_counter_ns() - started
                served_by = response.getheader(self.settings.version_header, "")
                status = response.status
                if response.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException):
                if connection is not None:
                    connection.close()
                connection = None
                self.record_failure(stage, wall, time.perf_counter_ns() - started, request_bytes)
                self._stop.wait(0.01)
                continue
            self.record(served_by, stage, wall, latency, status, request_bytes, len(body))
            if pause:
                self._stop.wait(pause)
        if connection is not None:
            connection.close()

    def record(self, served_by: str, stage: int, wall_ns: int, latency_ns: int, status: int,
               request_bytes: int, response_bytes: int) -> None:
        version = self.versions.get(served_by.strip())
        with self._lock:
            if version is None:
                self.unattributed.add(stage)
            else:
                self.samples.append(Sample(version, stage, wall_ns, latency_ns, status, status >= 500,
                                           request_bytes, response_bytes))

    def record_failure(self, stage: int, wall_ns: int, latency_ns: int, request_bytes: int) -> None:
        # Failed without a response: no header says which version failed, so it cannot be
        # attributed; counted, and the connection is rebuilt. (A collector that knows its
        # group, like chaos's, records it as an error sample instead.)
        with self._lock:
            self.unattributed.add(stage)

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)


def samples_table(samples: list[Sample]) -> pa.Table:
    return pa.Table.from_pydict({
        "flow": [f"{s.version}" for s in samples],
        "ts": pa.array([s.ts_ns for s in samples], pa.timestamp("ns", tz="UTC")),
        "latency_ns": [s.latency_ns for s in samples],
        "request_bytes": [s.request_bytes for s in samples],
        "response_bytes": [s.response_bytes for s in samples],
        "version": [s.version for s in samples],
        "stage": [s.stage for s in samples],
        "status": [s.status for s in samples],
        "error": [s.error for s in samples],
    }, schema=SAMPLES_SCHEMA)


# HAProxy's log line for the haproxy-log source, set in the frontend (or defaults):
#     log 127.0.0.1:5140 format raw local0
#     log-format "guardian-kpi %b %s %Ta %ST %U %B"
# HAProxy 2.6 timers have millisecond resolution, so latencies come in whole milliseconds (the
# gate's tests handle the ties); the load source measures in nanoseconds.
LOG_TAG = "guardian-kpi"


def parse_log_line(line: str) -> tuple[str, str, int, int, int, int] | None:
    """(backend, server, active_ms, status, request_bytes, response_bytes) or None."""
    position = line.find(LOG_TAG + " ")
    if position < 0:
        return None
    fields = line[position + len(LOG_TAG) + 1:].split()
    if len(fields) < 6:
        return None
    try:
        return fields[0], fields[1], int(fields[2]), int(fields[3]), int(fields[4]), int(fields[5])
    except ValueError:
        return None


class HAProxyLogCollector:
    """Listens on UDP for HAProxy's log lines of real traffic and keeps one sample per request."""

    def __init__(self, settings: KpiSettings, blue_name: str, green_name: str):
        self.settings = settings
        self.versions = {blue_name: "blue", green_name: "green"}
        host, _, port = settings.listen.rpartition(":")
        self.address = (host.strip("[]"), int(port))
        self.stage = WARMUP_STAGE
        self.samples: list[Sample] = []
        self.unattributed = Unattributed()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._socket.bind(self.address)
        except OSError as error:
            self._socket.close()
            from core.errors import WorkFailed

            raise WorkFailed(f"kpi.listen {self.settings.listen}: {error.strerror}") from None
        self._socket.settimeout(0.2)
        self._thread = threading.Thread(target=self._receive, name="kpi-haproxy-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._socket is not None:
            self._socket.close()

    def set_stage(self, stage: int) -> None:
        self.stage = stage

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                datagram = self._socket.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.time_ns()
            parsed = parse_log_line(datagram.decode(errors="replace"))
            version = None if parsed is None else self.versions.get(parsed[1])
            with self._lock:
                if version is None or parsed[2] < 0:
                    self.unattributed.add(self.stage)  # not our format, <NOSRV>, or aborted before a response
                    continue
                _, _, active_ms, status, request_bytes, response_bytes = parsed
                self.samples.append(Sample(version, self.stage, now, active_ms * 1_000_000, status,
                                           status >= 500 or status < 0, request_bytes, response_bytes))

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)


def make_collector(settings: KpiSettings, blue_name: str, green_name: str):
    if settings.source == "haproxy-log":
        return HAProxyLogCollector(settings, blue_name, green_name)
    return LoadCollector(settings, blue_name, green_name)
