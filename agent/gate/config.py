"""Gate settings: built-in defaults per metric, overridden by a TOML file.

    [gate]
    confidence = 0.98          # two-sided level of every interval
    pass_score = 90            # score >= pass_score -> pass
    marginal_score = 75        # score >= marginal_score -> marginal, below -> fail
    min_samples = 20           # per side, below which a metric is inconclusive
    tail_quantile = 0.99
    tail_scaled_by_median = true   # p99 judged after removing the median shift (see below)
    bootstrap_resamples = 2000

    [metrics."turns.latency_ns"]        # exact name, or a glob such as "syscalls.*"
    threshold_pct = 20                  # practical effect size, relative to the baseline
    direction = "increase"              # increase | decrease | either: which way is worse
    critical = true                     # a fail here fails the whole gate
    no_data = "skip"                    # skip | inconclusive | fail
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from core.toml_config import TomlTable, load_toml

DIRECTIONS = ("increase", "decrease", "either")
NO_DATA_POLICIES = ("skip", "inconclusive", "fail")


@dataclass(frozen=True)
class MetricSettings:
    # Relative thresholds for latency-like metrics; percentage points for proportions.
    threshold_pct: float = 20.0
    direction: str = "increase"
    critical: bool = False
    no_data: str = "skip"
    min_samples: int | None = None  # None: the [gate] default


# Why these defaults: two runs of the same build on a shared 2-core host differ by ~15% at p50,
# so the median shift must be >20% to count; a p99 moving by +10% must be caught, so the tail
# threshold sits at 5% (the gate asks for enough samples to resolve that); errors are judged in
# absolute percentage points because a relative change from 0.0% is meaningless.
DEFAULT_METRICS: dict[str, MetricSettings] = {
    "turns.latency_ns": MetricSettings(threshold_pct=20.0, critical=True),
    "turns.latency_ns.p99": MetricSettings(threshold_pct=5.0),
    "turns.error_rate": MetricSettings(threshold_pct=0.5, critical=True),
    "syscalls.*": MetricSettings(threshold_pct=25.0),
    "pg_queries.*": MetricSettings(threshold_pct=25.0),
    "host.cpu_busy_pct": MetricSettings(threshold_pct=20.0),
    "host.*available*": MetricSettings(threshold_pct=10.0, direction="decrease"),
    "host.*": MetricSettings(threshold_pct=10.0),
    "tcp.*": MetricSettings(threshold_pct=1.0),
    "flows.*": MetricSettings(threshold_pct=1.0),
}


@dataclass
class GateSettings:
    confidence: float = 0.98
    pass_score: float = 90.0
    marginal_score: float = 75.0
    min_samples: int = 20
    tail_quantile: float = 0.99
    # Judge the tail's shape: the candidate is rescaled by the median ratio before its p99 is
    # compared. Run-to-run drift on a shared host scales the whole distribution (the median check
    # judges that, with its larger threshold); a regression that hurts trading fattens the tail.
    tail_scaled_by_median: bool = True
    bootstrap_resamples: int = 2000
    metrics: dict[str, MetricSettings] = field(default_factory=lambda: dict(DEFAULT_METRICS))

    def for_metric(self, name: str) -> MetricSettings:
        """Exact name first, then the most specific (longest) matching glob, then defaults."""
        if name in self.metrics:
            return self.metrics[name]
        matches = [pattern for pattern in self.metrics if fnmatch.fnmatchcase(name, pattern)]
        if matches:
            return self.metrics[max(matches, key=len)]
        return MetricSettings()

    def min_samples_for(self, name: str) -> int:
        value = self.for_metric(name).min_samples
        return self.min_samples if value is None else value

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"] = {name: asdict(value) for name, value in self.metrics.items()}
        return data


GATE_KEYS = {"confidence", "pass_score", "marginal_score", "min_samples", "tail_quantile",
             "tail_scaled_by_median", "bootstrap_resamples"}
METRIC_KEYS = {"threshold_pct", "direction", "critical", "no_data", "min_samples"}


def settings_from_mapping(data: dict[str, Any], source: str = "gate config",
                          base: GateSettings | None = None) -> GateSettings:
    """Validate a parsed TOML mapping (a gate.toml, or a rollout plan's [gate] table)."""
    settings = base or GateSettings()
    settings = replace(settings, metrics=dict(settings.metrics))
    document = TomlTable.root(data, source, known=("gate", "metrics"))
    gate = document.table("gate", GATE_KEYS)
    settings.confidence = gate.number("confidence", settings.confidence, low=0.5, high=0.9999)
    settings.pass_score = gate.number("pass_score", settings.pass_score, low=0, high=100)
    settings.marginal_score = gate.number("marginal_score", settings.marginal_score, low=0, high=100)
    settings.min_samples = gate.number("min_samples", settings.min_samples, low=2, high=1e9, integer=True)
    settings.tail_quantile = gate.number("tail_quantile", settings.tail_quantile, low=0.5, high=0.9999)
    settings.tail_scaled_by_median = gate.boolean("tail_scaled_by_median", settings.tail_scaled_by_median)
    settings.bootstrap_resamples = gate.number("bootstrap_resamples", settings.bootstrap_resamples,
                                               low=100, high=1e6, integer=True)
    if settings.marginal_score > settings.pass_score:
        gate.fail("marginal_score", f"{settings.marginal_score:g} is above gate.pass_score ({settings.pass_score:g})")
    for name, table in document.named_tables("metrics", METRIC_KEYS):
        current = settings.for_metric(name)
        changes: dict[str, Any] = {}
        if "threshold_pct" in table:
            changes["threshold_pct"] = table.number("threshold_pct", low=0, high=1e6)
        if "direction" in table:
            changes["direction"] = table.choice("direction", DIRECTIONS)
        if "no_data" in table:
            changes["no_data"] = table.choice("no_data", NO_DATA_POLICIES)
        if "critical" in table:
            changes["critical"] = table.boolean("critical")
        if "min_samples" in table:
            changes["min_samples"] = table.number("min_samples", low=2, high=1e9, integer=True)
        settings.metrics[name] = replace(current, **changes)
    return settings


def read_toml(path: Path, option: str) -> dict[str, Any]:
    """A TOML file as a mapping, or BadInput naming the option it came from."""
    return load_toml(path, f"{option} {path}")


def load_settings(path: Path | None) -> GateSettings:
    if path is None:
        return GateSettings()
    return settings_from_mapping(read_toml(path, "--config"), source=str(path))
