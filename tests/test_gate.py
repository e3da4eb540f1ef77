"""The gate: per-metric classification, the verdict, settings, KPIs from bundles, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from core.errors import BadInput
from agent.gate.config import GateSettings, settings_from_mapping
from agent.gate.kpi import MetricData, bundle_metrics, histogram_samples
from agent.gate.verdict import classify, judge
from reports.bundle import Bundle, BundleWriter, ProbeRecord


def write_bundle(path, tables: dict[str, pa.Table]):
    writer = BundleWriter(path)
    for name, table in tables.items():
        writer.write_table(name, table, probe="test")
    writer.add_probe(ProbeRecord("test", "ok", tables={n: t.num_rows for n, t in tables.items()}))
    writer.finish()
    return path


def turns(latencies_ns, errors=None) -> pa.Table:
    count = len(latencies_ns)
    columns = {"flow": ["10.0.0.1:1->10.0.0.2:80"] * count, "ts": np.arange(count, dtype=np.int64),
               "latency_ns": np.asarray(latencies_ns, dtype=np.int64),
               "request_bytes": np.full(count, 100, dtype=np.int64),
               "response_bytes": np.full(count, 200, dtype=np.int64)}
    if errors is not None:
        columns["error"] = np.asarray(errors, dtype=bool)
    return pa.table(columns)


# --- classification -------------------------------------------------------------------------------

@pytest.mark.parametrize("estimate,low,high,expected", [
    (30.0, 25.0, 35.0, "fail"),          # significantly and practically worse
    (-10.0, -15.0, -5.0, "pass"),        # significantly better
    (3.0, -2.0, 8.0, "pass"),            # whole interval within the threshold
    (15.0, 8.0, 22.0, "marginal"),       # real but smaller than the threshold
    (10.0, -30.0, 50.0, "inconclusive"),  # too wide to tell
    (25.0, -1.0, 51.0, "inconclusive"),  # beyond t but not significant
])
def test_classification_rules(estimate, low, high, expected):
    classification, reason, needed = classify(estimate, low, high, 20.0, 1000, 20)
    assert classification == expected, reason
    assert (needed > 1000) == (expected == "inconclusive")


def test_too_few_samples_is_inconclusive_and_says_how_many():
    classification, reason, needed = classify(50.0, 40.0, 60.0, 20.0, 5, 20)
    assert classification == "inconclusive" and needed == 20 and "need at least 20" in reason


# --- the verdict ----------------------------------------------------------------------------------

def latency_metrics(baseline, candidate, errors=None):
    metrics = [MetricData("turns.latency_ns", "shift", "ns", baseline, candidate),
               MetricData("turns.latency_ns.p99", "tail", "ns", baseline, candidate)]
    if errors:
        metrics.append(MetricData("turns.error_rate", "proportion", "fraction", *errors))
    return metrics


def test_aa_pair_differing_15pct_at_p50_passes():
    rng = np.random.default_rng(1)
    baseline = rng.lognormal(13, 0.3, 5000)
    candidate = rng.lognormal(13, 0.3, 5000) * 1.15  # run-to-run drift of the same build
    verdict = judge(latency_metrics(baseline, candidate, ((2, 5000), (3, 5000))), GateSettings())
    assert verdict.verdict == "pass", verdict.as_dict()
    assert verdict.exit_code == 0


def test_critical_latency_regression_fails_whatever_the_score():
    rng = np.random.default_rng(2)
    baseline = rng.lognormal(13, 0.3, 2000)
    verdict = judge(latency_metrics(baseline, rng.lognormal(13, 0.3, 2000) * 1.5, ((0, 2000), (0, 2000))),
                    GateSettings())
    assert verdict.verdict == "fail" and verdict.exit_code == 1
    assert "turns.latency_ns" in verdict.reason


def test_direction_only_worse_fails():
    rng = np.random.default_rng(3)
    baseline = rng.lognormal(13, 0.3, 2000)
    verdict = judge(latency_metrics(baseline, rng.lognormal(13, 0.3, 2000) * 0.5), GateSettings())
    latency = verdict.metrics[0]
    assert latency.classification == "pass" and latency.effect_pct < -40


def test_error_rate_increase_fails_the_gate():
    rng = np.random.default_rng(4)
    baseline = rng.lognormal(13, 0.3, 3000)
    verdict = judge(latency_metrics(baseline, rng.lognormal(13, 0.3, 3000), ((3, 3000), (60, 3000))),
                    GateSettings())
    assert verdict.verdict == "fail"
    assert [m.classification for m in verdict.metrics if m.metric == "turns.error_rate"] == ["fail"]


def test_tiny_samples_make_the_gate_inconclusive_with_samples_needed():
    verdict = judge(latency_metrics([1e6, 1.1e6, 0.9e6], [1e6, 1.2e6]), GateSettings())
    assert verdict.verdict == "inconclusive" and verdict.exit_code == 4
    assert verdict.samples_needed >= 20 and "per side needed" in verdict.reason


def test_no_data_policy():
    settings = settings_from_mapping({"metrics": {"turns.latency_ns": {"no_data": "fail", "critical": True}}})
    verdict = judge([MetricData("turns.latency_ns", "shift", "ns", np.ones(50), None)], settings)
    assert verdict.verdict == "fail" and "no data in candidate" in verdict.metrics[0].reason
    skipped = judge([MetricData("turns.latency_ns", "shift", "ns", None, None)], GateSettings())
    assert skipped.metrics[0].classification == "skipped" and skipped.verdict == "inconclusive"


def test_score_marginal_band():
    rng = np.random.default_rng(6)
    base = rng.lognormal(0, 0.2, 3000)
    metrics = [MetricData(f"host.m{i}", "shift", "x", base, rng.lognormal(0, 0.2, 3000)) for i in range(3)]
    metrics.append(MetricData("host.bad", "shift", "x", base, rng.lognormal(0, 0.2, 3000) * 2))
    settings = settings_from_mapping({"gate": {"pass_score": 90, "marginal_score": 70}})
    verdict = judge(metrics, settings)
    assert verdict.score == pytest.approx(75.0) and verdict.verdict == "marginal"


# --- settings -------------------------------------------------------------------------------------

def test_settings_name_the_bad_key():
    with pytest.raises(BadInput, match=r"metrics\.\"turns.latency_ns\"\.threshold: unknown key"):
        settings_from_mapping({"metrics": {"turns.latency_ns": {"threshold": 5}}})
    with pytest.raises(BadInput, match="gate.confidence"):
        settings_from_mapping({"gate": {"confidence": 2}})
    with pytest.raises(BadInput, match="direction"):
        settings_from_mapping({"metrics": {"x": {"direction": "up"}}})


def test_metric_settings_most_specific_glob_wins():
    settings = settings_from_mapping({"metrics": {"syscalls.read.*": {"threshold_pct": 3}}})
    assert settings.for_metric("syscalls.read.latency_ns").threshold_pct == 3
    assert settings.for_metric("syscalls.write.latency_ns").threshold_pct == 25
    assert settings.for_metric("host.mem_available_bytes").direction == "decrease"


# --- KPIs from bundles ----------------------------------------------------------------------------

def test_kpis_from_every_table(tmp_path):
    syscalls = pa.table({"pid": [1, 2], "comm": ["a", "b"], "syscall": ["read", "read"],
                         "count": [10, 5], "total_ns": [1, 1], "max_ns": [1, 1]})
    buckets = pa.table({"pid": [1, 1, 2], "syscall": ["read", "read", "read"],
                        "bucket_lo_ns": [1024, 2048, 1024], "bucket_hi_ns": [2048, 4096, 2048],
                        "bucket_count": [6, 4, 5]})
    pg = pa.table({"fingerprint": ["abc"], "query": ["select $1"], "calls": [10], "total_ms": [5.0],
                   "p50_ms": [0.4], "p99_ms": [1.0], "p999_ms": [2.0], "max_ms": [3.0]})
    host = pa.table({"ts": [1, 1, 2, 2], "cpu": [-1, 0, -1, 0], "user_pct": [10.0, 1, 12.0, 1],
                     "system_pct": [5.0, 1, 6.0, 1], "mem_available_bytes": [100, 0, 90, 0]})
    tcp = pa.table({"pid": [1, 2], "retransmits": [0, 3]})
    tables = {"turns": turns([1000, 2000, 3000], [False, True, False]), "syscalls": syscalls,
              "syscall_buckets": buckets, "pg_queries": pg, "host": host, "tcp": tcp}
    base = Bundle(write_bundle(tmp_path / "a", tables))
    cand = Bundle(write_bundle(tmp_path / "b", tables))
    metrics = {m.name: m for m in bundle_metrics(base, cand)}
    assert {"turns.latency_ns", "turns.latency_ns.p99", "turns.error_rate", "syscalls.read.latency_ns",
            "pg_queries.abc.p99_ms", "host.cpu_busy_pct", "host.mem_available_bytes",
            "tcp.retransmits_rate"} <= set(metrics)
    assert metrics["turns.error_rate"].baseline == (1, 3)
    np.testing.assert_array_equal(np.sort(metrics["syscalls.read.latency_ns"].baseline),
                                  [1024.0] * 11 + [2048.0] * 4)
    np.testing.assert_array_equal(metrics["host.cpu_busy_pct"].baseline, [15.0, 18.0])
    assert metrics["tcp.retransmits_rate"].baseline == (1, 2)


def test_histogram_expansion_is_capped():
    samples = histogram_samples(np.array([1.0, 2.0]), np.array([10**7, 10**7]))
    assert samples.size == 50_000 and (samples == 1.0).sum() == 25_000


# --- CLI ------------------------------------------------------------------------------------------

@pytest.fixture
def bundles(tmp_path):
    rng = np.random.default_rng(8)
    base = rng.lognormal(13, 0.3, 3000)
    return {
        "base": write_bundle(tmp_path / "base", {"turns": turns(base, rng.random(3000) < 0.001)}),
        "same": write_bundle(tmp_path / "same", {"turns": turns(rng.lognormal(13, 0.3, 3000),
                                                                rng.random(3000) < 0.001)}),
        "slow": write_bundle(tmp_path / "slow", {"turns": turns(rng.lognormal(13, 0.3, 3000) * 1.6,
                                                                rng.random(3000) < 0.001)}),
        "tiny": write_bundle(tmp_path / "tiny", {"turns": turns(base[:5])}),
    }


def test_cli_exit_codes_json_and_decision_record(bundles, tmp_path, agent_cli):
    record = tmp_path / "record"
    passed = agent_cli("gate", "--baseline", str(bundles["base"]), "--candidate", str(bundles["same"]),
                       "--record", str(record), "--json")
    assert passed.returncode == 0, passed.stderr
    payload = json.loads(passed.stdout)
    assert payload["verdict"] == "pass"
    latency = next(m for m in payload["metrics"] if m["metric"] == "turns.latency_ns")
    assert {"test", "estimate", "interval_low", "interval_high", "effect_pct", "classification", "reason"} <= set(latency)

    failed = agent_cli("gate", "--baseline", str(bundles["base"]), "--candidate", str(bundles["slow"]),
                       "--record", str(record))
    assert failed.returncode == 1 and "FAIL" in failed.stdout

    undecided = agent_cli("gate", "--baseline", str(bundles["base"]), "--candidate", str(bundles["tiny"]),
                          "--record", str(record), "--json")
    assert undecided.returncode == 4
    assert json.loads(undecided.stdout)["samples_needed"] >= 20

    decisions = ds.dataset(record, format="parquet").to_table()
    assert sorted(set(decisions.column("verdict").to_pylist())) == ["fail", "inconclusive", "pass"]
    assert len(set(decisions.column("decision_id").to_pylist())) == 3
    settings = json.loads(decisions.column("settings_json")[0].as_py())
    assert settings["confidence"] == 0.98


def test_cli_bad_input_is_one_line(bundles, tmp_path, agent_cli):
    missing = agent_cli("gate", "--baseline", str(tmp_path / "nope"), "--candidate", str(bundles["same"]),
                        "--no-record")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not a bundle" in missing.stderr
    config = tmp_path / "gate.toml"
    config.write_text('[metrics."turns.latency_ns"]\nthreshold = 5\n')
    bad = agent_cli("gate", "--baseline", str(bundles["base"]), "--candidate", str(bundles["same"]),
                    "--config", str(config), "--no-record")
    assert bad.returncode == 2 and "threshold: unknown key" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_rollout_mode_needs_a_rollout_report(bundles, agent_cli):
    both = agent_cli("gate", "--rollout", str(bundles["base"]), "--baseline", str(bundles["base"]), "--no-record")
    assert both.returncode == 2 and "--rollout replaces" in both.stderr
    neither = agent_cli("gate", "--no-record")
    assert neither.returncode == 2 and "--baseline" in neither.stderr
    plain = agent_cli("gate", "--rollout", str(bundles["base"]), "--no-record")
    assert plain.returncode == 2 and "not a rollout report" in plain.stderr
