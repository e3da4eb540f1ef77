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
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from core.errors import BadInput

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


def _number(where: str, value: Any, low: float, high: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{where}: expected a number, got {value!r}")
    if integer and int(value) != value:
        raise BadInput(f"{where}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise BadInput(f"{where}: {value!r} outside {low:g}..{high:g}")
    return int(value) if integer else float(value)


def settings_from_mapping(data: dict[str, Any], source: str = "gate config",
                          base: GateSettings | None = None) -> GateSettings:
    """Validate a parsed TOML mapping (a gate.toml, or a rollout plan's [gate] table)."""
    settings = base or GateSettings()
    settings = replace(settings, metrics=dict(settings.metrics))
    unknown = set(data) - {"gate", "metrics"}
    if unknown:
        raise BadInput(f"{source}: unknown key {sorted(unknown)[0]!r} (expected [gate] and [metrics.NAME])")
    gate = data.get("gate", {})
    if not isinstance(gate, dict):
        raise BadInput(f"{source}: [gate] must be a table")
    for key, value in gate.items():
        where = f"{source}: gate.{key}"
        if key not in GATE_KEYS:
            raise BadInput(f"{where}: unknown key (expected one of {', '.join(sorted(GATE_KEYS))})")
        if key == "confidence":
            settings.confidence = _number(where, value, 0.5, 0.9999)
        elif key in ("pass_score", "marginal_score"):
            setattr(settings, key, _number(where, value, 0, 100))
        elif key == "min_samples":
            settings.min_samples = _number(where, value, 2, 1e9, integer=True)
        elif key == "tail_quantile":
            settings.tail_quantile = _number(where, value, 0.5, 0.9999)
        elif key == "tail_scaled_by_median":
            if not isinstance(value, bool):
                raise BadInput(f"{where}: expected true or false")
            settings.tail_scaled_by_median = value
        elif key == "bootstrap_resamples":
            settings.bootstrap_resamples = _number(where, value, 100, 1e6, integer=True)
    if settings.marginal_score > settings.pass_score:
        raise BadInput(f"{source}: gate.marginal_score ({settings.marginal_score:g}) is above "
                       f"gate.pass_score ({settings.pass_score:g})")
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise BadInput(f"{source}: [metrics] must hold tables like [metrics.\"turns.latency_ns\"]")
    for name, table in metrics.items():
        if not isinstance(table, dict):
            raise BadInput(f"{source}: metrics.{name} must be a table")
        current = settings.for_metric(name)
        changes: dict[str, Any] = {}
        for key, value in table.items():
            where = f"{source}: metrics.\"{name}\".{key}"
            if key not in METRIC_KEYS:
                raise BadInput(f"{where}: unknown key (expected one of {', '.join(sorted(METRIC_KEYS))})")
            if key == "threshold_pct":
                changes[key] = _number(where, value, 0, 1e6)
            elif key == "direction":
                if value not in DIRECTIONS:
                    raise BadInput(f"{where}: {value!r} is not one of {', '.join(DIRECTIONS)}")
                changes[key] = value
            elif key == "no_data":
                if value not in NO_DATA_POLICIES:
                    raise BadInput(f"{where}: {value!r} is not one of {', '.join(NO_DATA_POLICIES)}")
                changes[key] = value
            elif key == "critical":
                if not isinstance(value, bool):
                    raise BadInput(f"{where}: expected true or false")
                changes[key] = value
            elif key == "min_samples":
                changes[key] = _number(where, value, 2, 1e9, integer=True)
        settings.metrics[name] = replace(current, **changes)
    return settings


def read_toml(path: Path, option: str) -> dict[str, Any]:
    """A TOML file as a mapping, or BadInput naming the option it came from."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise BadInput(f"{option} {path}: cannot read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise BadInput(f"{option} {path}: not valid TOML ({error})") from None


def load_settings(path: Path | None) -> GateSettings:
    if path is None:
        return GateSettings()
    return settings_from_mapping(read_toml(path, "--config"), source=str(path))
