"""compact: a many-host dataset built from real `collect` output keeps every row and every answer,
readers never see doubles, and a compaction SIGKILLed mid-way loses nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from agent.fleet.collect import collect_once
from agent.fleet.compact import compact
from agent.fleet.query import run_query
from core.errors import BadInput
from tests.conftest import PROJECT_ROOT
from tests.test_fleet import REGISTRY, make_config

HOSTS = ("alpha", "bravo", "charlie")
DAYS = ("2026-10-01", "2026-10-02")
QUESTIONS = (
    "SELECT host, CAST(date AS VARCHAR) AS d, count(*) AS n, count(DISTINCT run_id) AS runs, "
    "sum(runnable) AS runnable FROM loadavg GROUP BY ALL ORDER BY ALL",
    "SELECT host, probe, status, count(*) FROM runs GROUP BY ALL ORDER BY ALL",
)


def many_host_dataset(tmp_path: Path, runs_per_partition: int = 3) -> Path:
    """Real collect runs, each laid out again under other host and date partitions (as the
    same agent on other hosts would have written them), with the run id made unique per copy."""
    seed = tmp_path / "seed"
    for _ in range(runs_per_partition):
        collect_once(make_config(seed), REGISTRY, duration_s=0.2)
    root = tmp_path / "dataset"
    for source in seed.glob("table=*/date=*/host=*/*.parquet"):
        table = source.parts[-4]
        for day in DAYS:
            for host in HOSTS:
                target = root / table / f"date={day}" / f"host={host}"
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target / f"{host}-{day}-{source.name}")
    return root


def answers(root: Path) -> list:
    return [run_query(str(root), question)[1] for question in QUESTIONS]


def parquet_files(root: Path) -> list[Path]:
    return list(root.glob("table=*/date=*/host=*/*.parquet"))


def test_compact_keeps_every_row_and_answer_with_one_file_per_partition(tmp_path):
    root = many_host_dataset(tmp_path)
    before = answers(root)
    files_before = len(parquet_files(root))
    report = compact(str(root), older_than_days=1, today=date(2026, 12, 1))
    assert report.partitions == 2 * len(HOSTS) * len(DAYS)  # loadavg and runs
    assert report.files_before == files_before
    assert len(parquet_files(root)) == report.partitions
    assert answers(root) == before
    # A second pass has nothing to do; a new run arriving later is picked up by the next one.
    assert compact(str(root), today=date(2026, 12, 1)).partitions == 0
    new_run = next(parquet_files(root)[0].parent.iterdir())
    shutil.copyfile(new_run, new_run.parent / "late-run.parquet")
    assert compact(str(root), today=date(2026, 12, 1)).partitions == 1


def test_compact_skips_recent_partitions_and_refuses_s3(tmp_path):
    root = many_host_dataset(tmp_path, runs_per_partition=2)
    assert compact(str(root), older_than_days=1, today=date(2026, 10, 2)).partitions == 2 * len(HOSTS)
    with pytest.raises(BadInput, match="S3 has no atomic multi-object swap.*--catalog"):
        compact("s3://bucket/fleet")
    with pytest.raises(BadInput, match="no such directory"):
        compact(str(tmp_path / "absent"))


@pytest.mark.parametrize("point", ["before-swap", "after-swap"])
def test_compaction_killed_mid_way_loses_nothing_and_doubles_nothing(tmp_path, point):
    root = many_host_dataset(tmp_path)
    before = answers(root)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), GUARDIAN_AGENT_KILL_AT=f"compact:{point}")
    killed = subprocess.run([sys.executable, "-m", "agent.cli", "compact", "--dataset", str(root),
                             "--older-than", "0"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert answers(root) == before  # what a reader sees right after the crash
    env.pop("GUARDIAN_AGENT_KILL_AT")
    finished = subprocess.run([sys.executable, "-m", "agent.cli", "compact", "--dataset", str(root),
                               "--older-than", "0"], env=env, cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "half done" in finished.stderr
    assert answers(root) == before
    assert len(parquet_files(root)) == 2 * len(HOSTS) * len(DAYS)
    leftovers = [p for p in (root / "_compacted").rglob("*") if p.name.startswith(".swap-")]
    assert leftovers == []
