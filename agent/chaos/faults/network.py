"""Faults on the path to a TCP dependency (host:port): latency, jitter, PostgreSQL latency, HTTP
errors (through the fault proxy), packet loss, connection resets and a bandwidth limit (nft only).

Backends:
- netem, the kernel's own delay and loss, where sch_netem loads (agent/chaos/faults/netem.py):
  latency, jitter, PostgreSQL latency and loss go on an htb class fed by a u32 filter. A qdisc is
  owned by no process, so its exact undo is journaled before apply and the watchdog runs it if
  the agent dies. Not on this host (kernel 6.18 without sch_netem): the fallbacks below.
- delay and HTTP errors: an nft `flags owner` table redirects new connections to the target into
  the fault proxy (agent.chaos.faults.proxy); the proxy's upstream sockets carry SO_MARK so the
  rule skips them. NAT only sees new connections, so connections established before the fault
  are reset once (`existing = "reset"`, the default) and their clients reconnect through the
  fault; `existing = "keep"` leaves them alone (and unfaulted).
- loss (`numgen random ... drop`), resets (`reject with tcp reset`) and bandwidth
  (`limit rate over ... drop`) are rules in an owner table: nothing to undo when the agent dies.

Rules act in the output hook: the clients of the dependency are processes on this host (the
system under test), the common case on a trading server; traffic forwarded for other hosts or
namespaces is not touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from core.errors import BadInput, Unavailable, WorkFailed
from core.host import Host

from . import netem, pathprobe
from .base import (Injector, end_process_group, is_same_process, number, process_identity, run_id, share,
                   spawn_owned, text, OBJECT_PREFIX)
from .nft import NFT_FAMILY, OwnedTable, nft_availability, nft_binary, table_exists

PROJECT_ROOT = Path(__file__).resolve().parents[3]
# The proxy's and the probes' sockets carry this mark; every rule of a fault returns on it.
MARK_BASE = 0x47410000
# A ct mark bit set on every connection a latency fault saw being opened, so the reset rule can
# tell connections established before the fault (bit clear) from those it redirected or skipped.
SEEN_CT_BIT = 0x40000000
PROXY_READY_TIMEOUT_S = 3.0
TABLE_GONE_TIMEOUT_S = 1.0


# --- targets -----------------------------------------------------------------------------------
def parse_endpoint(value, where: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); syntax only (resolution happens in check())."""
    if not isinstance(value, str) or ":" not in value:
        raise BadInput(f"{where}: must be \"host:port\" (for example \"127.0.0.1:8300\")")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BadInput(f"{where}: must be \"host:port\" with a port between 1 and 65535")
    return host, int(port_text)


