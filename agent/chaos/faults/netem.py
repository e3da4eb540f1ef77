"""The kernel's own delay and loss: netem on an htb class that a u32 filter feeds.

Where sch_netem exists (a module that loads, or built in), latency, jitter and loss on host:port
are put on the path by tc instead of the fault proxy / nft rules:

    tc qdisc add dev DEV root handle H: htb default 1
    tc class add dev DEV parent H: classid H:1 htb rate 100gbit        # everything else, untouched
    tc class add dev DEV parent H: classid H:2 htb rate 100gbit        # the faulted path
    tc qdisc add dev DEV parent H:2 handle H+1: netem delay D [J] [loss P%]
    tc filter add dev DEV parent H: protocol ip prio 1 u32 match mark M 0xffffffff flowid H:1
    tc filter add dev DEV parent H: protocol ip prio 2 u32 match ip dst A/32 match ip dport P 0xffff flowid H:2

The mark filter comes first: the agent's own proof probes (SO_MARK M) measure the unfaulted path
beside the faulted one, as they do through the proxy. The packets delayed are the requests to the
dependency (egress of DEV towards it): a round trip is D longer, for connections open before the
fault too (no reset needed, unlike NAT).

Lifetime: a qdisc belongs to no process, so it outlives a kill -9 of the agent. The runner
journals the exact undo (fsync'd) before the first tc command and the watchdog runs it when the
agent dies: `tc qdisc del dev DEV root`, which removes htb, classes, netem and filters in one call
and leaves the kernel's default root qdisc, the state the fault was applied on. That is why netem
is chosen only on a device whose root qdisc is a kernel default (noqueue, pfifo_fast, fq_codel,
mq, pfifo): replacing an operator's own root qdisc could not be undone exactly, and the fault falls
back to the proxy / nft backend instead.

Chosen when: the kind is latency, jitter, postgres_latency or loss; the spec's `backend` is
"auto" (default) or "netem"; sch_netem is loaded or `modprobe sch_netem` loads it; a latency
fault affects 100% of connections (netem cannot roll a share per connection); the device's root
qdisc is a default one. Otherwise the fallback, with the reason in `chaos plan`.
This host (kernel 6.18 without sch_netem) always takes the fallback: the command construction and
the selection are unit-tested (tests/test_chaos_netem.py), a live netem test cannot run here.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable

from core.errors import Unavailable, WorkFailed
from core.host import Host

from .base import spec_table

NETEM_KINDS = ("latency", "jitter", "postgres_latency", "loss")
BACKENDS = ("auto", "netem", "fallback")
# Root qdiscs the kernel installs by itself; `tc qdisc del root` brings one of them back.
DEFAULT_ROOT_QDISCS = ("noqueue", "pfifo_fast", "fq_codel", "mq", "pfifo")
CLASS_RATE = "100gbit"  # htb only classifies here: no shaping on either class
TC_TIMEOUT_S = 5.0

Runner = Callable[[list[str]], subprocess.CompletedProcess]


def run_command(argv: list[str]) -> subprocess.CompletedProcess:
    from core.children import run

    return run(argv, capture_output=True, text=True, timeout=TC_TIMEOUT_S)


def _runner(run: Runner | None) -> Runner:
    # Looked up at call time, so tests can stand in for tc, ip and modprobe.
    return run or run_command


def tc_binary() -> str:
    return shutil.which("tc") or "/usr/sbin/tc"


def netem_present(host: Host) -> bool:
    """sch_netem loaded, built in, or loadable for the running kernel."""
    release = host.kernel_release()
    if netem_loaded(host):
        return True
    if "sch_netem" in host.read_optional(f"/lib/modules/{release}/modules.builtin"):
        return True
    sched = host.path(f"/lib/modules/{release}/kernel/net/sched")
    return sched.is_dir() and any(sched.glob("sch_netem.ko*"))


def netem_loaded(host: Host) -> bool:
    return host.exists("/sys/module/sch_netem")


def load_netem(host: Host, run: Runner | None = None) -> bool:
    """True once sch_netem is usable: loaded already, or `modprobe sch_netem` loaded it now."""
    if netem_loaded(host):
        return True
    if not netem_present(host):
        return False
    done = _runner(run)(["modprobe", "sch_netem"])
    return done.returncode == 0 and netem_loaded(host)


def output_device(address: str, run: Runner | None = None) -> str:
    """The device packets to `address` leave through (`ip -j route get`)."""
    done = _runner(run)(["ip", "-j", "route", "get", address])
    try:
        routes = json.loads(done.stdout or "[]")
        return str(routes[0]["dev"])
    except (ValueError, LookupError, TypeError):
        raise WorkFailed(f"no route to {address}: {(done.stderr or '').strip() or 'ip route get said nothing'}") from None


def root_qdisc(device: str, run: Runner | None = None) -> dict:
    """The device's root qdisc as `tc -j qdisc show dev DEV root` reports it ({kind, handle, ...})."""
    done = _runner(run)([tc_binary(), "-j", "qdisc", "show", "dev", device, "root"])
    try:
        qdiscs = json.loads(done.stdout or "[]")
    except ValueError:
        qdiscs = []
    return qdiscs[0] if qdiscs else {"kind": "noqueue", "handle": "0:"}


