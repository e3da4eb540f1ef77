"""Rollout plans (TOML), validated completely before any step runs (Chaos Toolkit's rule).

    name = "strategy-v2"
    state_dir = "/var/lib/guardian-agent/rollouts"   # journal, post-mortems, decision record
    on_inconclusive = "rollback"     # stage undecided at max_dwell_s: rollback (default) | pause | advance
    max_failed_looks = 1             # failed evaluations before a rollback
    max_inconclusive_looks = 0       # undecided evaluations before on_inconclusive acts (0: max_dwell_s)
    max_unattributed_pct = 1.0       # requests neither version answered, per stage
    crossover_s = 0.25               # the 100% stage alternates full-load windows of blue and green

    [prepare]                        # provision and deploy green (terraform, ansible ...)
    commands = ["ansible-playbook deploy-green.yml"]
    timeout_s = 600

    [validate]                       # tests against green, then an optional shadow replay
    commands = ["pytest smoke/ --url http://green:8080"]
    [validate.shadow]
    pcap = "paper-trading.pcap"      # client requests replayed against blue and green
    server_port = 8080
    blue_url = "http://10.0.0.1:8080"
    green_url = "http://10.0.0.2:8080"

    [traffic]
    adapter = "haproxy"              # haproxy | command
    socket = "/run/haproxy/admin.sock"
    backend = "app"
    blue = "blue"                    # server names in the backend
    green = "green"
    wait_up_s = 30                   # green must be UP in the balancer before it gets traffic
    # adapter = "command": set_weights = "lbctl weights --blue {blue} --green {green}"
    #                      get_weights = "lbctl weights"   (prints BLUE GREEN [STATE]: the read-back)

    [kpi]                            # requests through the frontend, attributed by a header
    url = "http://127.0.0.1:8080/"
    version_header = "X-Served-By"   # HAProxy: http-response set-header X-Served-By %s
    concurrency = 4
    # or the real traffic, from HAProxy's log lines (see agent/rollout/collector.py):
    # source = "haproxy-log"
    # listen = "127.0.0.1:5140"

    [[stage]]
    weight_pct = 1
    dwell_s = 60                     # earliest pass
    max_dwell_s = 300                # hold up to this long while undecided

    [postmortem]                     # optional: stacks bundles (audit --probes stacks) of blue
    blue_stacks = "/var/tmp/blue-stacks"     # and green, collected by hooks or the daemon; the
    green_stacks = "/var/tmp/green-stacks"   # post-mortem then holds stacks.diff.svg

    [promote] / [undo] / [decommission] (grace_s)   # hooks after promotion (docs/rollout.md)
    [notify]  command = "..."        # every decision as JSON on stdin
    [after_promotion]                # chaos experiments against the new blue, once promoted
    experiments = ["chaos/api-slow.toml"]    # paths relative to this plan; each validated here
    environment = "paper-trading"    # optional: the host's marker (else the agent config's)
    config = "/etc/guardian-agent/config.toml"   # optional agent config (marker, dataset)
    state_dir = "/var/lib/guardian-agent/chaos"  # optional chaos journal/kill switch/runs
    [gate] / [metrics."..."]         # as in gate.toml

One small function per table; each names the key it refuses.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.toml_config import TomlTable
from agent.gate.config import GateSettings, read_toml, settings_from_mapping

ADAPTERS = ("haproxy", "command")
TOP_KEYS = {"name", "state_dir", "on_inconclusive", "evaluate_every_s", "max_failed_looks", "max_inconclusive_looks",
            "max_unattributed_pct", "crossover_s", "prepare", "validate", "traffic", "kpi", "stage", "gate", "metrics", "postmortem",
            "promote", "decommission", "undo", "notify", "after_promotion"}
# What a stage still undecided at max_dwell_s does. The default holds (up to max_dwell_s) and then
# rolls back: no evidence is not a pass (Flagger counts "no values" as a failed check).
ON_INCONCLUSIVE = ("rollback", "pause", "advance")
DEFAULT_STATE_DIR = Path("/var/lib/guardian-agent/rollouts")


@dataclass
class HookSet:
    commands: list[str]
    timeout_s: float = 600.0


@dataclass
class ShadowSettings:
    pcap: Path
    blue_url: str
    green_url: str
    server_port: int | None = None
    max_requests: int = 1000
    max_mismatch_pct: float = 0.0
    timeout_s: float = 5.0


@dataclass
class TrafficSettings:
    adapter: str
    socket: str = ""
    backend: str = ""
    blue: str = "blue"
    green: str = "green"
    set_weights: str = ""
    get_weights: str = ""  # command adapter: prints "BLUE GREEN [GREEN_STATE]" (the read-back)
    timeout_s: float = 5.0
    wait_up_s: float = 30.0  # how long green may take to be UP in the balancer before traffic moves

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


KPI_SOURCES = ("load", "haproxy-log")


@dataclass
class KpiSettings:
    url: str
    source: str = "load"  # load: the driver's own requests; haproxy-log: real traffic's log lines
    listen: str = ""  # haproxy-log: UDP HOST:PORT HAProxy sends its log lines to
    version_header: str = "X-Served-By"
    concurrency: int = 4
    rate_hz: float = 0.0  # per worker; 0 = back to back
    timeout_s: float = 2.0
    # Blue alone at 100% before the first stage: the like-for-like load reference of the 100% stage.
    baseline_s: float = 10.0


@dataclass
class NotifySettings:
    command: str  # run for every decision with the event as JSON on stdin
    timeout_s: float = 10.0


@dataclass
class AfterPromotion:
    """Chaos experiments run once green serves 100%, validated with the plan."""
    experiments: list[Path]
    environment: str | None = None
    config: Path | None = None
    state_dir: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"experiments": [str(p) for p in self.experiments], "environment": self.environment,
                "config": None if self.config is None else str(self.config),
                "state_dir": None if self.state_dir is None else str(self.state_dir)}


@dataclass
class Stage:
    weight_pct: float
    dwell_s: float
    max_dwell_s: float


@dataclass
class Plan:
    path: Path
    name: str
    state_dir: Path
    on_inconclusive: str
    evaluate_every_s: float
    max_failed_looks: int
    max_inconclusive_looks: int
    max_unattributed_pct: float
    crossover_s: float  # the 100% stage alternates full-load windows of this length (0: off)
    prepare: HookSet
    validate: HookSet
    shadow: ShadowSettings | None
    traffic: TrafficSettings
    kpi: KpiSettings
    stages: list[Stage]
    gate: GateSettings
    raw: dict[str, Any] = field(default_factory=dict)
    blue_stacks: Path | None = None
    green_stacks: Path | None = None
    promote: HookSet = field(default_factory=lambda: HookSet([]))
    decommission: HookSet = field(default_factory=lambda: HookSet([]))
    decommission_grace_s: float = 300.0
    undo: HookSet = field(default_factory=lambda: HookSet([]))
    notify: NotifySettings | None = None
    after_promotion: AfterPromotion | None = None

    @property
    def journal_path(self) -> Path:
        return self.state_dir / f"{self.name}.journal.jsonl"

    @property
    def record_dir(self) -> Path:
        return self.state_dir / "gate-decisions"


def _commands(table: TomlTable) -> list[str]:
    commands = list(table.string_list("commands"))
    for index, command in enumerate(commands):
        try:
            shlex.split(command)
        except ValueError as error:
            table.fail("commands", f"[{index}] cannot be parsed ({error})")
    return commands


def _http_url(table: TomlTable, key: str) -> str:
    value = table.string(key)
    parts = urlsplit(value)
    if parts.scheme != "http" or not parts.hostname:
        table.fail(key, f"expected an http://host:port/ URL, got {value!r}")
    return value


def _hooks(plan: TomlTable, key: str, *, required: bool, why: str, extra_keys: tuple[str, ...] = (),
           default_timeout_s: float = 600.0) -> tuple[HookSet, TomlTable | None]:
    """A hook table ([prepare], [validate], [promote], [decommission], [undo])."""
    if key not in plan:
        if required:
            plan.fail(key, f"missing ({why})")
        return HookSet([]), None
    table = plan.table(key, ("commands", "timeout_s") + extra_keys)
    commands = _commands(table) if "commands" in table else []
    return HookSet(commands, table.number("timeout_s", default_timeout_s, positive=True)), table


def _top_level(plan: TomlTable, path: Path) -> dict[str, Any]:
    name = plan.string("name")
    if not all(c.isalnum() or c in "-_." for c in name):
        plan.fail("name", f"{name!r} must be letters, digits, '-', '_' or '.'")
    state_dir = Path(plan.string("state_dir", str(DEFAULT_STATE_DIR)))
    if not state_dir.is_absolute():
        state_dir = (path.parent / state_dir).resolve()
    return {"name": name, "state_dir": state_dir,
            "on_inconclusive": plan.choice("on_inconclusive", ON_INCONCLUSIVE, "rollback"),
            "evaluate_every_s": plan.number("evaluate_every_s", 1.0, positive=True),
            "max_failed_looks": plan.number("max_failed_looks", 1, low=1, integer=True),
            "max_inconclusive_looks": plan.number("max_inconclusive_looks", 0, low=0, integer=True),
            "max_unattributed_pct": plan.number("max_unattributed_pct", 1.0, low=0, high=100),
            "crossover_s": plan.number("crossover_s", 0.25, low=0)}


def _prepare(plan: TomlTable) -> HookSet:
    prepare, table = _hooks(plan, "prepare", required=True, why="the hooks that provision and deploy green")
    if not prepare.commands:
        table.fail("commands", "missing or empty (at least one hook must deploy green)")
    return prepare


def _shadow(validate: TomlTable, path: Path) -> ShadowSettings:
    table = validate.table("shadow", ("pcap", "blue_url", "green_url", "server_port", "max_requests",
                                      "max_mismatch_pct", "timeout_s"))
    pcap = Path(table.string("pcap"))
    if not pcap.is_absolute():
        pcap = path.parent / pcap
    if not pcap.is_file():
        table.fail("pcap", f"{pcap} does not exist")
    return ShadowSettings(
        pcap=pcap, blue_url=_http_url(table, "blue_url"), green_url=_http_url(table, "green_url"),
        server_port=table.number("server_port", None, low=1, high=65535, integer=True),
        max_requests=table.number("max_requests", 1000, low=1, integer=True),
        max_mismatch_pct=table.number("max_mismatch_pct", 0.0, low=0, high=100),
        timeout_s=table.number("timeout_s", 5.0, positive=True))


def _validate(plan: TomlTable, path: Path) -> tuple[HookSet, ShadowSettings | None]:
    validate, table = _hooks(plan, "validate", required=True, why="test hooks and/or [validate.shadow]",
                             extra_keys=("shadow",))
    shadow = _shadow(table, path) if "shadow" in table else None
    if "commands" not in table and shadow is None:
        table.fail("commands", "missing (give test hooks, a [validate.shadow] replay, or both)")
    return validate, shadow


def _traffic(plan: TomlTable) -> TrafficSettings:
    if "traffic" not in plan:
        plan.fail("traffic", "missing (adapter = \"haproxy\" or \"command\")")
    table = plan.table("traffic", ("adapter", "socket", "backend", "blue", "green", "set_weights", "get_weights",
                                   "timeout_s", "wait_up_s"))
    adapter = table.string("adapter")
    if adapter not in ADAPTERS:
        table.fail("adapter", f"unknown adapter {adapter!r} (expected {' or '.join(ADAPTERS)})")
    traffic = TrafficSettings(adapter=adapter, blue=table.string("blue", "blue"), green=table.string("green", "green"),
                              timeout_s=table.number("timeout_s", 5.0, positive=True),
                              wait_up_s=table.number("wait_up_s", 30.0, positive=True))
    if traffic.blue == traffic.green:
        table.fail("green", f"same name as traffic.blue ({traffic.blue!r})")
    if adapter == "haproxy":
        traffic.socket, traffic.backend = table.string("socket"), table.string("backend")
        return traffic
    traffic.set_weights = table.string("set_weights")
    if "{green}" not in traffic.set_weights or "{blue}" not in traffic.set_weights:
        table.fail("set_weights", "must contain the {blue} and {green} placeholders")
    traffic.get_weights = table.string("get_weights", "", allow_empty=True)
    return traffic


def _kpi(plan: TomlTable) -> KpiSettings:
    if "kpi" not in plan:
        plan.fail("kpi", "missing (url of the frontend to measure blue and green through)")
    table = plan.table("kpi", ("source", "url", "listen", "version_header", "concurrency", "rate_hz", "timeout_s",
                               "baseline_s"))
    source = table.string("source", "load")
    if source not in KPI_SOURCES:
        table.fail("source", f"unknown source {source!r} (expected {' or '.join(KPI_SOURCES)})")
    listen = ""
    if source == "haproxy-log":
        listen = table.string("listen")
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            table.fail("listen", f"expected HOST:PORT for the UDP syslog listener, got {listen!r}")
    return KpiSettings(url=_http_url(table, "url") if source == "load" else "", source=source, listen=listen,
                       version_header=table.string("version_header", "X-Served-By"),
                       concurrency=table.number("concurrency", 4, low=1, high=64, integer=True),
                       rate_hz=table.number("rate_hz", 0.0, low=0),
                       timeout_s=table.number("timeout_s", 2.0, positive=True),
                       baseline_s=table.number("baseline_s", 10.0, positive=True))


def _stage(table: TomlTable, previous: float, integer_weights: bool) -> Stage:
    weight = table.number("weight_pct")
    if not 0 < weight <= 100:
        table.fail("weight_pct", f"{weight:g} outside (0, 100]")
    if integer_weights and weight != int(weight):
        table.fail("weight_pct", f"{weight:g} cannot be set on HAProxy (runtime weights are whole numbers; "
                                 f"it would round to {round(weight):g}): use a whole percent")
    if weight <= previous:
        table.fail("weight_pct", f"weights must increase ({weight:g} after {previous:g})")
    dwell = table.number("dwell_s", positive=True)
    max_dwell = table.number("max_dwell_s", dwell * 3, positive=True)
    if max_dwell < dwell:
        table.fail("max_dwell_s", f"{max_dwell:g} is shorter than dwell_s {dwell:g}")
    return Stage(weight, dwell, max_dwell)


def _stages(plan: TomlTable, integer_weights: bool) -> list[Stage]:
    if "stage" not in plan:
        plan.fail("stage", "missing (at least one [[stage]] with weight_pct)")
    stages: list[Stage] = []
    tables = plan.table_list("stage", ("weight_pct", "dwell_s", "max_dwell_s"), required=True)
    for table in tables:
        stages.append(_stage(table, stages[-1].weight_pct if stages else 0.0, integer_weights))
    if stages[-1].weight_pct != 100:
        tables[-1].fail("weight_pct", "the last stage must reach 100 to promote")
    return stages


def _postmortem(plan: TomlTable, path: Path) -> dict[str, Path]:
    if "postmortem" not in plan:
        return {}
    table = plan.table("postmortem", ("blue_stacks", "green_stacks"))
    stacks = {}
    for key in ("blue_stacks", "green_stacks"):
        if key in table:
            # Not checked for existence: hooks may produce them during the rollout.
            value = Path(table.string(key))
            stacks[key] = value if value.is_absolute() else path.parent / value
    if len(stacks) == 1:
        table.fail(({"blue_stacks", "green_stacks"} - set(stacks)).pop(), "missing (a differential flame graph "
                                                                          "needs both)")
    return stacks


def _notify(plan: TomlTable) -> NotifySettings | None:
    if "notify" not in plan:
        return None
    table = plan.table("notify", ("command", "timeout_s"))
    return NotifySettings(table.string("command"), table.number("timeout_s", 10.0, positive=True))


def _decommission(plan: TomlTable) -> tuple[HookSet, float]:
    decommission, table = _hooks(plan, "decommission", required=False, why="", extra_keys=("grace_s",))
    return decommission, 300.0 if table is None else table.number("grace_s", 300.0, positive=True)


def _relative(path: Path, value: str) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else path.parent / candidate


def _after_promotion(plan: TomlTable, path: Path) -> AfterPromotion | None:
    """Every experiment is loaded and checked against the host's environment marker here, at
    `--check` and before the first hook: a rollout must not promote and only then find that its
    experiment cannot run. Targets and backends are checked when it runs (that check starts the
    fault's standby children)."""
    from agent.chaos.experiment import check_environment, load_experiment
    from agent.config import load_config
    from core.errors import BadInput

    if "after_promotion" not in plan:
        return None
    table = plan.table("after_promotion", ("experiments", "environment", "config", "state_dir"))
    names = table.string_list("experiments")
    if not names:
        table.fail("experiments", "empty (name at least one chaos experiment file, or drop the table)")
    settings = AfterPromotion([_relative(path, name) for name in names],
                              environment=table.string("environment", None),
                              config=_relative(path, table.string("config")) if "config" in table else None,
                              state_dir=_relative(path, table.string("state_dir")) if "state_dir" in table else None)
    if settings.config is not None and not settings.config.is_file():
        table.fail("config", f"{settings.config} does not exist")
    try:
        agent_config = load_config(settings.config)
    except BadInput as error:
        table.fail("config", str(error))
    marker, source = (settings.environment, "after_promotion.environment") if settings.environment is not None \
        else (agent_config.environment, f"config {agent_config.path or '(none)'}")
    for index, experiment_path in enumerate(settings.experiments):
        if not experiment_path.is_file():
            table.fail("experiments", f"[{index}] {experiment_path} does not exist")
        try:
            check_environment(load_experiment(experiment_path), marker, source)
        except BadInput as error:
            table.fail("experiments", f"[{index}] {error}")
    return settings


def parse_plan(data: dict[str, Any], path: Path) -> Plan:
    plan = TomlTable.root(data, str(path), known=TOP_KEYS)
    top = _top_level(plan, path)
    prepare = _prepare(plan)
    validate, shadow = _validate(plan, path)
    traffic = _traffic(plan)
    kpi = _kpi(plan)
    stages = _stages(plan, integer_weights=traffic.adapter == "haproxy")
    gate = settings_from_mapping({key: data[key] for key in ("gate", "metrics") if key in data}, source=str(path))
    stacks = _postmortem(plan, path)
    decommission, grace_s = _decommission(plan)
    return Plan(path=path, **top, prepare=prepare, validate=validate, shadow=shadow, traffic=traffic, kpi=kpi,
                stages=stages, gate=gate, raw=data, blue_stacks=stacks.get("blue_stacks"),
                green_stacks=stacks.get("green_stacks"),
                promote=_hooks(plan, "promote", required=False, why="")[0], decommission=decommission,
                decommission_grace_s=grace_s, undo=_hooks(plan, "undo", required=False, why="")[0],
                notify=_notify(plan), after_promotion=_after_promotion(plan, path))


def load_plan(path: Path) -> Plan:
    path = Path(path)
    return parse_plan(read_toml(path, "--plan"), path.resolve())