def resolve(host: str, port: int, where: str) -> tuple[str, int]:
    """-> (numeric address, family). One address: rules name exactly what the plan shows."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise BadInput(f"{where}: {host!r} does not resolve ({error.strerror})") from None
    family, _type, _proto, _name, address = sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
    return address[0], family


def _ip(family: int) -> str:
    return "ip" if family == socket.AF_INET else "ip6"


def holder_marker(table: str) -> str:
    # `nft -I DIR` only adds an include search path; the name in argv lets undo() find the
    # holder of a table from the journal record alone.
    return f"/run/{table}"


def find_processes_with_argument(argument: str) -> list[dict]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in argv:
            found.append(process_identity(int(entry.name)))
    return found


def wait_table_gone(table: str, timeout_s: float = TABLE_GONE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while table_exists(table):
        if time.monotonic() > deadline:
            raise WorkFailed(f"nft table {NFT_FAMILY} {table} still present {timeout_s:g} s after its holder ended")
        time.sleep(0.01)


def undo_owned_table(record: dict) -> None:
    """Undo for every nft-owned fault: end the proxy and/or holder; the kernel drops the table."""
    table = record["table"]
    for identity in find_processes_with_argument(table) + find_processes_with_argument(holder_marker(table)):
        end_process_group(identity)
    wait_table_gone(table)


class TargetInjector(Injector):
    """Common part of every fault on host:port."""

    keys = frozenset({"target"})
    required = frozenset({"target"})
    default_probe = "http"

    @classmethod
    def normalise(cls, spec: dict, where: str) -> dict:
        parse_endpoint(spec["target"], f"{where}.target")
        probe = text(spec, "probe", where, cls.default_probe, ("http", "postgres", "connect")) \
            if "probe" in cls.keys else cls.default_probe
        spec["probe"] = probe
        if "probe_path" in cls.keys:
            path = text(spec, "probe_path", where, "/")
            if not path.startswith("/"):
                raise BadInput(f"{where}.probe_path: must start with /")
            spec["probe_path"] = path
        return cls.normalise_kind(spec, where)

    @classmethod
    def normalise_kind(cls, spec: dict, where: str) -> dict:
        return spec

    @classmethod
    def availability(cls, host: Host) -> tuple[bool, str, str]:
        available, reason = nft_availability()
        return available, reason, cls.backend_name(host)

    @classmethod
    def backend_name(cls, host: Host) -> str:
        return "nft owner table"

    def __init__(self, spec: dict, host: Host | None = None):
        super().__init__(spec, host)
        self.host_name, self.port = parse_endpoint(spec["target"], "target")
        self.address: str | None = None
        self.family = socket.AF_INET
        suffix = run_id()
        self.table = f"{OBJECT_PREFIX}{self.kind}_{suffix}"
        self.mark = MARK_BASE | (int.from_bytes(os.urandom(2), "big"))
        self.holder: OwnedTable | None = None

    def check(self) -> None:
        super().check()
        self.address, self.family = resolve(self.host_name, self.port, "target")

    def endpoint(self) -> pathprobe.Endpoint:
        if self.address is None:
            self.check()
        return pathprobe.Endpoint(self.address, self.port, self.family, self.spec.get("probe", "http"),
                                  self.spec.get("probe_path", "/"))

    def match(self) -> str:
        return f"{_ip(self.family)} daddr {self.address} tcp dport {self.port}"

    def undo_record(self) -> dict:
        return {"kind": self.kind, "table": self.table, "family": NFT_FAMILY, "mark": self.mark,
                "target": self.spec["target"], "agent_pid": os.getpid()}

    def plan(self) -> dict:
        if self.address is None:
            self.check()
        return {"target": f"{self.address}:{self.port}", "backend": self.backend_name(self.host),
                "undo": f"end the holder of nft table {NFT_FAMILY} {self.table}: the kernel deletes the "
                        f"owner table and its rules (also if the agent dies)",
                "blast_radius": self.blast_radius()}

    def blast_radius(self) -> str:
        return f"TCP from this host to {self.address}:{self.port}"

    @staticmethod
    def undo(record: dict) -> None:
        undo_owned_table(record)

    def active(self) -> bool:
        """Whether the fault is still in place (a proof that it bit needs it still there)."""
        return True


class NetemBackend:
    """Mixin (first in the MRO) for the kinds netem can carry: check() chooses netem where
    sch_netem loads (netem.choose), and apply/remove/plan/undo go to tc; otherwise every call goes
    on to the fallback (the proxy or the nft rules) unchanged."""

    netem_plan: netem.NetemPlan | None = None
    backend_reason: str = ""

    @classmethod
    def normalise(cls, spec, where):
        spec["backend"] = netem.validate_backend(spec, where)
        return super().normalise(spec, where)

    @classmethod
    def backend_name(cls, host: Host) -> str:
        fallback = super().backend_name(host)
        if netem.netem_present(host):
            return f"tc netem on an htb/u32 class (journal + watchdog); fallback {fallback}"
        return f"{fallback} (no sch_netem on this kernel)"

    def check(self) -> None:
        TargetInjector.check(self)
        backend, device, self.backend_reason = netem.choose(self.kind, self.spec, self.host, self.address)
        if backend == "netem":
            self.netem_plan = netem.plan_for(self.kind, self.spec, device, self.address, self.port, self.family,
                                             self.mark)
            return
        super().check()

    def apply(self) -> None:
        if self.netem_plan is None:
            return super().apply()
        netem.apply(self.netem_plan)

    def remove(self) -> None:
        if self.netem_plan is None:
            return super().remove()
        netem.undo(self.netem_plan.undo_record())

    def undo_record(self) -> dict:
        record = super().undo_record()
        return record if self.netem_plan is None else {**record, **self.netem_plan.undo_record()}

    def plan(self) -> dict:
        if self.netem_plan is None:
            return {**super().plan(), "backend_reason": self.backend_reason}
        plan = self.netem_plan
        return {"target": f"{self.address}:{self.port}", "backend": f"tc netem on an htb/u32 class of {plan.device}",
                "backend_reason": self.backend_reason, "undo": plan.describe_undo(),
                "commands": [" ".join(argv[1:]) for argv in plan.apply_commands()],
                "blast_radius": f"every packet this host sends to {self.address}:{self.port} through {plan.device} "
                                f"(connections open before the fault too): " + " ".join(plan.netem_arguments())}

    def active(self) -> bool:
        if self.netem_plan is None:
            return super().active()
        return netem.ours_installed(self.netem_plan.device, self.netem_plan.handle)

    @staticmethod
    def undo(record: dict) -> None:
        if record.get("backend") == "netem":
            netem.undo(record)
        else:
            undo_owned_table(record)


# --- nft-only faults -----------------------------------------------------------------------------
class NftRuleInjector(TargetInjector):
    """A fault that is only rules in an owner table held by the agent's `nft -i` child."""

    def rules(self) -> str:
        raise NotImplementedError

    def check(self) -> None:
        super().check()
        if self.holder is None:
            # The holder starts now (an idle `nft -i`, dying with the agent): apply() then costs
            # one nft transaction.
            self.holder = OwnedTable(self.table, marker=holder_marker(self.table))
            self.holder.start()

    def apply(self) -> None:
        if self.holder is None:
            self.check()
        body = (f"chain fault {{ type filter hook output priority 0; policy accept; "
                f"meta mark {self.mark:#x} return; {self.rules()} }};")
        self.holder.create(body)

    def remove(self) -> None:
        if self.holder is not None:
            self.holder.destroy()
            self.holder = None
        self.gone_ns = time.time_ns()  # the holder exited: its owner table went with its socket
        wait_table_gone(self.table)


