"""Fault injectors: validation of every kind's keys (no kernel needed) and the registry."""

from __future__ import annotations

import pytest

from agent.chaos.faults import REGISTRY, injector_for
from agent.chaos.faults.network import parse_endpoint
from agent.chaos.faults.proxy import content_length
from core.errors import BadInput, Unavailable
from core.host import Host


def validate(spec: dict) -> dict:
    return injector_for(spec["kind"]).validate(spec, "fault[0]")


def test_registry_is_ordered_and_complete():
    kinds = [injector.kind for injector in REGISTRY]
    assert kinds == ["latency", "jitter", "postgres_latency", "loss", "reset", "http_error", "bandwidth",
                     "cpu", "memory", "pause", "kill"]
    assert len(set(kinds)) == len(kinds)
    for injector in REGISTRY:
        assert injector.description and isinstance(injector.owned_by_kernel, bool)
    assert [i.kind for i in REGISTRY if not i.owned_by_kernel] == ["pause"]


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(BadInput, match="unknown fault kind 'netem'.*latency"):
        injector_for("netem")


@pytest.mark.parametrize("spec, message", [
    ({"kind": "latency", "target": "127.0.0.1:8300", "delay_ms": -1, "duration_s": 10},
     r"^fault\[0\]\.delay_ms: expected a number in 0..60000, got -1$"),
    ({"kind": "latency", "target": "127.0.0.1:8300", "delay_ms": "500", "duration_s": 10},
     r"^fault\[0\]\.delay_ms: expected a number, got '500'$"),
    ({"kind": "latency", "target": "127.0.0.1:8300", "duration_s": 10}, r"^fault\[0\]\.delay_ms: missing required key$"),
    ({"kind": "latency", "target": "127.0.0.1:8300", "delay_ms": 5}, r"^fault\[0\]\.duration_s: missing required key$"),
    ({"kind": "latency", "target": "127.0.0.1:8300", "delay_ms": 5, "duration_s": 7200},
     r"^fault\[0\]\.duration_s: expected a number in 0.1..3600, got 7200$"),
    ({"kind": "latency", "target": "127.0.0.1", "delay_ms": 5, "duration_s": 1}, r"^fault\[0\]\.target: must be"),
    ({"kind": "latency", "target": "127.0.0.1:70000", "delay_ms": 5, "duration_s": 1}, r"^fault\[0\]\.target: must be"),
    ({"kind": "latency", "target": "h:1", "delay_ms": 5, "duration_s": 1, "dealy_ms": 3},
     r"^fault\[0\]\.dealy_ms: unknown key \(known: backend, delay_ms, .*target\)$"),
    ({"kind": "latency", "target": "h:1", "delay_ms": 5, "jitter_ms": 9, "duration_s": 1},
     r"^fault\[0\]\.jitter_ms: must not exceed delay_ms"),
    ({"kind": "jitter", "target": "h:1", "delay_ms": 5, "jitter_ms": 0, "duration_s": 1},
     r"^fault\[0\]\.jitter_ms: must be above 0"),
    ({"kind": "latency", "target": "h:1", "delay_ms": 5, "duration_s": 1, "existing": "drop"},
     r"^fault\[0\]\.existing: expected one of reset, keep, got 'drop'$"),
    ({"kind": "loss", "target": "h:1", "duration_s": 1}, r"^fault\[0\]\.share_pct: missing required key$"),
    ({"kind": "loss", "target": "h:1", "share_pct": 0, "duration_s": 1},
     r"^fault\[0\]\.share_pct: expected a positive number, got 0$"),
    ({"kind": "loss", "target": "h:1", "share_pct": 30, "max_share_pct": 10, "duration_s": 1},
     r"^fault\[0\]\.share_pct: 30 is above the blast-radius cap max_share_pct = 10$"),
    ({"kind": "reset", "target": "h:1", "share_pct": 5, "on": "close", "duration_s": 1},
     r"^fault\[0\]\.on: expected one of request, connect, got 'close'$"),
    ({"kind": "http_error", "target": "h:1", "share_pct": 5, "status": 404, "duration_s": 1},
     r"^fault\[0\]\.status: must be 429 or an integer from 500 to 599$"),
    ({"kind": "http_error", "target": "h:1", "share_pct": 5, "status": 503.5, "duration_s": 1},
     r"^fault\[0\]\.status: must be 429 or an integer"),
    ({"kind": "bandwidth", "target": "h:1", "duration_s": 1}, r"^fault\[0\]\.rate_bytes_per_s: missing required key$"),
    ({"kind": "cpu", "duration_s": 1}, r"^fault\[0\]: name the target"),
    ({"kind": "cpu", "cpus": "0-", "duration_s": 1}, r"^fault\[0\]\.cpus: must be a CPU list"),
    ({"kind": "cpu", "cpus": "4096", "duration_s": 1}, r"^fault\[0\]\.cpus: CPU 4096 is not online"),
    ({"kind": "cpu", "cpus": "0", "load_pct": 150, "duration_s": 1}, r"^fault\[0\]\.load_pct: expected a number in 1..100, got 150$"),
    ({"kind": "memory", "duration_s": 1}, r"^fault\[0\]: give exactly one of size_bytes or size_pct"),
    ({"kind": "memory", "size_pct": 90, "duration_s": 1}, r"^fault\[0\]\.size_pct: expected a number in 1..75, got 90$"),
    ({"kind": "pause", "duration_s": 1}, r"^fault\[0\]: name exactly one target among pid, pid_file, process, unit, cgroup$"),
    ({"kind": "pause", "pid": 12, "process": "x", "duration_s": 1}, r"^fault\[0\]: name exactly one target .*\(got pid, process\)$"),
    ({"kind": "kill", "pid": 1, "duration_s": 1}, r"^fault\[0\]\.pid: must be a process id above 1$"),
    ({"kind": "kill", "pid": 1234, "signal": "SIGSTOP", "duration_s": 1}, r"^fault\[0\]\.signal: 'SIGSTOP' is not a signal"),
    ({"kind": "kill", "cgroup": "x", "duration_s": 1}, r"^fault\[0\]\.cgroup: unknown key \(known: .*\)$"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(BadInput, match=message):
        validate(spec)


def test_issue_example_fault_normalises():
    spec = validate({"kind": "latency", "target": "127.0.0.1:8300", "delay_ms": 500, "duration_s": 10})
    assert spec == {"kind": "latency", "target": "127.0.0.1:8300", "delay_ms": 500.0, "jitter_ms": 0.0,
                    "share_pct": 100.0, "existing": "reset", "probe": "http", "probe_path": "/", "duration_s": 10.0,
                    "backend": "auto"}
    # Normalised specs validate again unchanged (the runner may re-validate a journaled spec).
    assert validate(dict(spec)) == spec


def test_postgres_latency_defaults_to_the_postgres_port_and_probe():
    spec = validate({"kind": "postgres_latency", "delay_ms": 20, "duration_s": 5})
    assert spec["target"] == "127.0.0.1:5432" and spec["probe"] == "postgres"


def test_kill_signal_names_are_normalised():
    assert validate({"kind": "kill", "pid": 4242, "signal": "term", "duration_s": 3})["signal"] == "SIGTERM"


def test_unit_targets_unavailable_without_systemd(tmp_path):
    (tmp_path / "proc/1").mkdir(parents=True)
    (tmp_path / "proc/1/comm").write_text("init\n")
    cls = injector_for("kill")
    injector = cls(cls.validate({"kind": "kill", "unit": "strategy.service", "duration_s": 3}, "fault[0]"),
                   Host(tmp_path))
    with pytest.raises(Unavailable, match="PID 1 is not systemd \\(it is 'init'\\)"):
        injector.check()
    assert "units: no, PID 1 is not systemd" in cls.availability(Host(tmp_path))[2]


def test_endpoint_parsing():
    assert parse_endpoint("[::1]:5432", "t") == ("::1", 5432)
    assert parse_endpoint("db.local:5432", "t") == ("db.local", 5432)


def test_proxy_content_length_parsing():
    assert content_length(b"post / http/1.1\r\ncontent-length: 12\r\n\r\n") == 12
    assert content_length(b"get / http/1.1\r\nhost: x\r\n\r\n") == 0
    assert content_length(b"post / http/1.1\r\ncontent-length: x\r\n\r\n") == 0


def test_unresolvable_target_is_bad_input():
    cls = injector_for("loss")
    injector = cls(cls.validate({"kind": "loss", "target": "no-such-host.invalid:80", "share_pct": 5,
                                 "duration_s": 1}, "fault[0]"))
    with pytest.raises(BadInput, match="does not resolve"):
        injector.check()
