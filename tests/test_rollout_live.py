"""Live rollouts: a real HAProxy 2.6 on loopback in front of two small HTTP services.

The services are this file run as a script (`python tests/test_rollout_live.py serve ...`): a
threading HTTP/1.1 server that sleeps `delay_ms` and answers 500 for a share `error_rate` of
requests. The driver runs as the real CLI in a subprocess and generates its own load through the
HAProxy frontend.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
THIS_FILE = Path(__file__).resolve()


def serve(port: int, name: str, delay_ms: float, error_rate: float, sick_file: str = "", tail_ms: str = "0") -> None:
    """`sick_file`: while that file exists, /health answers 503 (HAProxy's httpchk marks it DOWN).
    `tail_ms`: 3% of requests take that much longer (a fat tail, median unchanged)."""
    generator = random.Random(port)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body in one segment, sent at once: otherwise Nagle + delayed ACK add ~40 ms
        # to every keep-alive response and swamp the 2 ms the test injects.
        wbufsize = 65536
        disable_nagle_algorithm = True

        def do_GET(self):  # noqa: N802 - http.server naming
            # The validate hook's health check: never delayed, never failed (the injected errors
            # are for traffic; a 2% chance of failing the smoke test made the test flaky).
            health = self.path == "/health"
            if not health:
                slow = float(tail_ms) if generator.random() < 0.03 else 0.0
                time.sleep((delay_ms + slow) / 1000.0)
            failed = not health and generator.random() < error_rate
            sick = health and bool(sick_file) and os.path.exists(sick_file)
            body = (b"error\n" if failed or sick else b"ok " + name.encode() + b"\n")
            self.send_response(503 if sick else 500 if failed else 200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.daemon_threads = True
    with ThreadingHTTPServer(("127.0.0.1", port), Handler) as server:
        server.serve_forever()


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class ClientLoad:
    """The users' traffic, independent of the driver: keep-alive clients through the frontend that
    count every response by server and every non-2xx answer and connection error. Bounded: stops
    by itself after `max_s`."""

    def __init__(self, port: int, clients: int = 2, max_s: float = 120.0):
        import threading

        self.port, self.max_s = port, max_s
        self.served: dict[str, int] = {}
        self.non_2xx = 0
        self.connection_errors = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "ClientLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=10)

    @property
    def errors(self) -> int:
        return self.non_2xx + self.connection_errors

    def _client(self) -> None:
        import http.client

        deadline = time.monotonic() + self.max_s
        connection = None
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                connection = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                server = response.getheader("X-Served-By", "?")
                with self.lock:
                    self.served[server] = self.served.get(server, 0) + 1
                    self.non_2xx += not 200 <= response.status < 300
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.connection_errors += 1
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(0.01)
            time.sleep(0.002)
        if connection is not None:
            connection.close()


class Setup:
    """HAProxy + blue + green, torn down by the fixture."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.processes: list[subprocess.Popen] = []
        self.frontend, self.blue_port, self.green_port = free_ports(3)
        self.socket = tmp_path / "admin.sock"

    def start_service(self, port: int, name: str, delay_ms: float, error_rate: float,
                      tail_ms: float = 0.0) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, str(THIS_FILE), "serve", str(port), name, str(delay_ms),
                                    str(error_rate), str(self.dir / f"{name}.sick"), str(tail_ms)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes.append(process)
        wait_for_port(port)
        return process

    def sick(self, name: str, sick: bool = True) -> None:
        """Make a service's /health answer 503 (or 200 again)."""
        marker = self.dir / f"{name}.sick"
        marker.touch() if sick else marker.unlink(missing_ok=True)

    def start(self, green_delay_ms: float = 1.0, green_error_rate: float = 0.0, balance: str = "roundrobin",
              log_port: int | None = None, green_sick: bool = False, green_weight: int = 0,
              green_tail_ms: float = 0.0) -> None:
        self.sick("green", green_sick)
        self.start_service(self.blue_port, "blue", 1.0, 0.0)
        self.start_service(self.green_port, "green", green_delay_ms, green_error_rate, green_tail_ms)
        self.balance, self.log_port, self.green_weight = balance, log_port, green_weight
        self.start_haproxy()

    def start_haproxy(self, rewrite: bool = True) -> None:
        config = self.dir / "haproxy.cfg"
        balance, log_port = self.balance, self.log_port
        if rewrite:
            self.write_config(config, balance, log_port)
        self.socket.unlink(missing_ok=True)
        self.haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes.append(self.haproxy)
        wait_for_port(self.frontend)
        deadline = time.monotonic() + 5
        while not self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def write_config(self, config: Path, balance: str, log_port: int | None) -> None:
        config.write_text(textwrap.dedent(f"""\
            global
                stats socket {self.socket} mode 600 level admin
            defaults
                mode http
                timeout connect 1s
                timeout client 10s
                timeout server 10s
                # A check answer may take a while on this shared 2-core host: a 100 ms check
                # timeout marked a healthy green DOWN in 1 of 10 benchmark runs.
                timeout check 1s
            frontend fe
                bind 127.0.0.1:{self.frontend}
                default_backend app
            """) + (textwrap.indent(textwrap.dedent(f"""\
                log 127.0.0.1:{log_port} format raw local0
                log-format "guardian-kpi %b %s %Ta %ST %U %B"
            """), "    ") if log_port else "") + textwrap.dedent(f"""\
            backend app
                balance {balance}
                option httpchk GET /health
                http-response set-header X-Served-By %s
                server blue 127.0.0.1:{self.blue_port} weight {100 - self.green_weight} check inter 100ms fall 2 rise 1
                server green 127.0.0.1:{self.green_port} weight {self.green_weight} check inter 100ms fall 2 rise 1
            """))

    def restart_haproxy(self) -> None:
        """A balancer restart: a new process with the config file's weights, as on disk."""
        self.haproxy.terminate()
        self.haproxy.wait(timeout=5)
        self.processes.remove(self.haproxy)
        self.start_haproxy(rewrite=False)

    def reload_haproxy(self) -> None:
        """A seamless reload (`haproxy -sf OLD`, what `systemctl reload` does): no moment without a
        listener or an admin socket, and the runtime weights are back to the config file's."""
        old = self.haproxy
        config = self.dir / "haproxy.cfg"
        self.haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(config), "-sf", str(old.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes.append(self.haproxy)

    def admin(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.connect(str(self.socket))
            connection.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode().strip()

    def weight(self, server: str) -> int:
        return int(self.admin(f"get weight app/{server}").split()[0])

    def served_by(self, requests: int = 200) -> dict[str, int]:
        import http.client

        counts: dict[str, int] = {}
        connection = http.client.HTTPConnection("127.0.0.1", self.frontend, timeout=5)
        for _ in range(requests):
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            name = response.getheader("X-Served-By", "?")
            counts[name] = counts.get(name, 0) + 1
        connection.close()
        return counts

    def plan(self, stages: list[tuple[float, float, float]], prepare: str = "true",
             extra: str = 'on_inconclusive = "advance"', kpi: str | None = None, gate: str | None = None, tables: str = "",
             validate: str | None = None, baseline_s: float = 0.5) -> Path:
        validate = validate or (f"python3 -c 'import urllib.request; "
                                f"urllib.request.urlopen(\\\"http://127.0.0.1:{self.green_port}/health\\\")'")
        kpi = (kpi or f'url = "http://127.0.0.1:{self.frontend}/"\nconcurrency = 4') + f"\nbaseline_s = {baseline_s}"
        kpi = kpi.replace("\n", "\n            ")
        gate = (LOOSE_GATE if gate is None else gate).replace("\n", "\n            ")
        tables = tables.replace("\n", "\n            ")
        stage_text = "\n".join(f"[[stage]]\nweight_pct = {w}\ndwell_s = {d}\nmax_dwell_s = {m}\n"
                               for w, d, m in stages)
        path = self.dir / "rollout.toml"
        path.write_text(textwrap.dedent(f"""\
            name = "test-green"
            state_dir = "{self.dir / 'state'}"
            evaluate_every_s = 0.5
            {extra}
            [prepare]
            commands = ["{prepare}"]
            [validate]
            commands = ["{validate}"]
            [traffic]
            adapter = "haproxy"
            socket = "{self.socket}"
            backend = "app"
            wait_up_s = 3
            [kpi]
            {kpi}
            {tables}
            {gate}
            """) + stage_text)
        return path

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


# The gate settings the first live tests used, from before the like-with-like baseline: two
# identical services at 10% and 90% of the load on this shared 2-core VM differ by up to ~30% at
# p99 while other jobs run. Tests of the defaults pass gate="".
LOOSE_GATE = """\
[gate]
min_samples = 30
[metrics."turns.latency_ns"]
threshold_pct = 30
[metrics."turns.latency_ns.p99"]
threshold_pct = 100
[metrics."turns.error_rate"]
threshold_pct = 1.0
"""


@pytest.fixture
def lb(tmp_path):
    if not Path(HAPROXY).exists():
        pytest.skip("LIVE TEST SKIPPED: haproxy not installed (make setup installs it)")
    setup = Setup(tmp_path)
    yield setup
    setup.stop()


def journal_events(setup: Setup) -> list[dict]:
    path = setup.dir / "state" / "test-green.journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


STAGES = [(1, 1, 2), (10, 1.5, 4), (50, 1.5, 4), (100, 2, 6)]


@pytest.mark.live
def test_good_green_promotes_through_all_stages(lb, agent_cli):
    lb.start(green_delay_ms=1.0)
    result = agent_cli("rollout", "--plan", str(lb.plan(STAGES)), timeout=90)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "promoted" in result.stdout
    assert lb.weight("green") == 100 and lb.weight("blue") == 0
    events = journal_events(lb)
    started = [e["weight_pct"] for e in events if e["event"] == "stage_started"]
    assert started == [1, 10, 50, 100]
    assert [e["event"] for e in events][-2:] == ["promoted", "roles"]
    assert set(lb.served_by(50)) == {"green"}
    status = agent_cli("rollout", "status", "--plan", str(lb.plan(STAGES)), "--json")
    assert json.loads(status.stdout)["status"] == "promoted"


def _assert_rolled_back_at_first_judged_stage(lb, result):
    assert result.returncode == 1, result.stderr + result.stdout
    assert lb.weight("green") == 0 and lb.weight("blue") == 100
    assert set(lb.served_by(100)) == {"blue"}
    events = journal_events(lb)
    decisions = [e for e in events if e["event"] == "decision"]
    rollback = decisions[-1]
    assert rollback["decision"] == "rollback" and rollback["verdict"] == "fail"
    # Every stage before the rollback advanced only because it lacked samples, never on a pass.
    for earlier in decisions[:-1]:
        assert earlier["decision"] == "advance" and earlier["verdict"] != "pass", earlier
    done = [e for e in events if e["event"] == "rolled_back"][-1]
    assert done["decision_to_blue_ms"] < 1000
    report = Path(result.stdout.split("report: ")[1].split()[0])
    from reports.bundle import Bundle

    bundle = Bundle(report)
    assert {"turns", "rollout_stages", "rollout_verdicts", "findings"} <= set(bundle.table_names())
    assert bundle.manifest["rollout"]["status"] == "rolled_back"
    return rollback, report


@pytest.mark.live
def test_green_with_2ms_more_latency_is_rolled_back(lb, agent_cli):
    lb.start(green_delay_ms=3.0)
    result = agent_cli("rollout", "--plan", str(lb.plan(STAGES)), timeout=90)
    rollback, report = _assert_rolled_back_at_first_judged_stage(lb, result)
    assert rollback["metrics"]["turns.latency_ns"][0] == "fail"
    # The post-mortem re-judged by the gate CLI: the same verdict, then a looser setting.
    rejudged = agent_cli("gate", "--rollout", str(report), "--no-record", "--json")
    assert rejudged.returncode == 1, rejudged.stderr
    # By default with the plan's own gate settings (30%, not the gate's 20%), on the samples up to
    # the decision: the same counts the driver's rollback decision journaled.
    latency = next(m for m in json.loads(rejudged.stdout)["metrics"] if m["metric"] == "turns.latency_ns")
    assert latency["threshold_pct"] == 30
    # (within the four requests in flight at the snapshot: their ends are known to the microsecond only)
    for counted, journaled in zip([latency["baseline_count"], latency["candidate_count"]],
                                  rollback["metrics"]["turns.latency_ns"][1:3], strict=True):
        assert abs(counted - journaled) <= 4, (counted, journaled)
    loose = lb.dir / "loose.toml"
    loose.write_text('[metrics."turns.latency_ns"]\nthreshold_pct = 100000\n'
                     '[metrics."turns.latency_ns.p99"]\nthreshold_pct = 100000\n')
    relaxed = agent_cli("gate", "--rollout", str(report), "--config", str(loose), "--no-record", "--json")
    latency = next(m for m in json.loads(relaxed.stdout)["metrics"] if m["metric"] == "turns.latency_ns")
    assert latency["classification"] != "fail" and relaxed.returncode != 1
    _post_mortem_page_shows_the_failing_decision(report, lb.dir)


def _post_mortem_page_shows_the_failing_decision(report: Path, scratch: Path) -> None:
    """The post-mortem's report.html in Chromium: the latest gate decision's counts and effect
    as rollout_verdicts.parquet holds them."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tests.report_browser import check_page, chromium_missing_reason, shown_number

    if chromium_missing_reason():
        pytest.skip(chromium_missing_reason())  # after every other check of the rollback
    cells = check_page(report / "report.html", scratch)
    verdicts = pq.read_table(report / "rollout_verdicts.parquet")
    latest = verdicts.filter(pc.equal(verdicts["decided_at"], pc.max(verdicts["decided_at"]))).to_pylist()
    judged = [row for row in latest if row["metric"] and row["effect_pct"] is not None]
    assert judged
    for row in judged:
        assert shown_number(cells[f"gate:{row['metric']}:effect_pct"]) == pytest.approx(row["effect_pct"], abs=0.0005)
        assert shown_number(cells[f"gate:{row['metric']}:baseline_count"]) == row["baseline_count"]


@pytest.mark.live
def test_green_with_2pct_errors_is_rolled_back(lb, agent_cli):
    lb.start(green_delay_ms=1.0, green_error_rate=0.02)
    result = agent_cli("rollout", "--plan", str(lb.plan(STAGES)), timeout=90)
    rollback, _ = _assert_rolled_back_at_first_judged_stage(lb, result)
    assert rollback["metrics"]["turns.error_rate"][0] == "fail"


@pytest.mark.live
def test_real_traffic_from_haproxy_logs_rolls_back_a_slow_green(lb, agent_cli):
    import http.client
    import threading

    (log_port,) = free_ports(1)
    lb.start(green_delay_ms=3.0, log_port=log_port)
    stop = threading.Event()

    def client():  # the paper-trading traffic the driver only observes
        while not stop.is_set():
            connection = http.client.HTTPConnection("127.0.0.1", lb.frontend, timeout=5)
            try:
                for _ in range(100):
                    connection.request("GET", "/")
                    connection.getresponse().read()
            except OSError:
                time.sleep(0.01)
            finally:
                connection.close()

    clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        plan = lb.plan(STAGES, kpi=f'source = "haproxy-log"\nlisten = "127.0.0.1:{log_port}"')
        result = agent_cli("rollout", "--plan", str(plan), timeout=90)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=10)
    rollback, report = _assert_rolled_back_at_first_judged_stage(lb, result)
    assert rollback["metrics"]["turns.latency_ns"][0] == "fail"
    from reports.bundle import Bundle

    latencies = Bundle(report).table("turns").column("latency_ns").to_pylist()
    assert latencies and all(value % 1_000_000 == 0 for value in latencies)  # HAProxy's ms timers


@pytest.mark.live
def test_killing_the_driver_mid_stage_leaves_blue_serving(lb):
    lb.start(green_delay_ms=1.0)
    plan = lb.plan([(10, 30, 60), (100, 30, 60)])
    env = dict(os.environ, PYTHONPATH=str(THIS_FILE.parent.parent))
    driver = subprocess.Popen([sys.executable, "-m", "agent.cli", "rollout", "--plan", str(plan)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              cwd=THIS_FILE.parent.parent)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if lb.weight("green") == 10:
                break
            time.sleep(0.1)
        assert lb.weight("green") == 10, "the driver never reached the 10% stage"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=5)
        deadline = time.monotonic() + 10
        while lb.weight("green") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert lb.weight("green") == 0 and lb.weight("blue") == 100
    assert set(lb.served_by(100)) == {"blue"}
    events = journal_events(lb)
    assert events[-1]["event"] == "rolled_back" and "watchdog" in events[-1]["reason"]


@pytest.mark.live
def test_static_balancing_is_refused_before_any_step(lb, agent_cli):
    lb.start(balance="static-rr")
    marker = lb.dir / "prepared"
    result = agent_cli("rollout", "--plan", str(lb.plan(STAGES, prepare=f"touch {marker}")))
    assert result.returncode == 2 and "refuses runtime weights" in result.stderr, result.stderr
    assert not marker.exists() and lb.weight("green") == 0


if __name__ == "__main__" and len(sys.argv) in (6, 7, 8) and sys.argv[1] == "serve":
    serve(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), *sys.argv[6:])
