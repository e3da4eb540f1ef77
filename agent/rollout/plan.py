"""Rollout plans (TOML), validated completely before any step runs (Chaos Toolkit's rule).

    name = "strategy-v2"
    state_dir = "/var/lib/guardian-agent/rollouts"   # journal, post-mortems, decision record
    on_inconclusive = "advance"      # non-final stage still undecided at max_dwell_s: advance | rollback

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
    # adapter = "command": set_weights = "lbctl weights --blue {blue} --green {green}"

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

    [gate] / [metrics."..."]         # as in gate.toml
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
TOP_KEYS = {"name", "state_dir", "on_inconclusive", "evaluate_every_s", "prepare", "validate", "traffic",
            "kpi", "stage", "gate", "metrics", "postmortem"}
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
    timeout_s: float = 5.0

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


def parse_plan(data: dict[str, Any], path: Path) -> Plan:
    _check_keys(data, TOP_KEYS, "plan")
    name = _require(data, "name", "plan", str)
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise BadInput(f"plan.name: {name!r} must be letters, digits, '-', '_' or '.'")
    state_dir = Path(_typed(data.get("state_dir", str(DEFAULT_STATE_DIR)), "plan.state_dir", str))
    if not state_dir.is_absolute():
        state_dir = (path.parent / state_dir).resolve()
    on_inconclusive = _typed(data.get("on_inconclusive", "advance"), "plan.on_inconclusive", str)
    if on_inconclusive not in ("advance", "rollback"):
        raise BadInput(f"plan.on_inconclusive: {on_inconclusive!r} is not advance or rollback")
    evaluate_every_s = _positive(data.get("evaluate_every_s", 1.0), "plan.evaluate_every_s")

    if "prepare" not in data:
        raise BadInput("plan.prepare: missing (the hooks that provision and deploy green)")
    prepare_table = _typed(data["prepare"], "plan.prepare", dict)
    _check_keys(prepare_table, {"commands", "timeout_s"}, "prepare")
    prepare = HookSet(_commands(prepare_table, "prepare"),
                      _positive(prepare_table.get("timeout_s", 600), "prepare.timeout_s"))
    if not prepare.commands:
        raise BadInput("prepare.commands: empty (at least one hook must deploy green)")

    if "validate" not in data:
        raise BadInput("plan.validate: missing (test hooks and/or [validate.shadow])")
    validate_table = _typed(data["validate"], "plan.validate", dict)
    _check_keys(validate_table, {"commands", "timeout_s", "shadow"}, "validate")
    shadow = None
    if "shadow" in validate_table:
        shadow_table = _typed(validate_table["shadow"], "validate.shadow", dict)
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
        shadow = ShadowSettings(
            pcap=pcap,
            blue_url=_http_url(_require(shadow_table, "blue_url", "validate.shadow", str), "validate.shadow.blue_url"),
            green_url=_http_url(_require(shadow_table, "green_url", "validate.shadow", str),
                                "validate.shadow.green_url"),
            server_port=server_port,
            max_requests=int(_positive(shadow_table.get("max_requests", 1000), "validate.shadow.max_requests")),
            max_mismatch_pct=float(_typed(shadow_table.get("max_mismatch_pct", 0.0),
                                          "validate.shadow.max_mismatch_pct", (int, float))),
            timeout_s=_positive(shadow_table.get("timeout_s", 5.0), "validate.shadow.timeout_s"))
    if "commands" not in validate_table and shadow is None:
        raise BadInput("validate.commands: missing (give test hooks, a [validate.shadow] replay, or both)")
    validate = HookSet(_commands(validate_table, "validate") if "commands" in validate_table else [],
                       _positive(validate_table.get("timeout_s", 600), "validate.timeout_s"))

    traffic_table = _typed(data.get("traffic"), "plan.traffic", dict) if "traffic" in data else None
    if traffic_table is None:
        raise BadInput("plan.traffic: missing (adapter = \"haproxy\" or \"command\")")
    _check_keys(traffic_table, {"adapter", "socket", "backend", "blue", "green", "set_weights", "timeout_s"},
                "traffic")
    adapter = _require(traffic_table, "adapter", "traffic", str)
    if adapter not in ADAPTERS:
        raise BadInput(f"traffic.adapter: unknown adapter {adapter!r} (expected {' or '.join(ADAPTERS)})")
    traffic = TrafficSettings(adapter=adapter,
                              blue=_typed(traffic_table.get("blue", "blue"), "traffic.blue", str),
                              green=_typed(traffic_table.get("green", "green"), "traffic.green", str),
                              timeout_s=_positive(traffic_table.get("timeout_s", 5.0), "traffic.timeout_s"))
    if traffic.blue == traffic.green:
        raise BadInput(f"traffic.green: same name as traffic.blue ({traffic.blue!r})")
    if adapter == "haproxy":
        traffic.socket = _require(traffic_table, "socket", "traffic", str)
        traffic.backend = _require(traffic_table, "backend", "traffic", str)
    else:
        traffic.set_weights = _require(traffic_table, "set_weights", "traffic", str)
        if "{green}" not in traffic.set_weights or "{blue}" not in traffic.set_weights:
            raise BadInput("traffic.set_weights: must contain the {blue} and {green} placeholders")

    kpi_table = _typed(data.get("kpi"), "plan.kpi", dict) if "kpi" in data else None
    if kpi_table is None:
        raise BadInput("plan.kpi: missing (url of the frontend to measure blue and green through)")
    _check_keys(kpi_table, {"source", "url", "listen", "version_header", "concurrency", "rate_hz", "timeout_s"},
                "kpi")
    source = _typed(kpi_table.get("source", "load"), "kpi.source", str)
    if source not in KPI_SOURCES:
        raise BadInput(f"kpi.source: unknown source {source!r} (expected {' or '.join(KPI_SOURCES)})")
    concurrency = _typed(kpi_table.get("concurrency", 4), "kpi.concurrency", int)
    if not 1 <= concurrency <= 64:
        raise BadInput(f"kpi.concurrency: {concurrency} outside 1..64")
    listen = ""
    if source == "haproxy-log":
        listen = _require(kpi_table, "listen", "kpi", str)
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadInput(f"kpi.listen: expected HOST:PORT for the UDP syslog listener, got {listen!r}")
    url = _http_url(_require(kpi_table, "url", "kpi", str), "kpi.url") if source == "load" else ""
    kpi = KpiSettings(url=url, source=source, listen=listen,
                      version_header=_typed(kpi_table.get("version_header", "X-Served-By"), "kpi.version_header", str),
                      concurrency=concurrency,
                      rate_hz=float(_typed(kpi_table.get("rate_hz", 0.0), "kpi.rate_hz", (int, float))),
                      timeout_s=_positive(kpi_table.get("timeout_s", 2.0), "kpi.timeout_s"))

    stage_tables = _typed(data.get("stage", []), "plan.stage", list)
    if not stage_tables:
        raise BadInput("plan.stage: missing (at least one [[stage]] with weight_pct)")
    stages = []
    previous = 0.0
    for index, table in enumerate(stage_tables):
        key = f"stage[{index}]"
        _typed(table, key, dict)
        _check_keys(table, {"weight_pct", "dwell_s", "max_dwell_s"}, key)
        weight = _typed(_require(table, "weight_pct", key, (int, float)), f"{key}.weight_pct", (int, float))
        if not 0 < weight <= 100:
            raise BadInput(f"{key}.weight_pct: {weight!r} outside (0, 100]")
        if weight <= previous:
            raise BadInput(f"{key}.weight_pct: weights must increase ({weight:g} after {previous:g})")
        dwell = _positive(_require(table, "dwell_s", key, (int, float)), f"{key}.dwell_s")
        max_dwell = _positive(table.get("max_dwell_s", dwell * 3), f"{key}.max_dwell_s")
        if max_dwell < dwell:
            raise BadInput(f"{key}.max_dwell_s: {max_dwell:g} is shorter than dwell_s {dwell:g}")
        stages.append(Stage(float(weight), dwell, max_dwell))
        previous = weight
    if stages[-1].weight_pct != 100:
        raise BadInput(f"stage[{len(stages) - 1}].weight_pct: the last stage must reach 100 to promote")

    gate = settings_from_mapping({key: data[key] for key in ("gate", "metrics") if key in data}, source="plan")
    stacks = {}
    if "postmortem" in data:
        postmortem = _typed(data["postmortem"], "plan.postmortem", dict)
        _check_keys(postmortem, {"blue_stacks", "green_stacks"}, "postmortem")
        for key in ("blue_stacks", "green_stacks"):
            if key in postmortem:
                # Not checked for existence: hooks may produce them during the rollout.
                value = Path(_typed(postmortem[key], f"postmortem.{key}", str))
                stacks[key] = value if value.is_absolute() else path.parent / value
        if len(stacks) == 1:
            missing = ({"blue_stacks", "green_stacks"} - set(stacks)).pop()
            raise BadInput(f"postmortem.{missing}: missing (a differential flame graph needs both)")
    return Plan(path=path, name=name, state_dir=state_dir, on_inconclusive=on_inconclusive,
                evaluate_every_s=evaluate_every_s, prepare=prepare, validate=validate, shadow=shadow,
                traffic=traffic, kpi=kpi, stages=stages, gate=gate, raw=data,
                blue_stacks=stacks.get("blue_stacks"), green_stacks=stacks.get("green_stacks"))


def load_plan(path: Path) -> Plan:
    path = Path(path)
    data = read_toml(path, "--plan")
    try:
        return parse_plan(data, path.resolve())
    except BadInput as error:
        raise BadInput(f"{path}: {error}") from None
