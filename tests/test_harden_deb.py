"""The .deb does no harm: a unit the admin disabled stays disabled across a reinstall, and the
package refuses to go while a tuning journal is pending (the journal survives a forced purge)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_deb import built_deb, installed_version, run  # noqa: F401 - shared session fixture

SERVICE_LINK = Path("/etc/systemd/system/multi-user.target.wants/guardian-agent.service")
TIMER_LINK = Path("/etc/systemd/system/timers.target.wants/guardian-agent-collect.timer")
JOURNAL = Path("/var/lib/guardian-agent/journal/journal.jsonl")


@pytest.mark.live
def test_disabled_unit_stays_disabled_and_pending_journal_blocks_removal(built_deb):  # noqa: F811
    if JOURNAL.exists():
        pytest.skip(f"LIVE TEST SKIPPED: {JOURNAL} exists on this host (a real pending journal); not touching it")
    made_journal_dir = not JOURNAL.parent.exists()
    try:
        run("dpkg", "-i", str(built_deb), timeout=180)
        assert SERVICE_LINK.is_symlink() and TIMER_LINK.is_symlink(), "a first install enables the units"

        # The admin disables the daemon; an upgrade/reinstall must not turn it back on.
        run("systemctl", "disable", "guardian-agent.service", check=False)
        if SERVICE_LINK.is_symlink():  # systemctl without a running systemd may decline: do as it does
            SERVICE_LINK.unlink()
        run("dpkg", "-i", str(built_deb), timeout=180)
        assert not SERVICE_LINK.exists(), "reinstall re-enabled a unit the admin disabled"
        assert TIMER_LINK.is_symlink(), "the timer the admin left alone stays enabled"

        # A pending journal: removal is refused, the package stays usable for `tune rollback`.
        JOURNAL.parent.mkdir(parents=True, exist_ok=True)
        JOURNAL.write_text('{"type": "begin", "journal_id": "harden-test"}\n')
        refused = run("dpkg", "-r", "guardian-agent", timeout=120, check=False)
        assert refused.returncode != 0
        assert "tuning journal is pending" in refused.stderr and "tune rollback" in refused.stderr
        # dpkg marks it "deinstall ok installed": the wish to remove is noted, the files stay.
        status = run("dpkg-query", "-W", "-f=${Status}", "guardian-agent").stdout
        assert status.endswith("ok installed"), status
        assert run("/usr/bin/guardian-agent", "--version").returncode == 0

        # Forced, the purge goes through, keeps the journal and says so.
        purged = run("dpkg", "-P", "guardian-agent", timeout=120, check=False,
                     env={"GUARDIAN_AGENT_ALLOW_REMOVE": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert purged.returncode == 0, purged.stderr
        assert installed_version() is None
        assert JOURNAL.read_text().startswith('{"type": "begin"'), "purge deleted the pending journal"
        assert "WARNING: kept" in purged.stderr
        assert not Path("/etc/guardian-agent").exists()
        assert not SERVICE_LINK.exists() and not TIMER_LINK.exists(), "purge leaves no enable links"
    finally:
        JOURNAL.unlink(missing_ok=True)
        if made_journal_dir and JOURNAL.parent.exists() and not any(JOURNAL.parent.iterdir()):
            JOURNAL.parent.rmdir()
        if run("dpkg-query", "-W", "guardian-agent", check=False).returncode == 0 \
                or Path("/etc/guardian-agent").exists():
            run("dpkg", "-P", "guardian-agent", timeout=120, check=False,
                env={"GUARDIAN_AGENT_ALLOW_REMOVE": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
