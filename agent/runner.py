"""Runs probes side by side over one shared window and writes the bundle.

One probe failing, raising or hanging never stops the others: each runs in its own thread,
is joined with a deadline (window end + the probe's finish_grace_s), and is recorded as
failed with its reason when it overruns. Ctrl-C/SIGTERM ends the window early (the CLI calls
`stop()`); probes then detach and return what they have, and the bundle is still written with
status `interrupted`.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Protocol

import pyarrow as pa

from core.errors import BadInput, GuardianError, Unavailable
from probes.base import FINDINGS_SCHEMA, ProbeBase, ProbeConfig, Window
from reports.bundle import BundleWriter, ProbeRecord


PREPARE_TIMEOUT_S = 120.0


@dataclass
class ProbeOutcome:
    name: str
    status: str
    reason: str = ""
    tables: dict[str, pa.Table] = field(default_factory=dict)
    seconds: float = 0.0
    detail: str = ""  # traceback for -v


@dataclass
class AuditResult:
    outcomes: list[ProbeOutcome]
    manifest: dict
    findings: pa.Table
    interrupted: bool
    headlines: list[str]


def select_probes(names: list[str] | None, registry: tuple[type[ProbeBase], ...]) -> list[type[ProbeBase]]:
    """Resolve probe names (None = every probe that is enabled by default)."""
    by_name = {probe.name: probe for probe in registry}
    if not names:
        return [probe for probe in registry if probe.default_enabled]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise BadInput(f"unknown probe {', '.join(unknown)} (known: {', '.join(by_name)})")
    return [by_name[n] for n in dict.fromkeys(names)]


def check_probes(probe_classes: list[type[ProbeBase]],
                 config: ProbeConfig) -> tuple[list[ProbeBase], list[ProbeOutcome]]:
    """A new instance of each class, checked; a broken check never stops the audit."""
    ready, outcomes = [], []
    for probe_class in probe_classes:
        started = time.monotonic()
        try:
            probe = probe_class(config)
            probe.check()
        except Unavailable as error:
            outcomes.append(ProbeOutcome(probe_class.name, "unavailable", str(error)))
            continue
        except BadInput:
            raise  # an option the user gave this probe is wrong: stop before the window
        except Exception as error:
            outcomes.append(ProbeOutcome(probe_class.name, "failed", f"check failed: {type(error).__name__}: {error}",
                                         seconds=time.monotonic() - started, detail=traceback.format_exc()))
            continue
        ready.append(probe)
    return ready, outcomes


def prepare_probes(probes: list[ProbeBase],
                   timeout_s: float = PREPARE_TIMEOUT_S) -> tuple[list[ProbeBase], list[ProbeOutcome]]:
    """prepare() (compile/attach) side by side before the window, so the window is exact."""
    ready, outcomes = [], []
    results: dict[str, BaseException | None] = {}

    def prepare(probe: ProbeBase) -> None:
        try:
            probe.prepare()
            results[probe.name] = None
        except BaseException as error:  # noqa: BLE001 - reported per probe
            results[probe.name] = error

    threads = [threading.Thread(target=prepare, args=(p,), daemon=True, name=f"prepare-{p.name}") for p in probes]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    refused = [error for error in results.values() if isinstance(error, BadInput)]
    if refused:
        # Bad input found while preparing (a refused PostgreSQL login): nothing is collected,
        # so let go of what the other probes attached or started.
        for probe in probes:
            if results.get(probe.name, refused[0]) is None:
                try:
                    probe.abandon()
                except Exception:
                    pass  # best effort: the audit is stopping with the user's error anyway
        raise refused[0]
    for probe in probes:
        if probe.name not in results:
            outcomes.append(ProbeOutcome(probe.name, "failed", f"prepare timed out after {timeout_s:g} s"))
            continue
        error = results[probe.name]
        if error is None:
            ready.append(probe)
        elif isinstance(error, Unavailable):
            outcomes.append(ProbeOutcome(probe.name, "unavailable", str(error)))
        else:
            outcomes.append(ProbeOutcome(probe.name, "failed", f"prepare failed: {type(error).__name__}: {error}",
                                         detail="".join(traceback.format_exception(error))))
    return ready, outcomes


class ProbeSource(Protocol):
    """Where an audit's probe instances come from: checked and prepared, ready for the window."""

    def provide(self, probe_classes: list[type[ProbeBase]], config: ProbeConfig,
                progress: Callable[[str], None]) -> tuple[list[ProbeBase], list[ProbeOutcome]]: ...


