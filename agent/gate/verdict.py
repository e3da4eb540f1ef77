"""Judge each metric, then the whole gate.

Per metric, with the effect expressed so that positive means "worse" and t the practical
threshold (relative % of the baseline for latencies, percentage points for proportions):
  fail          the interval excludes 0 on the worse side AND the estimate is beyond t
  pass          the interval's worse end stays within t, or the metric is significantly better
  marginal      a real effect smaller than t whose interval still reaches past t
  inconclusive  too few samples, or an interval too wide to tell (half-width > t/2): the
                samples needed are reported, scaled from the current half-width (~1/sqrt(n)).
Why half-width <= t/2 is "enough": then an A/A pair passes unless its estimate lands beyond
z*t/2 (about 1% at 98%), and a true effect of 2t fails with probability ~1.

Gate: any critical metric failing fails the gate; any critical metric inconclusive makes the
gate inconclusive; otherwise the score (100 * (pass + marginal/2) / judged) against the pass and
marginal thresholds, as Kayenta scores canaries. Non-critical inconclusive metrics are reported
but left out of the score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from agent.gate.config import GateSettings, MetricSettings
from agent.gate.kpi import MetricData
from agent.gate.statistics import TestResult, proportion_test, shift_test, tail_test
from core.errors import EXIT_INCONCLUSIVE

CLASSES = ("pass", "marginal", "fail", "inconclusive", "skipped")
# Inconclusive/marginal have their own code: sharing 2 with bad input made a typo in a CI job's
# flags look like "collect more samples" (agent/cli.py documents the codes).
VERDICT_EXIT_CODES = {"pass": 0, "fail": 1, "inconclusive": EXIT_INCONCLUSIVE, "marginal": EXIT_INCONCLUSIVE}


@dataclass
class MetricVerdict:
    metric: str
    kind: str
    unit: str
    critical: bool
    threshold_pct: float
    direction: str
    classification: str
    reason: str
    test: str = ""
    estimate: float = math.nan  # in the metric's units (ratio metrics: relative)
    interval_low: float = math.nan
    interval_high: float = math.nan
    effect_pct: float = math.nan  # relative %, or percentage points for proportions
    effect_low_pct: float = math.nan
    effect_high_pct: float = math.nan
    p_value: float = math.nan
    baseline_count: int = 0
    candidate_count: int = 0
    baseline_center: float = math.nan
    candidate_center: float = math.nan
    samples_needed: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = dict(self.__dict__)
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None if math.isnan(value) else ("inf" if value > 0 else "-inf")
        data["notes"] = list(self.notes)
        return data


@dataclass
class GateVerdict:
    verdict: str
    score: float
    reason: str
    metrics: list[MetricVerdict]
    samples_needed: int = 0

    @property
    def exit_code(self) -> int:
        return VERDICT_EXIT_CODES[self.verdict]

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "score": None if math.isnan(self.score) else round(self.score, 1),
                "reason": self.reason, "samples_needed": self.samples_needed,
                "metrics": [m.as_dict() for m in self.metrics]}


def _has_data(value) -> bool:
    if value is None:
        return False
    if isinstance(value, tuple):
        return value[1] > 0
    if isinstance(value, float):
        return math.isfinite(value)
    return len(value) > 0


def _count(value) -> int:
    if value is None:
        return 0
    if isinstance(value, tuple):
        return int(value[1])
    if isinstance(value, float):
        return 1
    return len(value)


def worse_oriented(effect: float, low: float, high: float, direction: str) -> tuple[float, float, float]:
    """(estimate, low, high) turned so that positive means worse."""
    if direction == "decrease":
        return -effect, -high, -low
    return effect, low, high


SEVERITY = {"fail": 3, "inconclusive": 2, "marginal": 1, "pass": 0}


def classify(estimate: float, low: float, high: float, threshold: float, count: int,
             min_samples: int, unit: str = "%") -> tuple[str, str, int]:
    """(classification, reason, samples_needed) from a worse-oriented effect and interval."""
    low_text, high_text, estimate_text = (f"{low:.3g}{unit}", f"{high:.3g}{unit}", f"{estimate:.3g}{unit}")
    limit = f"{threshold:g}{unit}"
    if count < min_samples:
        return "inconclusive", f"{count} samples on the smaller side, need at least {min_samples}", min_samples
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive", "too few samples for an interval at this confidence", max(min_samples, 2 * count)
    if low > 0 and estimate > threshold:
        return "fail", f"worse by {estimate_text} (interval {low_text}..{high_text}) beyond the threshold {limit}", 0
    if high < 0:
        return "pass", f"better by {-estimate:.3g}{unit} (interval {low_text}..{high_text})", 0
    if high <= threshold:
        return "pass", f"within the threshold {limit}: interval {low_text}..{high_text}", 0
    if low > 0:
        return ("marginal", f"worse by {estimate_text}, below the threshold {limit} but the interval "
                            f"reaches {high_text}", 0)
    half_width = (high - low) / 2.0
    if half_width > threshold / 2.0 and threshold > 0:
        needed = math.ceil(count * (half_width / (threshold / 2.0)) ** 2)
        return ("inconclusive", f"interval {low_text}..{high_text} too wide to tell against {limit}: "
                                f"about {needed} samples per side needed", needed)
    return "marginal", f"no significant change but the interval reaches {high_text} (threshold {limit})", 0


def judge_metric(data: MetricData, settings: GateSettings) -> MetricVerdict:
    metric_settings: MetricSettings = settings.for_metric(data.name)
    min_samples = settings.min_samples_for(data.name)
    verdict = MetricVerdict(metric=data.name, kind=data.kind, unit=data.unit, critical=metric_settings.critical,
                            threshold_pct=metric_settings.threshold_pct, direction=metric_settings.direction,
                            classification="skipped", reason="", notes=list(data.notes))
    verdict.baseline_count, verdict.candidate_count = _count(data.baseline), _count(data.candidate)
    if not (_has_data(data.baseline) and _has_data(data.candidate)):
        missing = "both" if not _has_data(data.baseline) and not _has_data(data.candidate) else (
            "baseline" if not _has_data(data.baseline) else "candidate")
        policy = metric_settings.no_data
        verdict.classification = {"skip": "skipped", "inconclusive": "inconclusive", "fail": "fail"}[policy]
        verdict.reason = f"no data in {missing} (no_data = {policy})"
        if policy == "inconclusive":
            verdict.samples_needed = min_samples
        return verdict

    threshold = metric_settings.threshold_pct
    if data.kind == "ratio":
        base, cand = float(data.baseline), float(data.candidate)
        effect = 0.0 if base == cand else (math.inf if base == 0 else 100.0 * (cand / base - 1.0))
        verdict.test, verdict.estimate = "ratio of summaries (no test)", effect / 100.0
        verdict.baseline_center, verdict.candidate_center = base, cand
        verdict.effect_pct = effect
        worse = abs(effect) if metric_settings.direction == "either" else worse_oriented(
            effect, effect, effect, metric_settings.direction)[0]
        # Without samples nothing is significant, so the worst a summary can earn is marginal.
        if worse > threshold:
            verdict.classification = "marginal"
            verdict.reason = f"{effect:+.1f}% (threshold {threshold:g}%), untested summary"
        else:
            verdict.classification, verdict.reason = "pass", f"{effect:+.1f}% within {threshold:g}%, untested summary"
        return verdict

    result: TestResult
    if data.kind == "shift":
        result = shift_test(data.baseline, data.candidate, settings.confidence)
        scale = abs(result.baseline_center)
        if scale == 0 or not math.isfinite(scale):
            scale = math.nan
    elif data.kind == "tail":
        candidate = np.asarray(data.candidate, dtype=np.float64)
        scaled_note = ""
        if settings.tail_scaled_by_median:
            base_median, cand_median = float(np.median(data.baseline)), float(np.median(candidate))
            if base_median > 0 and cand_median > 0:
                # The median ratio's own uncertainty is neglected: it is several times tighter
                # than the p99's at any sample size the tail check can use.
                candidate = candidate * (base_median / cand_median)
                scaled_note = f"candidate scaled by the median ratio {base_median / cand_median:.3f} (tail shape)"
        result = tail_test(data.baseline, candidate, settings.tail_quantile, settings.confidence,
                           settings.bootstrap_resamples)
        if scaled_note:
            result.notes.append(scaled_note)
        scale = 1.0  # already relative
    elif data.kind == "proportion":
        base_events, base_trials = data.baseline
        cand_events, cand_trials = data.candidate
        result = proportion_test(base_events, base_trials, cand_events, cand_trials, settings.confidence)
        scale = 1.0  # percentage points
    else:
        raise ValueError(f"unknown metric kind {data.kind!r}")

    verdict.test = result.test
    verdict.estimate = result.estimate
    verdict.interval_low, verdict.interval_high = result.interval
    verdict.p_value = result.p_value
    verdict.baseline_center, verdict.candidate_center = result.baseline_center, result.candidate_center
    verdict.notes += result.notes
    if math.isnan(scale):
        # Zero baseline median: a relative effect is undefined; any shift counts as infinite.
        def to_pct(value):
            return 0.0 if value == 0 else math.copysign(math.inf, value)
    else:
        def to_pct(value):
            return 100.0 * value / scale
    verdict.effect_pct = to_pct(result.estimate)
    verdict.effect_low_pct, verdict.effect_high_pct = to_pct(result.interval[0]), to_pct(result.interval[1])
    count = min(verdict.baseline_count, verdict.candidate_count)
    unit = "pp" if data.kind == "proportion" else "%"
    # "either" is judged both ways and keeps the more severe outcome.
    directions = ("increase", "decrease") if metric_settings.direction == "either" else (metric_settings.direction,)
    outcomes = [classify(*worse_oriented(verdict.effect_pct, verdict.effect_low_pct, verdict.effect_high_pct,
                                         direction), threshold, count, min_samples, unit)
                for direction in directions]
    classification, reason, needed = max(outcomes, key=lambda outcome: SEVERITY[outcome[0]])
    verdict.classification = classification
    verdict.reason = reason
    verdict.samples_needed = needed
    return verdict


def judge(metrics: list[MetricData], settings: GateSettings) -> GateVerdict:
    verdicts = [judge_metric(data, settings) for data in metrics]
    critical_failures = [v for v in verdicts if v.critical and v.classification == "fail"]
    critical_open = [v for v in verdicts if v.critical and v.classification == "inconclusive"]
    judged = [v for v in verdicts if v.classification in ("pass", "marginal", "fail")]
    passes = sum(v.classification == "pass" for v in judged)
    marginals = sum(v.classification == "marginal" for v in judged)
    score = 100.0 * (passes + 0.5 * marginals) / len(judged) if judged else math.nan
    needed = max((v.samples_needed for v in verdicts if v.classification == "inconclusive"), default=0)
    if critical_failures:
        names = ", ".join(v.metric for v in critical_failures)
        return GateVerdict("fail", score, f"critical metric failed: {names}", verdicts, 0)
    if critical_open:
        names = ", ".join(v.metric for v in critical_open)
        critical_needed = max(v.samples_needed for v in critical_open)
        # A failing non-critical metric is said, not hidden behind the undecided critical one.
        failing = [v.metric for v in verdicts if v.classification == "fail"]
        also = f"; failed already: {', '.join(failing)}" if failing else ""
        return GateVerdict("inconclusive", score,
                           f"not enough samples to decide {names}: about {critical_needed} per side needed{also}",
                           verdicts, critical_needed)
    if not judged:
        return GateVerdict("inconclusive", score, "no metric could be judged (no common data)", verdicts, needed)
    if score >= settings.pass_score:
        return GateVerdict("pass", score, f"score {score:.0f} >= {settings.pass_score:g}", verdicts, 0)
    if score >= settings.marginal_score:
        return GateVerdict("marginal", score, f"score {score:.0f} between {settings.marginal_score:g} and "
                                              f"{settings.pass_score:g}", verdicts, 0)
    failed = ", ".join(v.metric for v in judged if v.classification == "fail")
    return GateVerdict("fail", score, f"score {score:.0f} < {settings.marginal_score:g} (failed: {failed})",
                       verdicts, 0)