class LossInjector(NetemBackend, NftRuleInjector):
    kind = "loss"
    description = "drop a share of the packets this host sends to host:port (netem loss, or nft numgen random)"
    keys = TargetInjector.keys | {"share_pct", "max_share_pct", "backend"}

    @classmethod
    def normalise_kind(cls, spec, where):
        spec["share_pct"] = share(spec, where)
        return spec

    def rules(self) -> str:
        return f"{self.match()} numgen random mod 10000 < {round(self.spec['share_pct'] * 100)} drop;"

    def blast_radius(self) -> str:
        return f"{self.spec['share_pct']:g}% of packets from this host to {self.address}:{self.port}"

    def proof(self) -> dict:
        endpoint = self.endpoint()
        # A dropped SYN is a failed connect within 0.3 s: the share of failed connects measures
        # the loss on the path; the marked control shows how many fail anyway (a full backlog).
        samples = 1000
        control = 1.0 - pathprobe.connect_share(endpoint, 100, mark=self.mark)
        measured = 1.0 - pathprobe.connect_share(endpoint, samples)
        measured_pct, control_pct = measured * 100, control * 100
        return {"metric": "packet_loss_pct", "expected": self.spec["share_pct"],
                "measured": round(measured_pct, 2), "control": round(control_pct, 2), "samples": samples,
                "bit": measured_pct - control_pct >= self.spec["share_pct"] / 2}


class BandwidthInjector(NftRuleInjector):
    kind = "bandwidth"
    description = "limit the bytes per second to and from host:port (nft limit rate over ... drop)"
    keys = TargetInjector.keys | {"rate_bytes_per_s", "burst_bytes"}
    required = TargetInjector.required | {"rate_bytes_per_s"}

    @classmethod
    def normalise_kind(cls, spec, where):
        spec["rate_bytes_per_s"] = number(spec, "rate_bytes_per_s", where, 1000, 10 ** 10, integer=True)
        # nft byte limits (nft_limit.c) already keep a bucket of one second of rate + burst: the
        # first second passes that much at once, the sustained rate is exact. Keep burst small.
        spec["burst_bytes"] = number(spec, "burst_bytes", where, 1500, 10 ** 9, 16384, integer=True)
        return spec

    def rules(self) -> str:
        rate, burst = self.spec["rate_bytes_per_s"], self.spec["burst_bytes"]
        limit = f"limit rate over {rate} bytes/second burst {burst} bytes drop;"
        answer = f"{_ip(self.family)} saddr {self.address} tcp sport {self.port}"
        # On loopback the answers leave through the output hook as well: both directions here.
        return f"{self.match()} {limit} {answer} {limit}"

    def blast_radius(self) -> str:
        return f"TCP between this host and {self.address}:{self.port}, each direction capped at " \
               f"{self.spec['rate_bytes_per_s']} bytes/s"

    def proof(self) -> dict:
        endpoint = self.endpoint()
        rate = self.spec["rate_bytes_per_s"]
        control = pathprobe.upload_rate_bytes_per_s(endpoint, 0.6, mark=self.mark)
        measured = pathprobe.upload_rate_bytes_per_s(endpoint, 1.2)
        return {"metric": "upload_bytes_per_s", "expected": rate, "measured": round(measured),
                # Took effect: well under the unlimited path and near the rate (nft's one-second
                # bucket lets a probe right after a quiet spell see up to ~1.6x the rate, measured).
                "control": round(control), "bit": measured <= rate * 2 and measured < control * 0.5}


