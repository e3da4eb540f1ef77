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
    [gate] / [metrics."..."]         # as in gate.toml

One small function per table; each names the key it refuses.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.errors import BadInput
from agent.gate.config import GateSettings, read_toml, settings_from_mapping

ADAPTERS = ("haproxy", "command")
TOP_KEYS = {"name", "state_dir", "on_inconclusive", "evaluate_every_s", "max_failed_looks", "max_inconclusive_looks",
            "max_unattributed_pct", "crossover_s", "prepare", "validate", "traffic", "kpi", "stage", "gate", "metrics", "postmortem",
            "promote", "decommission", "undo", "notify"}
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

    @property
    def journal_path(self) -> Path:
        return self.state_dir / f"{self.name}.journal.jsonl"

    @property
    def record_dir(self) -> Path:
        return self.state_dir / "gate-decisions"


def _require(table: dict, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in table:
        raise BadInput(f"{where}.{key}: missing")
    return _typed(table[key], f"{where}.{key}", kind)


def _typed(value: Any, where: str, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise BadInput(f"{where}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise BadInput(f"{where}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise BadInput(f"{where}.{key}: unknown key (expected one of {', '.join(sorted(allowed))})")


def _positive(value: Any, where: str) -> float:
    value = _typed(value, where, (int, float))
    if value <= 0:
        raise BadInput(f"{where}: must be positive, not {value!r}")
    return float(value)


def _commands(table: dict, where: str) -> list[str]:
    commands = _require(table, "commands", where, list)
    for index, command in enumerate(commands):
        _typed(command, f"{where}.commands[{index}]", str)
        try:
            if not shlex.split(command):
                raise BadInput(f"{where}.commands[{index}]: empty command")
        except ValueError as error:
            raise BadInput(f"{where}.commands[{index}]: cannot parse ({error})") from None
    return list(commands)


def _http_url(value: Any, where: str) -> str:
    value = _typed(value, where, str)
    parts = urlsplit(value)
    if parts.scheme != "http" or not parts.hostname:
        raise BadInput(f"{where}: expected an http://host:port/ URL, got {value!r}")
    return value


def _hooks(data: dict, key: str, *, required: bool, why: str, extra_keys: set[str] = frozenset(),
           default_timeout_s: float = 600.0) -> tuple[HookSet, dict]:
    """A hook table ([prepare], [validate], [promote], [decommission], [undo])."""
    if key not in data:
        if required:
            raise BadInput(f"plan.{key}: missing ({why})")
        return HookSet([]), {}
    table = _typed(data[key], f"plan.{key}", dict)
    _check_keys(table, {"commands", "timeout_s"} | set(extra_keys), key)
    commands = _commands(table, key) if "commands" in table else []
    return HookSet(commands, _positive(table.get("timeout_s", default_timeout_s), f"{key}.timeout_s")), table


def _top_level(data: dict, path: Path) -> dict[str, Any]:
    name = _require(data, "name", "plan", str)
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise BadInput(f"plan.name: {name!r} must be letters, digits, '-', '_' or '.'")
    state_dir = Path(_typed(data.get("state_dir", str(DEFAULT_STATE_DIR)), "plan.state_dir", str))
    if not state_dir.is_absolute():
        state_dir = (path.parent / state_dir).resolve()
    on_inconclusive = _typed(data.get("on_inconclusive", "rollback"), "plan.on_inconclusive", str)
    if on_inconclusive not in ON_INCONCLUSIVE:
        raise BadInput(f"plan.on_inconclusive: {on_inconclusive!r} is not one of {', '.join(ON_INCONCLUSIVE)}")
    return {"name": name, "state_dir": state_dir, "on_inconclusive": on_inconclusive,
            "evaluate_every_s": _positive(data.get("evaluate_every_s", 1.0), "plan.evaluate_every_s"),
            "max_failed_looks": _count_setting(data, "max_failed_looks", 1, low=1),
            "max_inconclusive_looks": _count_setting(data, "max_inconclusive_looks", 0, low=0),
            "max_unattributed_pct": _percent(data.get("max_unattributed_pct", 1.0), "plan.max_unattributed_pct"),
            "crossover_s": _non_negative(data.get("crossover_s", 0.25), "plan.crossover_s")}


def _non_negative(value: Any, where: str) -> float:
    value = _typed(value, where, (int, float))
    if value < 0:
        raise BadInput(f"{where}: must be 0 or more, not {value!r}")
    return float(value)


def _count_setting(data: dict, key: str, default: int, low: int) -> int:
    value = _typed(data.get(key, default), f"plan.{key}", int)
    if value < low:
        raise BadInput(f"plan.{key}: {value} is below {low}")
    return value


def _percent(value: Any, where: str) -> float:
    value = _typed(value, where, (int, float))
    if not 0 <= value <= 100:
        raise BadInput(f"{where}: {value!r} outside 0..100")
    return float(value)


def _prepare(data: dict) -> HookSet:
    prepare, _ = _hooks(data, "prepare", required=True, why="the hooks that provision and deploy green")
    if not prepare.commands:
        raise BadInput("prepare.commands: empty (at least one hook must deploy green)")
    return prepare


def _shadow(table: dict, path: Path) -> ShadowSettings:
    shadow_table = _typed(table, "validate.shadow", dict)
    _check_keys(shadow_table, {"pcap", "blue_url", "green_url", "server_port", "max_requests",
                               "max_mismatch_pct", "timeout_s"}, "validate.shadow")
    pcap = Path(_require(shadow_table, "pcap", "validate.shadow", str))
    if not pcap.is_absolute():
        pcap = path.parent / pcap
    if not pcap.is_file():
        raise BadInput(f"validate.shadow.pcap: {pcap} does not exist")
    server_port = shadow_table.get("server_port")
    if server_port is not None and not (isinstance(server_port, int) and 0 < server_port < 65536):
        raise BadInput(f"validate.shadow.server_port: {server_port!r} is not a port")
    return ShadowSettings(
        pcap=pcap,
        blue_url=_http_url(_require(shadow_table, "blue_url", "validate.shadow", str), "validate.shadow.blue_url"),
        green_url=_http_url(_require(shadow_table, "green_url", "validate.shadow", str), "validate.shadow.green_url"),
        server_port=server_port,
        max_requests=int(_positive(shadow_table.get("max_requests", 1000), "validate.shadow.max_requests")),
        max_mismatch_pct=float(_typed(shadow_table.get("max_mismatch_pct", 0.0), "validate.shadow.max_mismatch_pct",
                                      (int, float))),
        timeout_s=_positive(shadow_table.get("timeout_s", 5.0), "validate.shadow.timeout_s"))


def _validate(data: dict, path: Path) -> tuple[HookSet, ShadowSettings | None]:
    validate, table = _hooks(data, "validate", required=True, why="test hooks and/or [validate.shadow]",
                             extra_keys={"shadow"})
    shadow = _shadow(table["shadow"], path) if "shadow" in table else None
    if "commands" not in table and shadow is None:
        raise BadInput("validate.commands: missing (give test hooks, a [validate.shadow] replay, or both)")
    return validate, shadow


def _traffic(data: dict) -> TrafficSettings:
    if "traffic" not in data:
        raise BadInput("plan.traffic: missing (adapter = \"haproxy\" or \"command\")")
    table = _typed(data["traffic"], "plan.traffic", dict)
    _check_keys(table, {"adapter", "socket", "backend", "blue", "green", "set_weights", "get_weights", "timeout_s",
                        "wait_up_s"}, "traffic")
    adapter = _require(table, "adapter", "traffic", str)
    if adapter not in ADAPTERS:
        raise BadInput(f"traffic.adapter: unknown adapter {adapter!r} (expected {' or '.join(ADAPTERS)})")
    traffic = TrafficSettings(adapter=adapter, blue=_typed(table.get("blue", "blue"), "traffic.blue", str),
                              green=_typed(table.get("green", "green"), "traffic.green", str),
                              timeout_s=_positive(table.get("timeout_s", 5.0), "traffic.timeout_s"),
                              wait_up_s=_positive(table.get("wait_up_s", 30.0), "traffic.wait_up_s"))
    if traffic.blue == traffic.green:
        raise BadInput(f"traffic.green: same name as traffic.blue ({traffic.blue!r})")
    if adapter == "haproxy":
        traffic.socket = _require(table, "socket", "traffic", str)
        traffic.backend = _require(table, "backend", "traffic", str)
        return traffic
    traffic.set_weights = _require(table, "set_weights", "traffic", str)
    if "{green}" not in traffic.set_weights or "{blue}" not in traffic.set_weights:
        raise BadInput("traffic.set_weights: must contain the {blue} and {green} placeholders")
    traffic.get_weights = _typed(table.get("get_weights", ""), "traffic.get_weights", str)
    return traffic


def _kpi(data: dict) -> KpiSettings:
    if "kpi" not in data:
        raise BadInput("plan.kpi: missing (url of the frontend to measure blue and green through)")
    table = _typed(data["kpi"], "plan.kpi", dict)
    _check_keys(table, {"source", "url", "listen", "version_header", "concurrency", "rate_hz", "timeout_s",
                        "baseline_s"}, "kpi")
    source = _typed(table.get("source", "load"), "kpi.source", str)
    if source not in KPI_SOURCES:
        raise BadInput(f"kpi.source: unknown source {source!r} (expected {' or '.join(KPI_SOURCES)})")
    concurrency = _typed(table.get("concurrency", 4), "kpi.concurrency", int)
    if not 1 <= concurrency <= 64:
        raise BadInput(f"kpi.concurrency: {concurrency} outside 1..64")
    listen = ""
    if source == "haproxy-log":
        listen = _require(table, "listen", "kpi", str)
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadInput(f"kpi.listen: expected HOST:PORT for the UDP syslog listener, got {listen!r}")
    url = _http_url(_require(table, "url", "kpi", str), "kpi.url") if source == "load" else ""
    return KpiSettings(url=url, source=source, listen=listen,
                       version_header=_typed(table.get("version_header", "X-Served-By"), "kpi.version_header", str),
                       concurrency=concurrency,
                       rate_hz=float(_typed(table.get("rate_hz", 0.0), "kpi.rate_hz", (int, float))),
                       timeout_s=_positive(table.get("timeout_s", 2.0), "kpi.timeout_s"),
                       baseline_s=_positive(table.get("baseline_s", 10.0), "kpi.baseline_s"))


def _stage(table: Any, index: int, previous: float, integer_weights: bool) -> Stage:
    key = f"stage[{index}]"
    _typed(table, key, dict)
    _check_keys(table, {"weight_pct", "dwell_s", "max_dwell_s"}, key)
    weight = _require(table, "weight_pct", key, (int, float))
    if not 0 < weight <= 100:
        raise BadInput(f"{key}.weight_pct: {weight!r} outside (0, 100]")
    if integer_weights and weight != int(weight):
        raise BadInput(f"{key}.weight_pct: {weight:g} cannot be set on HAProxy (runtime weights are whole "
                       f"numbers; it would round to {round(weight):g}): use a whole percent")
    if weight <= previous:
        raise BadInput(f"{key}.weight_pct: weights must increase ({weight:g} after {previous:g})")
    dwell = _positive(_require(table, "dwell_s", key, (int, float)), f"{key}.dwell_s")
    max_dwell = _positive(table.get("max_dwell_s", dwell * 3), f"{key}.max_dwell_s")
    if max_dwell < dwell:
        raise BadInput(f"{key}.max_dwell_s: {max_dwell:g} is shorter than dwell_s {dwell:g}")
    return Stage(float(weight), dwell, max_dwell)


def _stages(data: dict, integer_weights: bool) -> list[Stage]:
    tables = _typed(data.get("stage", []), "plan.stage", list)
    if not tables:
        raise BadInput("plan.stage: missing (at least one [[stage]] with weight_pct)")
    stages: list[Stage] = []
    for index, table in enumerate(tables):
        stages.append(_stage(table, index, stages[-1].weight_pct if stages else 0.0, integer_weights))
    if stages[-1].weight_pct != 100:
        raise BadInput(f"stage[{len(stages) - 1}].weight_pct: the last stage must reach 100 to promote")
    return stages


def _postmortem(data: dict, path: Path) -> dict[str, Path]:
    if "postmortem" not in data:
        return {}
    postmortem = _typed(data["postmortem"], "plan.postmortem", dict)
    _check_keys(postmortem, {"blue_stacks", "green_stacks"}, "postmortem")
    stacks = {}
    for key in ("blue_stacks", "green_stacks"):
        if key in postmortem:
            # Not checked for existence: hooks may produce them during the rollout.
            value = Path(_typed(postmortem[key], f"postmortem.{key}", str))
            stacks[key] = value if value.is_absolute() else path.parent / value
    if len(stacks) == 1:
        missing = ({"blue_stacks", "green_stacks"} - set(stacks)).pop()
        raise BadInput(f"postmortem.{missing}: missing (a differential flame graph needs both)")
    return stacks


def _notify(data: dict) -> NotifySettings | None:
    if "notify" not in data:
        return None
    table = _typed(data["notify"], "plan.notify", dict)
    _check_keys(table, {"command", "timeout_s"}, "notify")
    command = _require(table, "command", "notify", str)
    try:
        if not shlex.split(command):
            raise BadInput("notify.command: empty command")
    except ValueError as error:
        raise BadInput(f"notify.command: cannot parse ({error})") from None
    return NotifySettings(command, _positive(table.get("timeout_s", 10.0), "notify.timeout_s"))


def parse_plan(data: dict[str, Any], path: Path) -> Plan:
    _check_keys(data, TOP_KEYS, "plan")
    top = _top_level(data, path)
    prepare = _prepare(data)
    validate, shadow = _validate(data, path)
    traffic = _traffic(data)
    kpi = _kpi(data)
    stages = _stages(data, integer_weights=traffic.adapter == "haproxy")
    gate = settings_from_mapping({key: data[key] for key in ("gate", "metrics") if key in data}, source="plan")
    stacks = _postmortem(data, path)
    promote, _ = _hooks(data, "promote", required=False, why="")
    decommission, decommission_table = _hooks(data, "decommission", required=False, why="", extra_keys={"grace_s"})
    undo, _ = _hooks(data, "undo", required=False, why="")
    grace_s = decommission_table.get("grace_s", 300.0)
    if decommission.commands or "grace_s" in decommission_table:
        grace_s = _positive(grace_s, "decommission.grace_s")
    return Plan(path=path, **top, prepare=prepare, validate=validate, shadow=shadow, traffic=traffic, kpi=kpi,
                stages=stages, gate=gate, raw=data, blue_stacks=stacks.get("blue_stacks"),
                green_stacks=stacks.get("green_stacks"), promote=promote, decommission=decommission,
                decommission_grace_s=float(grace_s), undo=undo, notify=_notify(data))


def load_plan(path: Path) -> Plan:
    path = Path(path)
    data = read_toml(path, "--plan")
    try:
        return parse_plan(data, path.resolve())
    except BadInput as error:
        raise BadInput(f"{path}: {error}") from None
