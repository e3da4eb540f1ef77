"""Every fault kind injected on a real target on loopback, its effect measured through the path.

Targets are servers these tests start (an HTTP/1.1 server, a PostgreSQL 15 server, sleeping
processes under a restart loop); every nft table, proxy, stress-ng child and freezer cgroup a
fault creates is checked gone after remove(), after undo(record) alone, and after a SIGKILL of
the process that held it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.chaos.faults import injector_for, pathprobe
from agent.chaos.faults.nft import table_exists
from agent.chaos.faults.pressure import process_cpu_ticks, processes_with_environment, resident_bytes
from tests.conftest import PROJECT_ROOT
from tests.pg_server import PG_BIN, PgServer, postgres_available

pytestmark = pytest.mark.live

# A small HTTP/1.1 keep-alive server (asyncio protocol: it answers in ~50 us, so what the tests
# measure is the fault, not the server). GET /big answers 1 MB.
HTTP_SERVER = r"""
import asyncio, sys
class Handler(asyncio.Protocol):
    def connection_made(self, transport): self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            body = b"x" * 1048576 if head.startswith(b"GET /big") else b"ok\n"
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            if b"connection: close" in head.lower():
                self.transport.close()
async def main():
    server = await asyncio.get_running_loop().create_server(Handler, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def http_target():
    server = subprocess.Popen([sys.executable, "-c", HTTP_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        yield f"127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def make(spec: dict):
    cls = injector_for(spec["kind"])
    injector = cls(cls.validate(spec, "fault[0]"))
    injector.check()
    assert injector.plan()["undo"]
    return injector


def endpoint_of(target: str, probe: str = "http") -> pathprobe.Endpoint:
    host, port = target.rsplit(":", 1)
    return pathprobe.Endpoint(host, int(port), socket.AF_INET, probe)


def sequential_p50_ms(endpoint: pathprobe.Endpoint, count: int) -> float:
    """Keep-alive exchanges one after the other: the figure a pooled client sees."""
    return pathprobe.median_ms(pathprobe.round_trip(endpoint, requests_per_connection=count))


def proxy_pids(table: str) -> list[int]:
    from agent.chaos.faults.network import find_processes_with_argument
    return [identity["pid"] for identity in find_processes_with_argument(table)]


def test_latency_is_accurate_active_on_return_and_gone_on_removal(http_target):
    endpoint = endpoint_of(http_target)
    before = sequential_p50_ms(endpoint, 20)
    # A connection opened before the fault: NAT would never redirect it, so the fault resets it once.
    pooled = socket.create_connection(("127.0.0.1", endpoint.port))
    pooled.sendall(pathprobe.http_request(endpoint, close=False))
    assert pooled.recv(100).startswith(b"HTTP/1.1 200")

    injector = make({"kind": "latency", "target": http_target, "delay_ms": 25, "duration_s": 10})
    injector.apply()
    try:
        first = pathprobe.round_trip(endpoint)[0].latency_ms   # the very first request after apply()
        p50 = sequential_p50_ms(endpoint, 30)
        proof = injector.proof()
        table = injector.table
        assert table_exists(table) and proxy_pids(table)
        pooled.sendall(pathprobe.http_request(endpoint, close=False))
        with pytest.raises(ConnectionResetError):
            pooled.recv(100)
    finally:
        injector.remove()
        pooled.close()
    after = sequential_p50_ms(endpoint, 20)
    assert first >= 25
    added = p50 - before
    assert abs(added - 25) <= max(0.05 * 25, 1.0), (before, p50)
    assert proof["bit"] and proof["metric"] == "added_latency_ms_p50" and 15 <= proof["measured"] <= 40, proof
    assert not table_exists(table) and not proxy_pids(table)
    assert after < before + 2, (before, after)


def test_large_delay_is_accurate_within_five_percent(http_target):
    endpoint = endpoint_of(http_target)
    injector = make({"kind": "latency", "target": http_target, "delay_ms": 150, "duration_s": 10,
                     "existing": "keep"})
    injector.apply()
    try:
        samples = pathprobe.round_trip(endpoint, requests_per_connection=11)
    finally:
        injector.remove()
    assert len(samples) == 11 and all(s.status == 200 for s in samples)
    assert abs(pathprobe.median_ms(samples) - 150) <= 0.05 * 150


def test_jitter_spreads_the_delay_and_keeps_order(http_target):
    endpoint = endpoint_of(http_target)
    injector = make({"kind": "jitter", "target": http_target, "delay_ms": 20, "jitter_ms": 10, "duration_s": 10})
    injector.apply()
    try:
        samples = pathprobe.round_trip(endpoint, requests_per_connection=60)
    finally:
        injector.remove()
    values = sorted(s.latency_ms for s in samples)
    assert all(s.status == 200 for s in samples)
    assert 9 <= values[0]                           # never earlier than delay - jitter
    assert values[-5] - values[4] >= 8          # spread of the middle ~83%: uniform +-10 ms
    assert abs(pathprobe.median_ms(samples) - 20) <= 3


def test_http_errors_rolled_per_request(http_target):
    endpoint = endpoint_of(http_target)
    injector = make({"kind": "http_error", "target": http_target, "share_pct": 25, "status": 503, "duration_s": 10})
    injector.apply()
    try:
        # 5000 requests on 50 keep-alive connections: per request, not per connection.
        samples = pathprobe.many_round_trips(endpoint, 5000, parallel=4, requests_per_connection=100)
        proof = injector.proof()
    finally:
        injector.remove()
    injected = [s for s in samples if s.injected]
    assert len(samples) == 5000 and all(s.status in (200, 503) for s in samples)
    assert all(s.status == 503 for s in injected)
    assert abs(100 * len(injected) / len(samples) - 25) <= 2
    per_connection = {index: sum(s.injected for s in samples if s.connection == index) for index in range(50)}
    assert sorted({s.connection for s in samples}) == list(range(50))
    assert all(0 < count < 100 for count in per_connection.values()), per_connection
    assert proof["bit"] and abs(proof["measured"] - 25) <= 8
    clean = pathprobe.round_trip(endpoint, requests_per_connection=50)
    assert not any(s.injected for s in clean)


def test_loss_share_measured_through_the_path(http_target):
    endpoint = endpoint_of(http_target)
    injector = make({"kind": "loss", "target": http_target, "share_pct": 20, "duration_s": 10})
    injector.apply()
    try:
        lost_pct = 100 * (1 - pathprobe.connect_share(endpoint, 4000))
        proof = injector.proof()
    finally:
        injector.remove()
    assert abs(lost_pct - 20) <= 2, lost_pct
    assert proof["bit"] and proof["control"] <= 1
    assert pathprobe.connect_share(endpoint, 300) == 1.0
    assert not table_exists(injector.table)


@pytest.mark.parametrize("on", ["request", "connect"])
def test_reset_share(http_target, on):
    endpoint = endpoint_of(http_target)
    injector = make({"kind": "reset", "target": http_target, "share_pct": 30, "on": on, "duration_s": 10})
    injector.apply()
    try:
        # 1500 samples: the binomial sd at 30% is 1.18 points, so +-3.5 points is 3 sd. The
        # issue's +-2 points is benchmarks/bench_chaos.py's figure (5000 connections); 5000 here
        # took 10-37 s a variant on the shared host.
        share, connected = pathprobe.reset_share(endpoint, 1500)
        assert connected == 1500
        measured = 100 * share
        proof = injector.proof()
    finally:
        injector.remove()
    assert abs(measured - 30) <= 3.5, measured
    assert proof["bit"]
    assert pathprobe.reset_share(endpoint, 200)[0] == 0.0


def test_bandwidth_limit(http_target):
    endpoint = endpoint_of(http_target)
    rate = 400_000
    injector = make({"kind": "bandwidth", "target": http_target, "rate_bytes_per_s": rate, "duration_s": 10})
    injector.apply()
    try:
        measured = pathprobe.upload_rate_bytes_per_s(endpoint, 1.5)
        started = time.monotonic()
        endpoint.path = "/big"
        download = pathprobe.round_trip(endpoint)[0]
        download_s = time.monotonic() - started
        endpoint.path = "/"
        proof = injector.proof()
    finally:
        injector.remove()
    assert 0.5 * rate <= measured <= 1.3 * rate, measured
    # nft's byte bucket holds one second of rate + burst: that much passes at once, then the rate.
    bucket = rate + 16384
    assert download.status == 200 and download_s >= (1_048_576 - bucket) / rate * 0.8, download_s
    assert proof["bit"] and proof["control"] > 3 * rate, proof


@pytest.fixture(scope="module")
def postgres():
    reason = postgres_available()
    if reason:
        pytest.skip(f"LIVE TEST SKIPPED: {reason}")
    server = PgServer(statement_logging=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def psql_tcp_seconds(port: int) -> float:
    env = dict(os.environ, PGSSLMODE="disable", PGCONNECT_TIMEOUT="5")
    started = time.monotonic()
    done = subprocess.run([str(PG_BIN / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U",
                           "postgres", "-d", "postgres", "-c", "SELECT 1"], capture_output=True, text=True, env=env,
                          timeout=20)
    assert done.stdout.strip() == "1", done.stderr
    return time.monotonic() - started


def test_postgres_latency(postgres):
    target = f"127.0.0.1:{postgres.port}"
    endpoint = endpoint_of(target, "postgres")
    before = pathprobe.median_ms(pathprobe.many_round_trips(endpoint, 20, parallel=1))
    query_before_s = psql_tcp_seconds(postgres.port)
    injector = make({"kind": "postgres_latency", "target": target, "delay_ms": 100, "duration_s": 10})
    injector.apply()
    try:
        during = pathprobe.median_ms(pathprobe.many_round_trips(endpoint, 20, parallel=5))
        query_during_s = psql_tcp_seconds(postgres.port)     # a real query over TCP, 2 round trips
        proof = injector.proof()
    finally:
        injector.remove()
    assert abs(during - before - 100) <= 5, (before, during)
    assert query_during_s >= 2 * 0.100 * 0.95 > query_before_s
    assert proof["bit"] and proof["probe"] == "postgres"


def stress_marker_processes(marker: str) -> list[dict]:
    return processes_with_environment(marker)


def test_cpu_pressure_on_one_cpu():
    cpu = max(os.sched_getaffinity(0))
    injector = make({"kind": "cpu", "cpus": str(cpu), "load_pct": 50, "duration_s": 10})
    injector.apply()
    try:
        workers = injector.workers()
        affinity = [os.sched_getaffinity(pid) for pid in workers]
        proof = injector.proof()
    finally:
        injector.remove()
    assert workers and all(mask == {cpu} for mask in affinity)
    # Never more than asked; less when the shared machine's other work competes for the CPU.
    assert proof["bit"] and 15 <= proof["stress_pct"] <= 70 and proof["measured"] >= 45, proof
    assert not stress_marker_processes(injector.undo_record()["marker"])


def test_cpu_pressure_inside_a_cgroup():
    group = Path(f"/sys/fs/cgroup/cpu/guardian_chaos_test_{os.getpid()}")
    group.mkdir()
    try:
        injector = make({"kind": "cpu", "cgroup": group.name, "load_pct": 30, "duration_s": 10})
        injector.apply()
        try:
            proof = injector.proof()
            workers = injector.workers()
            members = set((group / "cgroup.procs").read_text().split())
        finally:
            injector.remove()
        assert workers and {str(pid) for pid in workers} <= members
        assert proof["bit"]
        assert (group / "cgroup.procs").read_text().strip() == ""
    finally:
        group.rmdir()


def test_memory_pressure():
    size = 128 << 20
    injector = make({"kind": "memory", "size_bytes": size, "duration_s": 10})
    injector.apply()
    try:
        proof = injector.proof()
    finally:
        injector.remove()
    assert proof["bit"] and size * 0.9 <= proof["measured"] <= size * 1.3, proof
    assert not stress_marker_processes(injector.undo_record()["marker"])


COUNTER = "import sys, time\nn = 0\nwhile True:\n    n += 1\n    print(n, flush=True)\n    time.sleep(0.01)\n"


def lines_within(stream, seconds: float) -> int:
    import select
    count, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            count += bool(stream.readline())
    return count


def test_pause_freezes_and_undo_record_alone_thaws():
    victim = subprocess.Popen([sys.executable, "-c", COUNTER], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline()                                # the interpreter is up
        assert lines_within(victim.stdout, 0.3) > 5
        injector = make({"kind": "pause", "pid": victim.pid, "duration_s": 10})
        record = json.loads(json.dumps(injector.undo_record()))    # what the journal holds
        injector.apply()
        lines_within(victim.stdout, 0.05)                              # what was already in the pipe
        frozen_lines = lines_within(victim.stdout, 0.4)
        proof = injector.proof()
        group = Path(record["freeze_cgroup"])
        assert group.is_dir() and not injector.owned_by_kernel
        # Undo from the journal record alone, as abort / sweep / the watchdog do.
        type(injector).undo(record)
        type(injector).undo(record)                                    # idempotent
        thawed_lines = lines_within(victim.stdout, 0.4)
        assert frozen_lines == 0 and thawed_lines > 5
        assert proof["bit"] and proof["freezer_frozen"] is True
        assert not group.exists()
        assert str(victim.pid) in Path(record["home_cgroup"], "cgroup.procs").read_text().split()
    finally:
        victim.kill()
        victim.wait()


SUPERVISOR = "while true; do sleep 60 & echo $! > \"$1\"; wait $!; sleep 0.05; done"


def test_kill_measures_the_restart(tmp_path):
    pid_file = tmp_path / "service.pid"
    supervisor = subprocess.Popen(["bash", "-c", SUPERVISOR, "supervisor", str(pid_file)])
    try:
        deadline = time.monotonic() + 3
        # `echo $! > file` creates the file before it writes the pid: wait for the whole line.
        while not (pid_file.exists() and pid_file.read_text().endswith("\n")) and time.monotonic() < deadline:
            time.sleep(0.01)
        first = int(pid_file.read_text())
        injector = make({"kind": "kill", "pid_file": str(pid_file), "duration_s": 5})
        injector.apply()
        deadline = time.monotonic() + 3
        while injector.proof()["measured"] is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proof = injector.proof()
        injector.remove()
        assert proof["bit"] and proof["killed_pid"] == first
        assert proof["successor_pid"] == int(pid_file.read_text()) != first
        assert 0.04 <= proof["measured"] <= 1.0, proof
    finally:
        os.killpg(os.getpgid(supervisor.pid), signal.SIGKILL) if False else supervisor.kill()
        supervisor.wait()
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


# A process holding owned faults, then SIGKILLed: the kernel must clean up without anyone's help.
HOLDER = r"""
import json, sys
from agent.chaos.faults import injector_for
held = []
for spec in json.loads(sys.argv[1]):
    cls = injector_for(spec["kind"])
    injector = cls(cls.validate(spec, "fault"))
    injector.check()
    injector.apply()
    held.append(injector.undo_record())
print(json.dumps(held), flush=True)
sys.stdin.read()
"""


def start_holder(specs: list[dict]) -> tuple[subprocess.Popen, list[dict]]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(specs)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    return holder, json.loads(holder.stdout.readline())


def test_sigkill_of_the_holder_leaves_no_fault_within_two_seconds(http_target):
    endpoint = endpoint_of(http_target)
    holder, records = start_holder([
        {"kind": "latency", "target": http_target, "delay_ms": 100, "duration_s": 30},
        {"kind": "loss", "target": "127.0.0.1:9", "share_pct": 50, "duration_s": 30},
        {"kind": "cpu", "cpus": str(max(os.sched_getaffinity(0))), "load_pct": 20, "duration_s": 30},
    ])
    tables = [record["table"] for record in records if "table" in record]
    marker = records[2]["marker"]
    assert all(table_exists(table) for table in tables) and proxy_pids(tables[0])
    assert stress_marker_processes(marker)
    assert sequential_p50_ms(endpoint, 3) >= 100
    holder.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    holder.wait()
    while (any(table_exists(t) for t in tables) or proxy_pids(tables[0]) or stress_marker_processes(marker)) \
            and time.monotonic() - killed_at < 5:
        time.sleep(0.01)
    gone_s = time.monotonic() - killed_at
    assert gone_s <= 2.0, gone_s
    assert not any(table_exists(t) for t in tables)
    assert sequential_p50_ms(endpoint, 3) < 20
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert not any(table in ruleset for table in tables)


def test_undo_record_alone_removes_a_live_owned_fault(http_target):
    """`chaos abort` from another process while the agent still lives (hung, say)."""
    endpoint = endpoint_of(http_target)
    holder, records = start_holder([{"kind": "http_error", "target": http_target, "share_pct": 100,
                                     "duration_s": 30}])
    try:
        assert all(s.injected for s in pathprobe.round_trip(endpoint, requests_per_connection=5))
        injector_for("http_error").undo(records[0])
        assert not table_exists(records[0]["table"]) and not proxy_pids(records[0]["table"])
        assert not any(s.injected for s in pathprobe.round_trip(endpoint, requests_per_connection=5))
        assert holder.poll() is None           # the agent itself was not touched
    finally:
        holder.kill()
        holder.wait()


# SIGKILL at named points of apply(): right as it starts (cpu: its stopped standby workers and cap
# child exist), 20/60 ms into it (a proxy is starting, nft is being fed), and once it returned. Residue is searched by the holder's pid, which every
# name the injectors create carries (tables, proxy argv, stress-ng environment).
STEPPER = r"""
import json, sys
from agent.chaos.faults import injector_for
spec = json.loads(sys.argv[1])
cls = injector_for(spec["kind"])
injector = cls(cls.validate(spec, "fault"))
injector.check()
print("applying", flush=True)
injector.apply()
print("applied", flush=True)
sys.stdin.read()
"""


def residue_of(pid: int) -> list[str]:
    found = []
    ruleset = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [line for line in ruleset.splitlines() if f"_{pid}_" in line]
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes()
            environment = Path(entry.path, "environ").read_bytes()
            state = Path(entry.path, "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state == b"Z":
            continue
        if f"_{pid}_".encode() in argv or f"_{pid}\0".encode() in environment + b"\0" and \
                b"GUARDIAN_CHAOS_FAULT=" in environment:
            found.append(f"process {entry.name}: {argv[:80]!r}")
    return found


@pytest.mark.parametrize("kind, kill_after_s", [("latency", 0.0), ("latency", 0.02), ("latency", 0.06),
                                                ("http_error", None), ("loss", 0.0), ("memory", 0.02),
                                                ("cpu", 0.0)])
def test_sigkill_during_apply_leaves_nothing(http_target, kind, kill_after_s):
    specs = {"latency": {"delay_ms": 50}, "http_error": {"share_pct": 50}, "loss": {"share_pct": 50},
             "memory": {"size_bytes": 256 << 20}, "cpu": {"cpus": str(max(os.sched_getaffinity(0)))}}
    spec = {"kind": kind, "duration_s": 30, **specs[kind]}
    if kind not in ("memory", "cpu"):
        spec["target"] = http_target
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    holder = subprocess.Popen([sys.executable, "-c", STEPPER, json.dumps(spec)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "applying"
    if kill_after_s is None:
        assert holder.stdout.readline().strip() == "applied"
        assert residue_of(holder.pid)          # the fault is really there before the kill
    else:
        time.sleep(kill_after_s)
    holder.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    holder.wait()
    while residue_of(holder.pid) and time.monotonic() - killed_at < 5:
        time.sleep(0.02)
    assert time.monotonic() - killed_at <= 2.0, residue_of(holder.pid)
    assert not residue_of(holder.pid)


def process_state(pid: int) -> str:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return raw[raw.rfind(b")") + 2:].split()[0].decode()


def test_pressure_standby_is_stopped_capped_at_duration_and_discarded():
    """check() leaves cpu and memory on standby: stopped, using no CPU and holding no memory, and
    discard() (a run refused before apply) ends it; applied, each ends at duration_s by itself
    (the cap child / alarm), without remove()."""

    cpu = make({"kind": "cpu", "cpus": str(max(os.sched_getaffinity(0))), "load_pct": 100, "duration_s": 1})
    memory = make({"kind": "memory", "size_bytes": 128 << 20, "duration_s": 1})
    markers = [cpu.undo_record()["marker"], memory.undo_record()["marker"]]
    try:
        workers = cpu.workers()
        ticks_before = process_cpu_ticks(workers)
        time.sleep(0.3)
        assert workers and {process_state(pid) for pid in workers} == {"T"}
        assert process_cpu_ticks(workers) == ticks_before
        assert process_state(cpu.cap.pid) == process_state(memory.child.pid) == "T"
        assert resident_bytes(memory.workers()) < 32 << 20
        for injector in (cpu, memory):
            injector.discard()
        assert not any(stress_marker_processes(marker) for marker in markers)
        for injector in (cpu, memory):
            injector.apply()                   # a fresh standby, then SIGCONT
        assert resident_bytes(memory.workers()) >= (128 << 20) * 0.9
        assert cpu.proof()["bit"]
        deadline = time.monotonic() + 3
        while any(stress_marker_processes(marker) for marker in markers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(stress_marker_processes(marker) for marker in markers)
    finally:
        for injector in (cpu, memory):
            injector.remove()


def test_runner_refusing_a_run_ends_the_standby(tmp_path):
    """A run that was not steady (nothing listens on its URL) injects nothing and leaves no
    stopped standby behind, as does a check() failing on a later fault."""
    from agent.chaos.experiment import load_experiment
    from agent.chaos.runner import ChaosRun, prepare_injectors
    from core.errors import BadInput
    from core.host import Host

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "pressure.toml"
    text = f"""
title = "pressure"
hypothesis = "nothing"
environment = "paper-trading"
[steady_state]
url = "http://127.0.0.1:{port}/"
rate_per_s = 20
before_s = 1
after_s = 1
max_error_rate_pct = 1
max_p99_ms = 200
[[fault]]
kind = "cpu"
cpus = "{max(os.sched_getaffinity(0))}"
load_pct = 20
duration_s = 5
[[fault]]
kind = "memory"
size_bytes = {64 << 20}
duration_s = 5
"""
    path.write_text(text)
    experiment = load_experiment(path)
    injectors = prepare_injectors(experiment, Host.real())
    markers = [injector.undo_record()["marker"] for injector in injectors]
    assert all(stress_marker_processes(marker) for marker in markers)
    outcome = ChaosRun(experiment, injectors, tmp_path, "test-refused").run()
    assert outcome.verdict == "not-steady" and all(record.applying_ns is None for record in outcome.faults)
    assert not any(stress_marker_processes(marker) for marker in markers)
    path.write_text(text + '[[fault]]\nkind = "cpu"\ncgroup = "guardian_chaos_no_such_group"\nduration_s = 5\n')
    before = {pid for pid in os.listdir("/proc") if pid.isdigit()}
    with pytest.raises(BadInput):
        prepare_injectors(load_experiment(path), Host.real())
    started = {pid for pid in os.listdir("/proc") if pid.isdigit()} - before
    assert not [pid for pid in started if Path(f"/proc/{pid}").exists() and b"GUARDIAN_CHAOS_FAULT="
                in Path(f"/proc/{pid}/environ").read_bytes() and process_state(int(pid)) != "Z"]