class FreshProbes:
    """A new instance of every probe per audit (`audit`, `collect`): detached when it ends."""

    def provide(self, probe_classes, config, progress):
        probes, outcomes = check_probes(probe_classes, config)
        if probes:
            progress(f"preparing {', '.join(p.name for p in probes)}")
        ready, failed = prepare_probes(probes)
        return ready, outcomes + failed


class KeptProbes:
    """The daemon's source: `rolling` probes are prepared once and stay attached from window to
    window (no BPF recompilation per window); the others get a fresh instance per window.
    `after_prepare` runs after each probe's prepare: the daemon trims its heap there, so the
    compiles' peaks (a few hundred MB each) neither add up nor stay for the whole first window."""

    def __init__(self, after_prepare: Callable[[], None] = lambda: None):
        self.after_prepare = after_prepare
        self.kept: dict[str, ProbeBase] = {}

    def provide(self, probe_classes, config, progress):
        kept = [self.kept[cls.name] for cls in probe_classes if cls.name in self.kept]
        fresh, outcomes = check_probes([cls for cls in probe_classes if cls.name not in self.kept], config)
        ready: list[ProbeBase] = []
        for probe in fresh:  # one at a time, the heap trimmed after each
            progress(f"preparing {probe.name}")
            probe_ready, probe_outcomes = prepare_probes([probe])
            self.after_prepare()
            ready.extend(probe_ready)
            outcomes.extend(probe_outcomes)
        for probe in ready:
            if probe.rolling:
                probe.keep_attached_between_windows()
                self.kept[probe.name] = probe
        return kept + ready, outcomes

    def discard(self, name: str) -> None:
        """A kept probe whose window failed (or was abandoned) starts afresh next window."""
        probe = self.kept.pop(name, None)
        if probe is not None:
            close_quietly(probe)

    def close_all(self) -> None:
        for name in list(self.kept):
            self.discard(name)


def close_quietly(probe: ProbeBase) -> None:
    try:
        probe.close()
    except Exception:
        pass  # detaching at exit: the kernel drops what is left with our file descriptors


