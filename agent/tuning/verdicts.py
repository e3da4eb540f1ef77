"""B (tuned) vs A (current settings) for one item, judged by the gate: improves / no measurable
effect / worsens / inconclusive.

The gate (agent/gate) judges two metrics of the pooled samples of every A and every B window:
    tuning.latency_ns       Mann-Whitney U + Hodges-Lehmann shift of the median  (critical)
    tuning.latency_ns.p99   bootstrap interval of the relative p99 difference
Its classification is worse-oriented (fail = significantly worse beyond the threshold), so each
metric is also classified the other way round (gate.verdict.classify on the effect turned with
direction "decrease"), where "fail" means significantly *better* beyond the threshold. The map:

    worsens               a metric fails the worse way (the effect with the larger |%| is named)
    improves              none does, and a metric fails the better way
    inconclusive          neither, and the median metric is inconclusive either way (too few
                          samples, or an interval too wide to tell against its threshold)
    no measurable effect  otherwise: every decided interval stays inside the thresholds (the gate's
                          pass or marginal); a p99 too noisy to decide is said in the reason

Defaults: median threshold 10% (two windows of the same settings on a shared host differ by a
few %), p99 threshold 5% (a +10% p99 effect must be found: benchmarks/bench_tune_experiment.py),
98% intervals, and tail_scaled_by_median off: a setting that moves the whole distribution moves
its p99 too, and that is an effect to report, where a rollout removes it as load drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from agent.gate.config import GateSettings, MetricSettings, read_toml, settings_from_mapping
from agent.gate.kpi import MetricData
from agent.gate.verdict import GateVerdict, MetricVerdict, classify, judge, worse_oriented

SHIFT_METRIC = "tuning.latency_ns"
TAIL_METRIC = "tuning.latency_ns.p99"
VERDICTS = ("improves", "no measurable effect", "worsens", "inconclusive")


def default_settings() -> GateSettings:
    settings = GateSettings(tail_scaled_by_median=False)
    settings.metrics = {SHIFT_METRIC: MetricSettings(threshold_pct=10.0, critical=True),
                        TAIL_METRIC: MetricSettings(threshold_pct=5.0)}
    return settings


def load_settings(path) -> GateSettings:
    """The defaults above, overridden by a gate config file ([gate], [metrics."tuning.*"])."""
    if path is None:
        return default_settings()
    return settings_from_mapping(read_toml(path, "--gate-config"), source=str(path), base=default_settings())


@dataclass
class Judgement:
    verdict: str
    reason: str
    gate: GateVerdict
    better: dict[str, str] = field(default_factory=dict)  # metric -> classification the better way
    deciding: MetricVerdict | None = None  # the metric whose effect the verdict reports

    def metric(self, name: str) -> MetricVerdict | None:
        return next((m for m in self.gate.metrics if m.metric == name), None)


def _better_way(metric: MetricVerdict, settings: GateSettings) -> str:
    if metric.classification in ("skipped",) or not math.isfinite(metric.effect_pct):
        return metric.classification
    count = min(metric.baseline_count, metric.candidate_count)
    turned = worse_oriented(metric.effect_pct, metric.effect_low_pct, metric.effect_high_pct, "decrease")
    return classify(*turned, metric.threshold_pct, count, settings.min_samples_for(metric.metric))[0]


def judge_item(baseline, candidate, settings: GateSettings) -> Judgement:
    """baseline = every A sample (ns), candidate = every B sample."""
    baseline = np.asarray(baseline, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    gate = judge([MetricData(SHIFT_METRIC, "shift", "ns", baseline, candidate),
                  MetricData(TAIL_METRIC, "tail", "ns", baseline, candidate)], settings)
    better = {m.metric: _better_way(m, settings) for m in gate.metrics}
    worse_failing = [m for m in gate.metrics if m.classification == "fail"]
    better_failing = [m for m in gate.metrics if better[m.metric] == "fail"]
    shift = next(m for m in gate.metrics if m.metric == SHIFT_METRIC)
    if worse_failing:
        deciding = max(worse_failing, key=lambda m: abs(m.effect_pct))
        return Judgement("worsens", deciding.reason, gate, better, deciding)
    if better_failing:
        deciding = max(better_failing, key=lambda m: abs(m.effect_pct))
        return Judgement("improves", f"better: {_effect_text(deciding)}", gate, better, deciding)
    if "inconclusive" in (shift.classification, better[SHIFT_METRIC]):
        return Judgement("inconclusive", shift.reason, gate, better, shift)
    tail = next(m for m in gate.metrics if m.metric == TAIL_METRIC)
    reason = f"median {_effect_text(shift)}"
    if tail.classification == "inconclusive":
        reason += f"; p99 undecided ({tail.reason})"
    else:
        reason += f"; p99 {_effect_text(tail)}"
    return Judgement("no measurable effect", reason, gate, better, shift)


def _effect_text(metric: MetricVerdict) -> str:
    return (f"{signed(metric.effect_pct)}% [{signed(metric.effect_low_pct)}%, {signed(metric.effect_high_pct)}%]"
            f" (threshold {metric.threshold_pct:g}%)")


def signed(value: float) -> str:
    """-38 -> "−38", 12.5 -> "+12": the findings' style (a real minus sign)."""
    if not math.isfinite(value):
        return "n/a" if math.isnan(value) else ("+inf" if value > 0 else "−inf")
    text = f"{value:+.0f}" if abs(value) >= 10 else f"{value:+.1f}"
    return text.replace("-", "−")


def metric_word(name: str | None) -> str:
    return "p99" if name == TAIL_METRIC else "p50"
