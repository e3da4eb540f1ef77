"""KPI samples of one group (experiment or control), from the rollout's LoadCollector.

The collector's loop is reused as is (keep-alive workers, perf_counter_ns timing); what differs
is attribution: every response of a group's URL belongs to that group (no balancer header), a
failed connection is an error sample instead of an unattributed one (a dependency that stalls
the caller past timeout_s is exactly what an experiment looks for), and "error" means a status
outside the experiment's ok_status (a paused strategy answering 503 is healthy).
The collector's `stage` carries the phase index (PHASES), so each sample is tagged by the phase
in which its request was sent.
"""

from __future__ import annotations

import numpy as np

from agent.chaos.experiment import SteadyState
from agent.rollout.collector import LoadCollector, Sample
from agent.rollout.plan import KpiSettings

PHASES = ("before", "fault", "after")
GROUPS = ("experiment", "control")


class GroupCollector(LoadCollector):
    def __init__(self, group: str, url: str, steady: SteadyState):
        settings = KpiSettings(url=url, concurrency=steady.concurrency,
                               rate_hz=steady.rate_per_s / steady.concurrency, timeout_s=steady.timeout_s)
        super().__init__(settings, group, group)
        self.group = group
        self.ok_status = frozenset(steady.ok_status)

    def set_phase(self, phase: str) -> None:
        # Requests sent after the last phase ("done") are not kept.
        self.set_stage(PHASES.index(phase) if phase in PHASES else -1)

    def record(self, served_by: str, stage: int, wall_ns: int, latency_ns: int, status: int,
               request_bytes: int, response_bytes: int) -> None:
        if stage < 0:
            return  # before the first phase: warm-up
        with self._lock:
            self.samples.append(Sample(self.group, stage, wall_ns, latency_ns, status,
                                       status not in self.ok_status, request_bytes, response_bytes))

    def record_failure(self, stage: int, wall_ns: int, latency_ns: int, request_bytes: int) -> None:
        if stage < 0:
            return
        with self._lock:
            self.samples.append(Sample(self.group, stage, wall_ns, latency_ns, 0, True, request_bytes, 0))


def phase_samples(samples: list[Sample], phase: str) -> list[Sample]:
    index = PHASES.index(phase)
    return [sample for sample in samples if sample.stage == index]


def window_stats(samples: list[Sample]) -> dict[str, float | int | None]:
    """count, errors, error_rate_pct, p50_ms, p99_ms of a set of samples (None when empty)."""
    if not samples:
        return {"count": 0, "errors": 0, "error_rate_pct": None, "p50_ms": None, "p99_ms": None}
    latencies_ms = np.array([sample.latency_ns for sample in samples], dtype=np.float64) / 1e6
    errors = sum(sample.error for sample in samples)
    return {"count": len(samples), "errors": errors, "error_rate_pct": 100.0 * errors / len(samples),
            "p50_ms": float(np.percentile(latencies_ms, 50)), "p99_ms": float(np.percentile(latencies_ms, 99))}


def trailing(samples: list[Sample], since_ns: int) -> list[Sample]:
    return [sample for sample in samples if sample.ts_ns >= since_ns]
