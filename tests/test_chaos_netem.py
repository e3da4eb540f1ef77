"""The netem backend of latency, jitter and loss (agent/chaos/faults/netem.py): the exact tc
commands, the selection (netem where sch_netem loads, the fallback otherwise) and the journaled
undo, against a fake host tree and a fake tc/ip/modprobe that records every command.

No live test: this host's kernel (6.18) has no sch_netem module, so a netem qdisc cannot be
created here; `chaos doctor` says so and the live fault tests run the fallback backends
(tests/test_chaos_faults_live.py). These tests pin down what would run where netem exists.
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from agent.chaos.faults import injector_for, netem
from core.errors import BadInput, Unavailable
from core.host import Host

RELEASE = "6.1.0-test"


class FakeSystem:
    """tc, ip and modprobe as far as the backend uses them: a root qdisc per device, a route,
    a loadable module; every command recorded."""

    def __init__(self, host_root, module: str = "loadable", root_kind: str = "noqueue", fail_on: str = ""):
        self.root = host_root
        self.module = module
        self.roots = {"lo": {"kind": root_kind, "handle": "0:"}}
        self.fail_on = fail_on
        self.commands: list[list[str]] = []
        (host_root / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
        (host_root / "proc/sys/kernel/osrelease").write_text(RELEASE + "\n")
        if module in ("loadable", "loaded", "broken"):
            sched = host_root / f"lib/modules/{RELEASE}/kernel/net/sched"
            sched.mkdir(parents=True, exist_ok=True)
            (sched / "sch_netem.ko.xz").write_bytes(b"")
        if module == "loaded":
            (host_root / "sys/module/sch_netem").mkdir(parents=True, exist_ok=True)

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        self.commands.append(argv)
        words = [argv[0].rsplit("/", 1)[-1]] + argv[1:]
        if self.fail_on and self.fail_on in " ".join(words):
            return subprocess.CompletedProcess(argv, 2, "", "RTNETLINK answers: Invalid argument")
        if words[0] == "modprobe":
            if self.module == "broken":
                return subprocess.CompletedProcess(argv, 1, "", "modprobe: FATAL")
            (self.root / "sys/module/sch_netem").mkdir(parents=True, exist_ok=True)
            return subprocess.CompletedProcess(argv, 0, "", "")
        if words[:3] == ["ip", "-j", "route"]:
            return subprocess.CompletedProcess(argv, 0, json.dumps([{"dst": argv[-1], "dev": "lo"}]), "")
        if words[:3] == ["tc", "-j", "qdisc"]:
            return subprocess.CompletedProcess(argv, 0, json.dumps([self.roots[argv[-2]]]), "")
        if words[1:4] == ["qdisc", "add", "dev"] and "root" in words:
            self.roots[words[4]] = {"kind": "htb", "handle": words[words.index("handle") + 1]}
        if words[1:4] == ["qdisc", "del", "dev"]:
            self.roots[words[4]] = {"kind": "noqueue", "handle": "0:"}
        return subprocess.CompletedProcess(argv, 0, "", "")

    def tc_lines(self) -> list[str]:
        return [" ".join(argv[1:]) for argv in self.commands if argv[0].endswith("tc") and argv[1] != "-j"]


def latency_spec(**extra) -> dict:
    spec = {"kind": "latency", "target": "127.0.0.1:8300", "delay_ms": 20, "jitter_ms": 5, "duration_s": 10, **extra}
    return injector_for(spec["kind"]).validate(spec, "fault[0]")


def test_commands_put_netem_on_an_htb_class_fed_by_u32_and_undo_is_one_delete():
    plan = netem.NetemPlan(device="lo", handle=0x4010, family=socket.AF_INET, address="127.0.0.1", port=8300,
                           mark=0x47410008, delay_ms=20, jitter_ms=5)
    lines = [" ".join(argv[1:]) for argv in plan.apply_commands()]
    assert lines == [
        "qdisc add dev lo root handle 4010: htb default 1",
        "class add dev lo parent 4010: classid 4010:1 htb rate 100gbit",
        "class add dev lo parent 4010: classid 4010:2 htb rate 100gbit",
        "qdisc add dev lo parent 4010:2 handle 4011: netem delay 20ms 5ms",
        # the agent's own probes (SO_MARK) take the untouched class: the proof's control path
        "filter add dev lo parent 4010: protocol ip prio 1 u32 match mark 0x47410008 0xffffffff flowid 4010:1",
        "filter add dev lo parent 4010: protocol ip prio 2 u32 match ip dst 127.0.0.1/32 match ip dport 8300 0xffff "
        "flowid 4010:2",
    ]
    assert " ".join(plan.undo_command()[1:]) == "qdisc del dev lo root"
    loss = netem.NetemPlan(device="eth0", handle=0x4000, family=socket.AF_INET6, address="::1", port=5432,
                           mark=1, loss_pct=12.5)
    assert loss.netem_arguments() == ["loss", "12.5%"]
    assert loss.apply_commands()[-1][-11:-2] == ["match", "ip6", "dst", "::1/128", "match", "ip6", "dport", "5432", "0xffff"]
    assert "protocol ipv6" in " ".join(loss.apply_commands()[4])
    assert netem.handle_for(0x47410fff) + 1 <= 0xffff


def test_netem_is_chosen_where_the_module_loads(tmp_path):
    system = FakeSystem(tmp_path, module="loadable")
    backend, device, why = netem.choose("latency", latency_spec(), Host(tmp_path), "127.0.0.1", system)
    assert (backend, device) == ("netem", "lo") and "sch_netem loaded" in why
    assert ["modprobe", "sch_netem"] in system.commands          # loaded on demand, then chosen
    loss = injector_for("loss").validate({"kind": "loss", "target": "127.0.0.1:1", "share_pct": 30,
                                          "duration_s": 1}, "fault[0]")
    assert netem.plan_for("loss", loss, "lo", "127.0.0.1", 1, socket.AF_INET, 7, system).netem_arguments() == \
        ["loss", "30%"]


@pytest.mark.parametrize("module, root_kind, spec, expected", [
    ("absent", "noqueue", {}, "no sch_netem on this kernel"),
    ("broken", "noqueue", {}, "modprobe sch_netem failed"),
    ("loaded", "noqueue", {"share_pct": 50}, "a share of connections needs the proxy"),
    ("loaded", "htb", {}, "lo has root qdisc htb 0:: netem would replace it"),
    ("loaded", "noqueue", {"backend": "fallback"}, 'backend = "fallback"'),
])
def test_the_fallback_is_chosen_otherwise_and_says_why(tmp_path, module, root_kind, spec, expected):
    system = FakeSystem(tmp_path, module=module, root_kind=root_kind)
    backend, device, why = netem.choose("latency", latency_spec(**spec), Host(tmp_path), "127.0.0.1", system)
    assert (backend, device) == ("fallback", "") and expected in why
    assert not [line for line in system.tc_lines() if " add " in f" {line} "]    # nothing changed


def test_backend_netem_demanded_where_it_cannot_be_is_unavailable_and_bad_values_are_bad_input(tmp_path):
    with pytest.raises(Unavailable, match='backend = "netem": no sch_netem on this kernel'):
        netem.choose("loss", {"backend": "netem", "share_pct": 5}, Host(tmp_path), "127.0.0.1",
                     FakeSystem(tmp_path, module="absent"))
    with pytest.raises(BadInput, match=r"^fault\[0\]\.backend: expected one of auto, netem, fallback, got 'tc'$"):
        latency_spec(backend="tc")
    assert netem.choose("reset", {}, Host(tmp_path), "127.0.0.1", FakeSystem(tmp_path))[0] == "fallback"


def test_a_failed_step_takes_back_the_earlier_ones_and_undo_never_deletes_a_foreign_root(tmp_path):
    system = FakeSystem(tmp_path, module="loaded", fail_on="netem delay")
    plan = netem.plan_for("latency", latency_spec(), "lo", "127.0.0.1", 8300, socket.AF_INET, 0x47410001, system)
    with pytest.raises(Exception, match="tc refused `qdisc add dev lo parent .* netem delay 20ms 5ms`"):
        netem.apply(plan, system)
    assert system.tc_lines()[-1] == "qdisc del dev lo root" and system.roots["lo"]["kind"] == "noqueue"
    system = FakeSystem(tmp_path, module="loaded", root_kind="fq_codel")
    netem.undo(plan.undo_record(), system)          # the root is not ours (someone replaced it): left alone
    assert system.tc_lines() == []
    netem.apply(plan, system)
    assert system.roots["lo"] == {"kind": "htb", "handle": f"{plan.handle:x}:"}
    netem.undo(plan.undo_record(), system)
    assert system.roots["lo"]["kind"] == "noqueue" and plan.original_root == "noqueue"


def test_the_injector_journals_the_netem_undo_and_the_watchdog_path_runs_it(tmp_path, monkeypatch):
    system = FakeSystem(tmp_path, module="loaded")
    monkeypatch.setattr(netem, "run_command", system)
    cls = injector_for("latency")
    injector = cls(latency_spec(), Host(tmp_path))
    injector.check()
    assert injector.proxy is None                     # no standby proxy: netem carries the fault
    plan, record = injector.plan(), injector.undo_record()
    assert plan["backend"] == "tc netem on an htb/u32 class of lo" and "qdisc del dev lo root" in plan["undo"]
    assert record["backend"] == "netem" and record["device"] == "lo" and record["kind"] == "latency"
    injector.apply()
    assert injector.active() and system.roots["lo"]["kind"] == "htb"
    cls.undo(json.loads(json.dumps(record)))          # from the journal alone (sweep, watchdog, abort)
    assert not injector.active() and system.tc_lines()[-1] == "qdisc del dev lo root"