class AuditRun:
    def __init__(
        self,
        probe_classes: list[type[ProbeBase]],
        config: ProbeConfig,
        writer: BundleWriter,
        duration_s: float,
        progress: Callable[[str], None] | None = None,
        ticker: Callable[[float], None] | None = None,
        source: ProbeSource | None = None,
    ):
        self.probe_classes = probe_classes
        self.config = config
        self.writer = writer
        self.window = Window(duration_s, writer.out_dir, writer.run_id)
        self.progress = progress or (lambda message: None)
        self.ticker = ticker or (lambda remaining_s: None)
        self.source = source or FreshProbes()

    def stop(self) -> None:
        self.window.stop()

    def run(self) -> AuditResult:
        ready, outcomes = self.source.provide(self.probe_classes, self.config, self.progress)

        self.window.restart()
        results: dict[str, ProbeOutcome] = {}

        def collect(probe) -> None:
            started = time.monotonic()
            try:
                tables = probe.collect(self.window)
                status = "interrupted" if self.window.interrupted else "ok"
                reason = "window ended early" if status == "interrupted" else ""
                reason = probe.status_reason or reason
                if probe.partial and status == "ok":
                    status = "partial"  # it ran, but its maps dropped data: never `ok`
                results[probe.name] = ProbeOutcome(probe.name, status, reason, tables or {},
                                                   time.monotonic() - started)
            except Unavailable as error:
                results[probe.name] = ProbeOutcome(probe.name, "unavailable", str(error),
                                                   seconds=time.monotonic() - started)
            except Exception as error:
                results[probe.name] = ProbeOutcome(
                    probe.name, "failed", f"{type(error).__name__}: {error}",
                    seconds=time.monotonic() - started, detail=traceback.format_exc(),
                )

        threads = {
            probe.name: threading.Thread(target=collect, args=(probe,), daemon=True, name=f"probe-{probe.name}")
            for probe in ready
        }
        for thread in threads.values():
            thread.start()
        if ready:
            self.progress(f"collecting for {self.window.duration_s:g} s")
        while not self.window.wait(0.5):
            self.ticker(self.window.remaining())
        self.ticker(0.0)
        for probe in ready:
            grace = float(probe.finish_grace_s)
            # The deadline for a probe counts from the end of the window, not from now.
            threads[probe.name].join(max(0.1, self.window.remaining() + grace))
            if threads[probe.name].is_alive():
                try:
                    probe.abandon()
                except Exception:
                    pass  # giving up on it either way; its outcome says it timed out
                results.setdefault(
                    probe.name,
                    ProbeOutcome(probe.name, "failed",
                                 f"timed out: still running {grace:g} s after the window ended"),
                )
            outcomes.append(results[probe.name])

        order = {cls.name: index for index, cls in enumerate(self.probe_classes)}
        outcomes.sort(key=lambda outcome: order.get(outcome.name, 999))
        return self._write(outcomes)

    def _write(self, outcomes: list[ProbeOutcome]) -> AuditResult:
        findings_parts: list[pa.Table] = []
        headlines: list[str] = []
        by_class = {cls.name: cls for cls in self.probe_classes}
        for outcome in outcomes:
            counts: dict[str, int] = {}
            tables = dict(outcome.tables)
            probe_findings = tables.pop("findings", None)
            try:
                for table_name, table in tables.items():
                    if table_name in self.writer.tables_written:
                        raise GuardianError(f"table {table_name!r} already written by another probe")
                    counts[table_name] = self.writer.write_table(table_name, table, outcome.name)
                if probe_findings is not None and probe_findings.num_rows:
                    findings_parts.append(probe_findings.select(FINDINGS_SCHEMA.names).cast(FINDINGS_SCHEMA))
                    counts["findings"] = probe_findings.num_rows
            except Exception as error:
                outcome.status = "failed"
                outcome.reason = f"writing tables failed: {error}"
            probe_class = by_class.get(outcome.name, ProbeBase)
            if outcome.tables:
                try:
                    headlines.extend(probe_class.headlines(outcome.tables))
                except Exception:
                    pass  # a summary line is a courtesy: its failure never costs the bundle
            for extra in probe_class.extras:
                if self.writer.path(extra).exists():
                    self.writer.add_extra(extra)
            self.writer.add_probe(ProbeRecord(outcome.name, outcome.status, outcome.reason, counts, outcome.seconds))

        findings = pa.concat_tables(findings_parts) if findings_parts else FINDINGS_SCHEMA.empty_table()
        findings = sort_findings(findings)
        self.writer.write_table("findings", findings, "audit")
        manifest = self.writer.finish(
            tuning_profile=self.config.options.get("profile"),
            extra={"window_s": self.window.duration_s, "interrupted": self.window.interrupted},
        )
        return AuditResult(outcomes, manifest, findings, self.window.interrupted, headlines)


def sort_findings(findings: pa.Table) -> pa.Table:
    """Most severe first, stable within a severity."""
    if findings.num_rows == 0:
        return findings
    rank = {"critical": 0, "warning": 1, "info": 2}
    severities = findings.column("severity").to_pylist()
    order = sorted(range(len(severities)), key=lambda i: (rank.get(severities[i], 3), i))
    return findings.take(pa.array(order))
