"""A finished bundle made outside an audit window (a chaos run, a tuning experiment) joins the
fleet dataset through the same spool as `collect`'s windows: one path into the dataset."""

from __future__ import annotations

import shutil
from pathlib import Path


def publish(bundle_dir: Path, run_id: str, config) -> str:
    """Copy the bundle into the fleet spool and stage it: the run joins the dataset (`chaos_runs`,
    `tuning_impact` and the other tables) the next time `collect`/the daemon drains the spool, or right now when
    the store is reachable. Returns where it went."""
    from agent.fleet.collect import make_spool, make_store

    spool = make_spool(config)
    target = spool.bundle_dir(run_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle_dir, target)
    spool.stage(run_id)
    spool.enforce_cap(run_id)
    try:
        report = spool.drain(make_store(config))
    except Exception as error:  # noqa: BLE001 - the spool keeps it; the daemon or collect retries
        return f"spooled in {spool.path} (store unreachable: {error})"
    if run_id in report.published_runs:
        return f"published to {config.dataset.root}"
    return f"spooled in {spool.path} ({report.error or 'store busy'}: the daemon or collect uploads it)"
