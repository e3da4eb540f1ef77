"""Chaos experiments (TOML), validated completely before anything runs (Chaos Toolkit's rule).

    title = "Exchange API slows by 500 ms"
    hypothesis = "the strategy pauses within 5 s, the order API keeps answering, the control is unaffected"
    environment = "paper-trading"        # the host must carry this marker (config or --environment)

    [steady_state]                       # the agent's own KPI requests (like the rollout's [kpi])
    url = "http://127.0.0.1:8200/order"  # experiment group
    control_url = "http://127.0.0.1:8201/order"   # optional control group, sampled side by side
    rate_per_s = 40                      # per group
    before_s = 8                         # steady state measured before the fault
    after_s = 8                          # recovery window after the fault
    ok_status = [200, 503]               # errors: failed connections and statuses not in here
    max_error_rate_pct = 1
    max_p99_ms = 50
    # added keys: concurrency = 4, timeout_s = 2 (per KPI request)

    [[fault]]                            # kind + the injector's own keys (agent/chaos/faults/)
    kind = "latency"
    target = "127.0.0.1:8300"
    delay_ms = 500
    duration_s = 10

    [[expect]]                           # must become true while the fault is active
    url = "http://127.0.0.1:8200/status"
    contains = "paused"
    within_s = 5

    [[abort]]                            # safeguard, checked every second while faults are active
    metric = "control_error_rate_pct"    # over the last window_s (default 2) of samples
    above = 5                            # or below = ...

    [gate] / [metrics."..."]             # optional: as in gate.toml, for the gate's checks

Every error is one line naming the file and the key (core/toml_config.py's wording); a fault's
own keys are validated by its injector, with the same wording.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.errors import BadInput
from core.toml_config import TomlTable, describe, load_toml
from agent.gate.config import GateSettings, MetricSettings, settings_from_mapping

TOP_KEYS = ("title", "hypothesis", "environment", "description", "steady_state", "fault", "expect",
            "abort", "gate", "metrics")
STEADY_KEYS = ("url", "control_url", "rate_per_s", "before_s", "after_s", "ok_status",
               "max_error_rate_pct", "max_p99_ms", "concurrency", "timeout_s")
EXPECT_KEYS = ("url", "contains", "within_s", "timeout_s")
ABORT_KEYS = ("metric", "above", "below", "window_s")
# Safeguard metrics, over the trailing window of each group's KPI samples.
GROUP_METRICS = ("error_rate_pct", "p50_ms", "p99_ms")
SAFEGUARD_METRICS = GROUP_METRICS + tuple(f"control_{name}" for name in GROUP_METRICS)
MAX_FAULTS = 8

# Why these gate defaults: KPI requests on loopback take ~1 ms, and two identical service pairs
# on a shared 2-core host differ by tens of percent from one window to the next, so a median
# shift counts only past 50%; a fault leaking into the control (hundreds of ms, or errors) is
# orders of magnitude beyond that. Errors in absolute points, as the gate does everywhere: 2 points
# because at 0 errors in ~300 requests per side (8 s at 40/s) the 98% Newcombe interval reaches
# ~1.3 points, so 1 point could never be shown; fewer requests give `inconclusive` and the number
# needed, and the run is invalid rather than wrongly held.
CHAOS_METRICS = {
    "turns.latency_ns": MetricSettings(threshold_pct=50.0, critical=True),
    "turns.error_rate": MetricSettings(threshold_pct=2.0, critical=True),
}


def chaos_gate_defaults() -> GateSettings:
    settings = GateSettings()
    return replace(settings, metrics={**settings.metrics, **CHAOS_METRICS})


@dataclass(frozen=True)
class SteadyState:
    url: str
    control_url: str | None
    rate_per_s: float
    before_s: float
    after_s: float
    ok_status: tuple[int, ...]
    max_error_rate_pct: float
    max_p99_ms: float
    concurrency: int
    timeout_s: float


@dataclass(frozen=True)
class Expectation:
    url: str
    contains: str
    within_s: float
    timeout_s: float


@dataclass(frozen=True)
class Safeguard:
    metric: str
    above: float | None
    below: float | None
    window_s: float

    def describe(self) -> str:
        return f"{self.metric} {'>' if self.above is not None else '<'} " \
               f"{self.above if self.above is not None else self.below:g}"

    def tripped(self, value: float | None) -> bool:
        if value is None:
            return False
        return value > self.above if self.above is not None else value < self.below


@dataclass(frozen=True)
class FaultSpec:
    index: int
    kind: str
    spec: dict[str, Any]       # normalised by the injector's validate()

    @property
    def where(self) -> str:
        return f"fault[{self.index}]"

    @property
    def duration_s(self) -> float:
        return float(self.spec["duration_s"])


@dataclass
class Experiment:
    path: Path
    title: str
    hypothesis: str
    environment: str
    steady_state: SteadyState
    faults: list[FaultSpec]
    expects: list[Expectation] = field(default_factory=list)
    safeguards: list[Safeguard] = field(default_factory=list)
    gate: GateSettings = field(default_factory=chaos_gate_defaults)
    description: str = ""

    @property
    def fault_s(self) -> float:
        """The fault phase: from the first apply to the last fault's planned removal."""
        return max(fault.duration_s for fault in self.faults)

    @property
    def planned_s(self) -> float:
        return self.steady_state.before_s + self.fault_s + self.steady_state.after_s

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "title": self.title, "hypothesis": self.hypothesis,
                "environment": self.environment, "steady_state": dict(self.steady_state.__dict__),
                "faults": [{"kind": f.kind, **f.spec} for f in self.faults],
                "expects": [dict(e.__dict__) for e in self.expects],
                "safeguards": [dict(s.__dict__) for s in self.safeguards]}


