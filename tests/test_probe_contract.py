"""The probe contract, walked over the registry: what the runner, the daemon, the bundle reader
and every notebook rely on (../shared/ARCHITECTURE.md: probe contract, stable tables, units)."""

from __future__ import annotations

import inspect
import re

import pyarrow as pa
import pytest

from probes import REGISTRY
from probes.base import FINDINGS_SCHEMA, Probe, ProbeBase, ProbeConfig
from probes.options import BY_NAME, PROBE_OPTIONS, declared
from probes.pglog import PG_LOG_ERRORS_SCHEMA, PG_QUERIES_SCHEMA, PG_QUERY_MINUTES_SCHEMA

# ARCHITECTURE.md "The report bundle (stable)": the columns other tools read. syscall_buckets is
# checked once a probe declares it (bundle format 2).
STABLE_COLUMNS = {
    "host": {"ts", "cpu"},
    "syscalls": {"pid", "comm", "syscall", "count", "total_ns", "max_ns"},
    "syscall_buckets": {"pid", "syscall", "bucket_lo_ns", "bucket_hi_ns", "bucket_count"},
    "tcp": {"pid", "comm", "laddr", "lport", "raddr", "rport", "srtt_us_p50", "srtt_us_max", "retransmits",
            "bytes_sent", "bytes_received"},
    "flows": {"flow", "client", "server", "packets", "bytes", "turns"},
    "turns": {"flow", "ts", "latency_ns", "request_bytes", "response_bytes"},
    "stacks": {"stack", "samples", "thread"},
    "kernel": {"item", "current", "expected", "compliant", "source", "reboot_required"},
    "pg_queries": {"fingerprint", "query", "calls", "total_ms", "p50_ms", "p99_ms", "p999_ms", "max_ms"},
    "findings": {"probe", "severity", "subject", "message", "recommendation"},
}
MUST_BE_DECLARED = {"host", "syscalls", "tcp", "flows", "turns", "stacks", "kernel", "pg_queries"}
# Tables a command writes without a probe (pg-log), held to the same stable columns and units.
COMMAND_TABLES = {"pg_queries": PG_QUERIES_SCHEMA, "pg_query_minutes": PG_QUERY_MINUTES_SCHEMA,
                  "pg_log_errors": PG_LOG_ERRORS_SCHEMA}

UNITS = ("ns", "us", "ms", "s", "bytes", "pct", "hz")
# A name saying "this is a time or a size" must say in which unit (srtt_us_p50, latency_ns);
# counts of such things (srtt_samples) and names of them (wait_event) are not measures.
MEASURES = {"latency", "duration", "elapsed", "delay", "rtt", "srtt", "interval", "lifetime", "size", "time", "wait"}
NOT_MEASURES = {"samples", "count", "event", "type", "timer"}
# Spellings of units the project does not use (one spelling per unit).
WRONG_UNITS = {"sec", "secs", "seconds", "msec", "usec", "nsec", "millis", "micros", "nanos", "kb", "mb", "gb",
               "kib", "mib", "percent", "bps"}


def unit_problems(column: str) -> list[str]:
    segments = column.split("_")
    if WRONG_UNITS & set(segments[1:]):
        return [f"{column}: spell the unit as one of {', '.join(UNITS)}"]
    if MEASURES & set(segments) and segments[-1] not in NOT_MEASURES and not set(UNITS) & set(segments):
        return [f"{column}: a time or size without its unit"]
    return []


def all_tables() -> dict[str, tuple[str, pa.Schema]]:
    tables = {"findings": ("(shared)", FINDINGS_SCHEMA),
              **{name: ("pg-log", schema) for name, schema in COMMAND_TABLES.items()}}
    for probe in REGISTRY:
        for table, schema in {probe.name: probe.schema, **probe.extra_schemas}.items():
            assert table not in tables, f"table {table!r} declared by {tables[table][0]} and {probe.name}"
            tables[table] = (probe.name, schema)
    return tables


def test_registry_holds_probe_classes_with_unique_names():
    names = [probe.name for probe in REGISTRY]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[a-z][a-z_]*", n) for n in names)
    for probe in REGISTRY:
        assert inspect.isclass(probe) and issubclass(probe, ProbeBase), probe
        assert probe.description and probe.finish_grace_s > 0
        assert isinstance(probe.extras, tuple) and all(isinstance(e, str) for e in probe.extras)
        assert isinstance(probe.default_enabled, bool) and isinstance(probe.rolling, bool)


@pytest.mark.parametrize("probe", REGISTRY, ids=lambda p: p.name)
def test_every_hook_is_declared_and_callable_without_getattr(probe):
    instance = probe(ProbeConfig())
    for hook in ("check", "prepare", "collect", "abandon", "close", "keep_attached_between_windows", "headlines"):
        assert callable(getattr(instance, hook)), hook
    assert instance.status_reason == "" and instance.keep_attached is False
    assert probe.headlines({}) == [] or isinstance(probe.headlines({}), list)
    protocol_hooks = {name for name in vars(Probe) if not name.startswith("_")} | set(Probe.__annotations__)
    assert protocol_hooks <= set(dir(instance)), protocol_hooks - set(dir(instance))
    if not probe.rolling:
        with pytest.raises(TypeError):
            instance.keep_attached_between_windows()


def test_schemas_are_declared_on_the_class():
    for probe in REGISTRY:
        assert "schema" in vars(probe) and isinstance(probe.schema, pa.Schema) and len(probe.schema)
        for table, schema in probe.extra_schemas.items():
            assert isinstance(schema, pa.Schema) and len(schema), (probe.name, table)
    assert MUST_BE_DECLARED <= set(all_tables())


def test_stable_columns_are_present():
    for table, (probe, schema) in all_tables().items():
        missing = STABLE_COLUMNS.get(table, set()) - set(schema.names)
        assert not missing, f"{probe}: table {table} lacks stable column(s) {sorted(missing)}"


def test_units_in_column_names():
    problems = [f"{table}.{problem}" for table, (_, schema) in all_tables().items()
                for column in schema.names for problem in unit_problems(column)]
    assert problems == []


def test_unit_rule_can_fail():
    assert unit_problems("latency") and unit_problems("wait_sec") and unit_problems("size_mb")
    assert not unit_problems("latency_ns") and not unit_problems("mem_total_bytes") and not unit_problems("ts")


def test_options_are_declared_once_for_probes_that_exist():
    names = [option.name for option in PROBE_OPTIONS]
    assert len(names) == len(set(names))
    flags = [option.cli_flag for option in PROBE_OPTIONS]
    assert len(flags) == len(set(flags))
    probe_names = {probe.name for probe in REGISTRY}
    for option in PROBE_OPTIONS:
        assert set(option.probes) <= probe_names, option
        assert option.help and option.kind
    assert set(BY_NAME) == set(names)


def test_a_misspelled_option_fails_loudly():
    with pytest.raises(LookupError, match="stack_thread"):
        ProbeConfig(options={"stack_thread": "all"})
    with pytest.raises(LookupError, match="not declared for it"):
        declared("iface", "stacks")  # another probe's option