# --- proxy faults ------------------------------------------------------------------------------
class ProxyInjector(TargetInjector):
    """Redirect new connections to the target into the fault proxy (see module docstring)."""

    keys = TargetInjector.keys | {"existing", "probe", "probe_path"}

    @classmethod
    def normalise(cls, spec, where):
        spec["existing"] = text(spec, "existing", where, "reset", ("reset", "keep"))
        return super().normalise(spec, where)

    @classmethod
    def backend_name(cls, host: Host) -> str:
        return "nft owner table redirect -> fault proxy"

    def __init__(self, spec, host=None):
        super().__init__(spec, host)
        self.proxy: subprocess.Popen | None = None
        self.proxy_identity: dict | None = None
        self.nft_identity: dict | None = None
        self.proxy_port = 0

    def proxy_arguments(self) -> list[str]:
        raise NotImplementedError

    def redirect_share(self) -> str:
        return ""

    def nft_body(self) -> str:
        mark, match, seen = f"{self.mark:#x}", self.match(), f"{SEEN_CT_BIT:#x}"
        body = (f"chain to_proxy {{ type nat hook output priority -100; policy accept; meta mark {mark} return; "
                f"{match} ct mark set ct mark | {seen} {self.redirect_share()} redirect to :{{port}}; }};")
        if self.spec["existing"] == "reset":
            body += (f" chain reset_existing {{ type filter hook output priority 0; policy accept; "
                     f"meta mark {mark} return; {match} ct state != new ct mark & {seen} == 0 reject with tcp reset; }};")
        return body

    def check(self) -> None:
        super().check()
        if self.proxy is None:
            self.start_standby()

    def start_standby(self) -> None:
        """Start the proxy now, waiting for `go`: nothing is redirected until apply(), and the
        proxy dies with the agent (PDEATHSIG) if apply() never comes (`chaos plan`)."""
        argv = [sys.executable, "-m", "agent.chaos.faults.proxy", "--standby", "--upstream-host", self.address,
                "--upstream-port", str(self.port), "--mark", hex(self.mark), "--nft-table", self.table,
                "--nft-body", self.nft_body(), *self.proxy_arguments()]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.proxy = spawn_owned(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                 helper=True)
        self.proxy_identity = process_identity(self.proxy.pid)
        line = self._proxy_line()
        if not line.startswith("STANDBY"):
            self._proxy_failed(line)

    def apply(self) -> None:
        if self.proxy is None:
            self.check()
        self.proxy.stdin.write("go\n")
        self.proxy.stdin.flush()
        line = self._proxy_line()
        if not line.startswith("READY"):
            self._proxy_failed(line)
        _ready, port, nft_pid = line.split()
        self.proxy_port = int(port)
        self.nft_identity = process_identity(int(nft_pid))

    def _proxy_failed(self, line: str) -> None:
        detail = line.removeprefix("FAILED ").strip()
        if not detail and self.proxy.poll() is not None:
            detail = (self.proxy.stderr.read() or "")[-400:]
        self.remove()
        raise WorkFailed(f"{self.kind}: the fault proxy did not start: {' '.join(detail.split()) or 'no answer'}")

    def _proxy_line(self) -> str:
        import select
        ready, _, _ = select.select([self.proxy.stdout], [], [], PROXY_READY_TIMEOUT_S)
        return self.proxy.stdout.readline() if ready else ""

    def remove(self) -> None:
        # The nft holder first: the redirect is gone the moment its socket closes; then the
        # proxy (connections already inside it end with it).
        if self.nft_identity is not None:
            end_process_group(self.nft_identity)
        if self.proxy is not None and self.proxy.poll() is None:
            # SIGTERM first: the proxy resets its relayed connections (clients retry at once, on
            # the direct path now); SIGKILL after 50 ms whatever happened.
            self.proxy.terminate()
            try:
                self.proxy.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        if self.proxy_identity is not None:
            end_process_group(self.proxy_identity)
        # Gone: the redirect's holder and the proxy have exited (the kernel dropped the owner table
        # when the holder's socket closed). What follows is clean-up and the check that it did.
        self.gone_ns = time.time_ns()
        if self.proxy is not None:
            try:
                self.proxy.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            for stream in (self.proxy.stdin, self.proxy.stdout, self.proxy.stderr):
                try:
                    stream.close()
                except OSError:  # BrokenPipe flushing stdin of a killed proxy
                    pass
        self.proxy = self.proxy_identity = self.nft_identity = None
        wait_table_gone(self.table)

    def proxy_alive(self) -> bool:
        return self.proxy_identity is not None and is_same_process(self.proxy_identity)

    def active(self) -> bool:
        return self.proxy_alive()