def http_url(table: TomlTable, key: str, default: Any = ...) -> str | None:
    value = table.string(key) if default is ... else table.string(key, default)
    if value is None:
        return None
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.username or parts.password:
        # The URL is written to the bundle, the journal and the dataset: no credentials in it.
        table.fail(key, "credentials do not belong in the URL (it is written to the bundle and the journal)")
    if parts.scheme != "http" or not parts.hostname or port == -1:
        table.fail(key, f"expected an http://HOST[:PORT]/PATH URL, got {describe(value)}")
    return value


def steady_state_from(table: TomlTable) -> SteadyState:
    ok_status = table.integer_list("ok_status", (200,), positive=True)
    if not ok_status or not all(100 <= status <= 599 for status in ok_status):
        table.fail("ok_status", f"expected HTTP statuses (100..599), got {describe(list(ok_status))}")
    return SteadyState(
        url=http_url(table, "url"),
        control_url=http_url(table, "control_url", None),
        rate_per_s=table.number("rate_per_s", 20, low=1, high=1000),
        before_s=table.number("before_s", 5, low=1, high=600),
        after_s=table.number("after_s", 5, low=1, high=600),
        ok_status=tuple(ok_status),
        max_error_rate_pct=table.number("max_error_rate_pct", 1, low=0, high=100),
        max_p99_ms=table.number("max_p99_ms", positive=True),
        concurrency=table.number("concurrency", 4, low=1, high=64, integer=True),
        timeout_s=table.number("timeout_s", 2, low=0.01, high=60),
    )


def fault_from(table: TomlTable, index: int, source: str) -> FaultSpec:
    from agent.chaos.faults import REGISTRY, injector_for

    kinds = [injector.kind for injector in REGISTRY]
    kind = table.string("kind")
    if kind not in kinds:
        table.fail("kind", f"unknown fault kind {kind!r} (known: {', '.join(kinds) or 'none'})")
    spec = {key: value for key, value in table.data.items() if key != "kind"}
    normalised = injector_for(kind).validate(spec, f"{source}: fault[{index}]")
    return FaultSpec(index, kind, dict(normalised))


def expectation_from(table: TomlTable, fault_s: float) -> Expectation:
    within_s = table.number("within_s", fault_s, positive=True)
    if within_s > fault_s:
        table.fail("within_s", f"is longer than the fault phase ({fault_s:g} s): it could never be seen")
    return Expectation(http_url(table, "url"), table.string("contains", allow_empty=False), within_s,
                       table.number("timeout_s", 1, low=0.01, high=60))


def safeguard_from(table: TomlTable, has_control: bool) -> Safeguard:
    metric = table.choice("metric", SAFEGUARD_METRICS)
    if metric.startswith("control_") and not has_control:
        table.fail("metric", f"{metric} needs steady_state.control_url")
    if ("above" in table) == ("below" in table):
        table.fail(None, "give exactly one of above or below")
    above = table.number("above", None)
    below = table.number("below", None)
    return Safeguard(metric, above, below, table.number("window_s", 2, low=1, high=60))


def gate_from(data: dict[str, Any], source: str) -> GateSettings:
    mapping = {key: data[key] for key in ("gate", "metrics") if key in data}
    return settings_from_mapping(mapping, source=source, base=chaos_gate_defaults())


def parse_experiment(data: dict[str, Any], path: Path, source: str | None = None) -> Experiment:
    source = source or str(path)
    root = TomlTable.root(data, source, known=TOP_KEYS)
    steady = steady_state_from(root.table("steady_state", STEADY_KEYS, required=True))
    fault_tables = root.table_list("fault", required=True)
    if len(fault_tables) > MAX_FAULTS:
        root.fail("fault", f"at most {MAX_FAULTS} faults in one experiment (blast radius), got {len(fault_tables)}")
    faults = [fault_from(table, index, source) for index, table in enumerate(fault_tables)]
    fault_s = max(fault.duration_s for fault in faults)
    return Experiment(
        path=Path(path),
        title=root.string("title"),
        hypothesis=root.string("hypothesis"),
        environment=root.string("environment"),
        description=root.string("description", ""  , allow_empty=True),
        steady_state=steady,
        faults=faults,
        expects=[expectation_from(table, fault_s) for table in root.table_list("expect", EXPECT_KEYS)],
        safeguards=[safeguard_from(table, steady.control_url is not None)
                    for table in root.table_list("abort", ABORT_KEYS)],
        gate=gate_from(data, source),
    )


def load_experiment(path: Path) -> Experiment:
    path = Path(path)
    return parse_experiment(load_toml(path), path)


def check_environment(experiment: Experiment, host_environment: str | None, source: str) -> None:
    """Refuse unless this host is marked as the experiment's environment."""
    if host_environment is None:
        raise BadInput(f"refused: {experiment.path}: environment = {experiment.environment!r}, but this host "
                       f"carries no environment marker (set environment = \"{experiment.environment}\" in "
                       f"the agent config, or pass --environment {experiment.environment} on a host meant for it)")
    if host_environment != experiment.environment:
        raise BadInput(f"refused: {experiment.path}: environment = {experiment.environment!r}, but this host is "
                       f"{host_environment!r} ({source})")
