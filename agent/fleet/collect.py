"""One audit window into the dataset: audit → bundle in the spool → staged objects → store."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from agent.config import AgentConfig
from core.errors import BadInput, Unavailable
from agent.fleet.spool import DrainReport, Spool
from agent.fleet.stores import open_store
from core.host import Host
from agent.runner import AuditResult, AuditRun, ProbeSource
from probes.base import ProbeBase, ProbeConfig
from reports.bundle import BundleWriter, new_run_id


def absent_probe(name: str) -> type:
    """Stand-in for a configured probe that this agent build does not have: it is recorded as
    unavailable in the manifest (and the `runs` table) instead of failing the whole run."""

    def check(self) -> None:
        raise Unavailable(f"probe {name!r} is not part of guardian-agent on this host (upgrade the agent)")

    return type(f"Absent_{name}", (ProbeBase,), {"name": name, "description": "not installed", "check": check})


def resolve_probes(names: tuple[str, ...], registry: tuple) -> list[type]:
    by_name = {probe.name: probe for probe in registry}
    return [by_name.get(name) or absent_probe(name) for name in dict.fromkeys(names)]


def probe_config(config: AgentConfig, host: Host) -> ProbeConfig:
    pids = tuple(pid for pid in config.targets.pids if host.pid_exists(pid))
    return ProbeConfig(host=host, pids=pids, options=config.probe_options_for_run(),
                       process_names=config.targets.process_names, units=config.targets.units)


@dataclass
class CollectOutcome:
    run_id: str
    result: AuditResult | None
    objects: int = 0
    dropped_runs: list[str] = field(default_factory=list)
    drain: DrainReport | None = None


def make_spool(config: AgentConfig) -> Spool:
    spool = Spool(config.spool_dir(), config.dataset.spool_max_bytes, config.dataset.spool_policy)
    spool.ensure()
    return spool


def make_store(config: AgentConfig):
    store = open_store(config.dataset.root, config.dataset.s3_endpoint_url, config.dataset.s3_region)
    store.check()
    return store


def audit_into_spool(spool: Spool, probe_classes: list[type], probe_cfg: ProbeConfig, duration_s: float,
                     host: Host, progress: Callable[[str], None] | None = None,
                     on_run: Callable[[AuditRun], None] | None = None,
                     source: ProbeSource | None = None) -> tuple[str, AuditResult]:
    run_id = new_run_id(host.hostname())
    writer = BundleWriter(spool.bundle_dir(run_id), run_id=run_id, host=host)
    run = AuditRun(probe_classes, probe_cfg, writer, duration_s, progress=progress, source=source)
    if on_run:
        on_run(run)
    return run_id, run.run()


def collect_once(config: AgentConfig, registry: tuple, duration_s: float | None = None,
                 progress: Callable[[str], None] | None = None, upload: bool = True,
                 host: Host | None = None, before_stage: Callable | None = None) -> CollectOutcome:
    """The `collect` command: validate everything, run one window, publish what is waiting."""
    host = host or Host.real()
    duration_s = config.collect.duration_s if duration_s is None else duration_s
    if duration_s <= 0:
        raise BadInput(f"--duration must be positive, not {duration_s:g}")
    store = make_store(config)
    spool = make_spool(config)
    spool.recover()
    probe_classes = resolve_probes(config.collect.probes, registry)

    current: dict[str, AuditRun] = {}
    previous = {}

    def on_signal(signum, frame):  # noqa: ARG001 - signal signature
        if "run" in current:
            current["run"].stop()

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        run_id, result = audit_into_spool(spool, probe_classes, probe_config(config, host), duration_s, host,
                                          progress, on_run=lambda run: current.__setitem__("run", run))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if before_stage is not None:  # e.g. the Prometheus textfile, read from the bundle staging removes
        before_stage(spool.bundle_dir(run_id))
    objects = spool.stage(run_id)
    outcome = CollectOutcome(run_id, result, len(objects))
    outcome.dropped_runs = spool.enforce_cap(run_id)
    if upload:
        outcome.drain = spool.drain(store, deadline_monotonic=time.monotonic() + 300)
    return outcome


def upload_only(config: AgentConfig) -> DrainReport:
    store = make_store(config)
    spool = make_spool(config)
    spool.recover()
    return spool.drain(store)