class LatencyInjector(NetemBackend, ProxyInjector):
    kind = "latency"
    description = "add delay (and jitter) to the round trips to a TCP dependency host:port"
    keys = ProxyInjector.keys | {"delay_ms", "jitter_ms", "share_pct", "max_share_pct", "backend"}
    required = ProxyInjector.required | {"delay_ms"}

    @classmethod
    def normalise_kind(cls, spec, where):
        spec["delay_ms"] = number(spec, "delay_ms", where, 0, 60000)
        spec["jitter_ms"] = number(spec, "jitter_ms", where, 0, 60000, 0)
        if spec["jitter_ms"] > spec["delay_ms"]:
            raise BadInput(f"{where}.jitter_ms: must not exceed delay_ms ({spec['delay_ms']:g})")
        spec["share_pct"] = share(spec, where, 100)
        return spec

    def proxy_arguments(self) -> list[str]:
        return ["--delay-ms", str(self.spec["delay_ms"]), "--jitter-ms", str(self.spec["jitter_ms"])]

    def redirect_share(self) -> str:
        # The share of connections is rolled once per connection, in the kernel, at the redirect.
        if self.spec["share_pct"] >= 100:
            return ""
        return f"numgen random mod 10000 < {round(self.spec['share_pct'] * 100)}"

    def blast_radius(self) -> str:
        jitter = f" ± {self.spec['jitter_ms']:g} ms" if self.spec["jitter_ms"] else ""
        return (f"{self.spec['share_pct']:g}% of new TCP connections from this host to "
                f"{self.address}:{self.port}: +{self.spec['delay_ms']:g} ms{jitter} per answer"
                + ("; connections open before the fault are reset once" if self.spec["existing"] == "reset" else ""))

    def proof(self, count: int = 30) -> dict:
        endpoint = self.endpoint()
        # Keep-alive exchanges (the path a pooled client takes), 10 connections at a time, 3
        # exchanges each: a 500 ms delay costs the proof 1.5 s, and the median is taken where
        # connection setup (the proxy's upstream connect) no longer counts.
        control = pathprobe.many_round_trips(endpoint, count, parallel=10, mark=self.mark, requests_per_connection=3)
        faulted = pathprobe.many_round_trips(endpoint, count, parallel=10, requests_per_connection=3)
        control_ms, faulted_ms = pathprobe.median_ms(control), pathprobe.median_ms(faulted)
        delay = self.spec["delay_ms"]
        added = None if control_ms is None or faulted_ms is None else faulted_ms - control_ms
        affected = sum(1 for s in faulted if s.latency_ms is not None and control_ms is not None
                       and s.latency_ms - control_ms >= delay / 2) if delay else 0
        bit = added is not None and (added >= delay * 0.5 if self.spec["share_pct"] > 50
                                     else affected > 0)
        return {"metric": "added_latency_ms_p50", "expected": delay,
                "measured": None if added is None else round(added, 3),
                "control_p50_ms": control_ms, "faulted_p50_ms": faulted_ms,
                "affected_pct": round(100 * affected / len(faulted), 1) if faulted else 0.0,
                "samples": len(faulted), "probe": endpoint.probe, "bit": bool(bit and self.active())}


