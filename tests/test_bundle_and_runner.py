"""Bundle format (round trip, atomicity, manifest last) and the runner's isolation of probes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import BadInput, Unavailable
from agent.runner import AuditRun, select_probes
from probes.base import FINDINGS_SCHEMA, ProbeBase, ProbeConfig, finding, findings_table
from reports.bundle import BUNDLE_FORMAT, MANIFEST_NAME, Bundle, BundleWriter, validate_out_dir, write_parquet_atomic

NUMBERS = pa.schema([pa.field("value_ns", pa.int64())])


class GoodProbe(ProbeBase):
    name: ClassVar[str] = "good"
    schema: ClassVar[pa.Schema] = NUMBERS

    def collect(self, window):
        window.wait()
        return {"good": pa.table({"value_ns": [1, 2, 3]}, schema=NUMBERS),
                "findings": findings_table([finding("good", "info", "x", "fine", ""),
                                            finding("good", "critical", "y", "bad", "fix it")])}


class RaisingProbe(ProbeBase):
    name: ClassVar[str] = "raising"

    def collect(self, window):
        raise RuntimeError("the device caught fire")


class HangingProbe(ProbeBase):
    name: ClassVar[str] = "hanging"
    finish_grace_s: ClassVar[float] = 0.5

    def collect(self, window):
        threading.Event().wait(60)  # ignores the window entirely
        return {}


class MissingProbe(ProbeBase):
    name: ClassVar[str] = "missing"

    def check(self):
        raise Unavailable("needs a flux capacitor: install flux-capacitor")


class WarningProbe(ProbeBase):
    name: ClassVar[str] = "warner"

    def collect(self, window):
        return {"findings": findings_table([finding("warner", "warning", "z", "hmm", "look")])}


def run(tmp_path, probes, duration=0.3, stop_after=None):
    writer = BundleWriter(tmp_path / "bundle", run_id="test-run")
    audit = AuditRun(probes, ProbeConfig(), writer, duration)
    if stop_after is not None:
        threading.Timer(stop_after, audit.stop).start()
    return audit.run(), writer.out_dir


def test_round_trip_schemas_manifest_and_metadata(tmp_path):
    result, out = run(tmp_path, [GoodProbe, WarningProbe])
    bundle = Bundle(out)
    manifest = bundle.manifest
    assert manifest["format"] == BUNDLE_FORMAT == 2 and manifest["run_id"] == "test-run"
    assert {"hostname", "kernel", "cpu_model", "cores", "isolated_cpus", "cmdline"} <= set(manifest["host"])
    assert [p["name"] for p in manifest["probes"]] == ["good", "warner"]
    good = bundle.probe("good")
    assert good["status"] == "ok" and good["tables"] == {"good": 3, "findings": 2}
    assert bundle.table("good").schema.equals(NUMBERS)
    metadata = pq.read_schema(out / "good.parquet").metadata
    assert metadata[b"run_id"] == b"test-run" and metadata[b"probe"] == b"good"
    assert pq.ParquetFile(out / "good.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    findings = bundle.table("findings")
    assert findings.schema.equals(FINDINGS_SCHEMA)
    # Most severe first across probes.
    assert findings.column("severity").to_pylist() == ["critical", "warning", "info"]
    assert not list(out.glob(".*tmp*"))


def test_failing_and_hanging_probes_do_not_stop_the_others(tmp_path):
    started = time.monotonic()
    result, out = run(tmp_path, [RaisingProbe, GoodProbe, HangingProbe, MissingProbe])
    assert time.monotonic() - started < 10
    statuses = {p["name"]: p for p in Bundle(out).manifest["probes"]}
    assert statuses["good"]["status"] == "ok"
    assert statuses["raising"]["status"] == "failed" and "device caught fire" in statuses["raising"]["reason"]
    assert statuses["hanging"]["status"] == "failed" and "timed out" in statuses["hanging"]["reason"]
    assert statuses["missing"]["status"] == "unavailable"
    assert statuses["missing"]["reason"] == "needs a flux capacitor: install flux-capacitor"


def test_stop_ends_window_early_and_marks_interrupted(tmp_path):
    started = time.monotonic()
    result, out = run(tmp_path, [GoodProbe], duration=30, stop_after=0.3)
    assert time.monotonic() - started < 10
    manifest = Bundle(out).manifest
    assert manifest["interrupted"] is True
    assert manifest["probes"][0]["status"] == "interrupted"
    assert Bundle(out).table("good").num_rows == 3  # what was collected is kept


def test_out_dir_rules(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(BadInput, match="not empty"):
        validate_out_dir(tmp_path / "full")
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match="not a directory"):
        validate_out_dir(tmp_path / "file")
    assert validate_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # validation writes nothing


def test_incomplete_bundle_is_refused(tmp_path):
    (tmp_path / "b").mkdir()
    write_parquet_atomic(pa.table({"a": [1]}), tmp_path / "b" / "t.parquet")
    with pytest.raises(BadInput, match="incomplete bundle"):
        Bundle(tmp_path / "b")
    (tmp_path / "b" / MANIFEST_NAME).write_text(json.dumps({"format": 99}))
    with pytest.raises(BadInput, match="unsupported bundle format"):
        Bundle(tmp_path / "b")


def test_select_probes():
    registry = (GoodProbe, RaisingProbe)
    assert select_probes(None, registry) == [GoodProbe, RaisingProbe]
    assert select_probes(["raising"], registry) == [RaisingProbe]
    with pytest.raises(BadInput, match="unknown probe nope"):
        select_probes(["nope"], registry)