@dataclass(frozen=True)
class NetemPlan:
    """One netem fault: where, what, and the tc commands that put it there and take it back."""
    device: str
    handle: int            # htb root major; the netem qdisc is handle + 1
    family: int
    address: str
    port: int
    mark: int
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    original_root: str = "noqueue"

    def netem_arguments(self) -> list[str]:
        arguments = []
        if self.delay_ms > 0 or self.jitter_ms > 0:
            arguments += ["delay", f"{self.delay_ms:g}ms"]
            if self.jitter_ms > 0:
                arguments += [f"{self.jitter_ms:g}ms"]
        if self.loss_pct > 0:
            arguments += ["loss", f"{self.loss_pct:g}%"]
        return arguments

    def match(self) -> list[str]:
        if self.family == socket.AF_INET6:
            return ["match", "ip6", "dst", f"{self.address}/128", "match", "ip6", "dport", str(self.port), "0xffff"]
        return ["match", "ip", "dst", f"{self.address}/32", "match", "ip", "dport", str(self.port), "0xffff"]

    def apply_commands(self) -> list[list[str]]:
        tc, dev, root = tc_binary(), self.device, f"{self.handle:x}:"
        protocol = "ipv6" if self.family == socket.AF_INET6 else "ip"
        return [
            [tc, "qdisc", "add", "dev", dev, "root", "handle", root, "htb", "default", "1"],
            [tc, "class", "add", "dev", dev, "parent", root, "classid", f"{root}1", "htb", "rate", CLASS_RATE],
            [tc, "class", "add", "dev", dev, "parent", root, "classid", f"{root}2", "htb", "rate", CLASS_RATE],
            [tc, "qdisc", "add", "dev", dev, "parent", f"{root}2", "handle", f"{self.handle + 1:x}:", "netem",
             *self.netem_arguments()],
            [tc, "filter", "add", "dev", dev, "parent", root, "protocol", protocol, "prio", "1", "u32",
             "match", "mark", f"{self.mark:#x}", "0xffffffff", "flowid", f"{root}1"],
            [tc, "filter", "add", "dev", dev, "parent", root, "protocol", protocol, "prio", "2", "u32",
             *self.match(), "flowid", f"{root}2"],
        ]

    def undo_command(self) -> list[str]:
        return [tc_binary(), "qdisc", "del", "dev", self.device, "root"]

    def undo_record(self) -> dict:
        return {"backend": "netem", "device": self.device, "handle": self.handle, "original_root": self.original_root,
                "command": self.undo_command()}

    def describe_undo(self) -> str:
        return (f"`{' '.join(self.undo_command()[1:])}` (journaled before apply, run by the watchdog if the agent "
                f"dies): the htb root, its classes, netem and filters go; {self.device} is back on "
                f"its default {self.original_root}")


def ours_installed(device: str, handle: int, run: Runner | None = None) -> bool:
    qdisc = root_qdisc(device, run)
    return qdisc.get("kind") == "htb" and qdisc.get("handle") == f"{handle:x}:"


def apply(plan: NetemPlan, run: Runner | None = None) -> None:
    """Every command or none: a failed step removes what the earlier ones added."""
    for argv in plan.apply_commands():
        done = _runner(run)(argv)
        if done.returncode != 0:
            undo(plan.undo_record(), run)
            raise WorkFailed(f"tc refused `{' '.join(argv[1:])}`: {' '.join((done.stderr or '').split())[:300]}")


def undo(record: dict, run: Runner | None = None) -> None:
    """The journaled undo: delete our root qdisc if it is still ours (never someone else's)."""
    if not ours_installed(record["device"], int(record["handle"]), run):
        return
    done = _runner(run)(list(record["command"]))
    if done.returncode != 0 and ours_installed(record["device"], int(record["handle"]), run):
        raise WorkFailed(f"tc could not remove the netem fault on {record['device']}: "
                         f"{' '.join((done.stderr or '').split())[:300]}")


def handle_for(mark: int) -> int:
    """An htb major from the fault's random mark (netem takes the next one; both below 0xffff)."""
    return 0x4000 + ((mark & 0x0fff) << 1)


def choose(kind: str, spec: dict, host: Host, address: str, run: Runner | None = None) -> tuple[str, str, str]:
    """("netem" | "fallback", the device or "", why). Raises Unavailable when the spec demands
    netem (`backend = "netem"`) and this host cannot give it."""
    wanted = spec.get("backend", "auto")
    if kind not in NETEM_KINDS or wanted == "fallback":
        return "fallback", "", "backend = \"fallback\"" if wanted == "fallback" else f"{kind} has no netem backend"
    reason = ""
    device = ""
    if kind != "loss" and spec.get("share_pct", 100) < 100:
        reason = "netem delays every matched packet: a share of connections needs the proxy"
    elif not load_netem(host, run):
        reason = "no sch_netem on this kernel" if not netem_present(host) else "modprobe sch_netem failed"
    else:
        device = output_device(address, run)
        current = root_qdisc(device, run)
        if current.get("kind") not in DEFAULT_ROOT_QDISCS:
            reason = (f"{device} has root qdisc {current.get('kind')} {current.get('handle', '')}: netem would "
                      "replace it and could not restore it exactly")
    if reason:
        if wanted == "netem":
            raise Unavailable(f"backend = \"netem\": {reason}")
        return "fallback", "", reason
    return "netem", device, f"sch_netem loaded; {device} root {root_qdisc(device, run).get('kind')}"


def plan_for(kind: str, spec: dict, device: str, address: str, port: int, family: int, mark: int,
             run: Runner | None = None) -> NetemPlan:
    return NetemPlan(device=device, handle=handle_for(mark), family=family, address=address, port=port, mark=mark,
                     delay_ms=float(spec.get("delay_ms", 0.0)) if kind != "loss" else 0.0,
                     jitter_ms=float(spec.get("jitter_ms", 0.0)) if kind != "loss" else 0.0,
                     loss_pct=float(spec.get("share_pct", 0.0)) if kind == "loss" else 0.0,
                     original_root=str(root_qdisc(device, run).get("kind", "noqueue")))


def validate_backend(spec: dict, where: str) -> str:
    return spec_table(spec, where).choice("backend", BACKENDS, "auto")