class JitterInjector(LatencyInjector):
    kind = "jitter"
    description = "latency whose delay varies uniformly in delay_ms ± jitter_ms per answer"
    required = LatencyInjector.required | {"jitter_ms"}

    @classmethod
    def normalise_kind(cls, spec, where):
        spec = super().normalise_kind(spec, where)
        if spec["jitter_ms"] <= 0:
            raise BadInput(f"{where}.jitter_ms: must be above 0 for kind 'jitter'")
        return spec


class PostgresLatencyInjector(LatencyInjector):
    kind = "postgres_latency"
    description = "latency on the PostgreSQL port (every answer of the server delayed)"
    default_probe = "postgres"
    keys = LatencyInjector.keys - {"probe_path"}
    required = frozenset({"delay_ms"})

    @classmethod
    def normalise(cls, spec, where):
        spec.setdefault("target", "127.0.0.1:5432")
        return super().normalise(spec, where)


class ResetInjector(ProxyInjector):
    kind = "reset"
    description = "reset a share of the connections to host:port, at connect or at a request, on both sides"
    keys = ProxyInjector.keys | {"share_pct", "max_share_pct", "on"}
    required = ProxyInjector.required | {"share_pct"}

    @classmethod
    def normalise_kind(cls, spec, where):
        spec["share_pct"] = share(spec, where)
        spec["on"] = text(spec, "on", where, "request", ("request", "connect"))
        return spec

    def proxy_arguments(self) -> list[str]:
        # Through the proxy, not `nft reject with tcp reset`: reject answers only the sender, so
        # the server would keep every reset connection half open (its fds leak, measured: the
        # test server ran out of them after ~1000 resets).
        return ["--reset-pct", str(self.spec["share_pct"]), "--reset-on", self.spec["on"]]

    def blast_radius(self) -> str:
        unit = "requests" if self.spec["on"] == "request" else "new connections"
        return f"{self.spec['share_pct']:g}% of {unit} from this host to {self.address}:{self.port} reset (RST both ways)"

    def proof(self) -> dict:
        fraction, samples = pathprobe.reset_share(self.endpoint(), 300)
        measured = fraction * 100
        return {"metric": "reset_pct", "expected": self.spec["share_pct"], "measured": round(measured, 2),
                "samples": samples, "bit": measured >= self.spec["share_pct"] / 2 and self.proxy_alive()}


class HttpErrorInjector(ProxyInjector):
    kind = "http_error"
    description = "answer a share of HTTP requests to host:port with 5xx/429, rolled per request"
    keys = ProxyInjector.keys | {"share_pct", "max_share_pct", "status"}
    required = ProxyInjector.required | {"share_pct"}

    @classmethod
    def normalise_kind(cls, spec, where):
        spec["share_pct"] = share(spec, where)
        status = spec.get("status", 503)
        if isinstance(status, bool) or not isinstance(status, int) or not (status == 429 or 500 <= status <= 599):
            raise BadInput(f"{where}.status: must be 429 or an integer from 500 to 599")
        spec["status"] = status
        return spec

    def proxy_arguments(self) -> list[str]:
        return ["--http-error-pct", str(self.spec["share_pct"]), "--http-status", str(self.spec["status"])]

    def blast_radius(self) -> str:
        return (f"{self.spec['share_pct']:g}% of HTTP requests from this host to {self.address}:{self.port} "
                f"answered {self.spec['status']} by the proxy")

    def proof(self, count: int = 400) -> dict:
        samples = pathprobe.many_round_trips(self.endpoint(), count, parallel=4, requests_per_connection=20)
        answered = [s for s in samples if s.latency_ms is not None]
        injected = sum(1 for s in answered if s.injected and s.status == self.spec["status"])
        measured = 100 * injected / len(answered) if answered else 0.0
        return {"metric": "injected_error_pct", "expected": self.spec["share_pct"], "measured": round(measured, 2),
                "samples": len(answered), "bit": bool(answered) and measured >= self.spec["share_pct"] / 2
                and self.proxy_alive()}
