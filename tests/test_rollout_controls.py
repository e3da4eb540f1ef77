"""pause / resume / promote / undo / retry end to end, with the prepare, promote, undo and
decommission hooks run by a real `ansible-playbook` (local connection), against a real HAProxy
and the users' own traffic counting every error."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_rollout_live import ClientLoad, journal_events, lb  # noqa: F401 - lb is the fixture
from tests.test_rollout_outages import finish, start_driver, wait_until

ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
CONTROL_GATE = """\
[gate]
min_samples = 20
[metrics."turns.latency_ns"]
threshold_pct = 50
[metrics."turns.latency_ns.p99"]
threshold_pct = 300
[metrics."turns.error_rate"]
threshold_pct = 5
"""


def playbooks(directory: Path, config: Path) -> dict[str, str]:
    """prepare (deploy green), promote (green becomes blue in HAProxy's own config), undo (back),
    decommission (retire the old blue): what a user's IaC does, as ansible-playbook commands."""
    def weights(blue: int, green: int) -> str:
        return textwrap.dedent(f"""\
            - ansible.builtin.replace:
                path: "{config}"
                regexp: '^(\\s*server blue \\S+) weight \\d+'
                replace: '\\1 weight {blue}'
            - ansible.builtin.replace:
                path: "{config}"
                regexp: '^(\\s*server green \\S+) weight \\d+'
                replace: '\\1 weight {green}'
            """)
    tasks = {
        "prepare": f'- ansible.builtin.lineinfile:\n    path: "{directory}/deployed.log"\n    line: "green '
                   '{{ lookup(\'env\', \'GUARDIAN_RUN_ID\') }}"\n    create: true\n',
        "promote": weights(0, 100),
        "undo": weights(100, 0),
        "decommission": f'- ansible.builtin.copy:\n    dest: "{directory}/decommissioned"\n    content: '
                        '"{{ lookup(\'env\', \'GUARDIAN_BLUE_SERVER\') }}\\n"\n',
    }
    commands = {}
    for name, body in tasks.items():
        book = directory / f"{name}.yml"
        book.write_text("- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
                        + textwrap.indent(body, "    "))
        # The venv's interpreter: interpreter discovery may land on a pyenv shim that cannot run.
        commands[name] = (f"{ANSIBLE_PLAYBOOK} -i localhost, -c local -e ansible_python_interpreter={sys.executable} "
                          f"{book}")
    return commands


def event_seen(lb, event: str, count: int = 1):
    journal = lb.dir / "state" / "test-green.journal.jsonl"
    return lambda: journal.exists() and sum(e["event"] == event for e in journal_events(lb)) >= count


@pytest.mark.live
def test_pause_resume_promote_undo_retry_with_ansible_hooks(lb, agent_cli):
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.skip(f"LIVE TEST SKIPPED: {ANSIBLE_PLAYBOOK} missing (pip install ansible-core)")
    lb.start()
    config = lb.dir / "haproxy.cfg"
    books = playbooks(lb.dir, config)
    hooks = (f'[promote]\ncommands = ["{books["promote"]}"]\n[undo]\ncommands = ["{books["undo"]}"]\n'
             f'[decommission]\ncommands = ["{books["decommission"]}"]\ngrace_s = GRACE\n'
             f'[notify]\ncommand = "cat >> {lb.dir}/notified.jsonl"\n')
    stages = [(10, 1, 60), (100, 1.5, 60)]
    # crossover_s = 0: the 100% stage is judged against the baseline window. This test is about
    # the controls and the hooks; the crossover is proven by the identical-green and reload tests.
    plan = lb.plan(stages, prepare=books["prepare"], extra="crossover_s = 0", gate=CONTROL_GATE,
                   tables=hooks.replace("GRACE", "60"))
    journal = lb.dir / "state" / "test-green.journal.jsonl"
    with ClientLoad(lb.frontend) as users:
        driver = start_driver(plan)
        wait_until(lambda: driver.poll() is not None or event_seen(lb, "hook_started")(), 30, "the prepare playbook")
        assert driver.poll() is None, driver.communicate()
        # Sent while the prepare playbook runs: the driver reads it at its first poll (in the
        # baseline window), so the 10% stage is paused from its start.
        assert agent_cli("rollout", "pause", "--plan", str(plan), "--reason", "look first").returncode == 0
        wait_until(lambda: lb.weight("green") == 10, 30, "the 10% stage")
        time.sleep(2.5)  # past dwell_s: a paused stage does not advance
        assert lb.weight("green") == 10 and event_seen(lb, "paused")()
        assert agent_cli("rollout", "resume", "--plan", str(plan)).returncode == 0
        promoted = agent_cli("rollout", "promote", "--plan", str(plan), "--reason", "hotfix, approved by SRE")
        assert promoted.returncode == 0, promoted.stderr
        wait_until(event_seen(lb, "decommission_pending"), 60, "the promotion and its promote playbook")
        assert lb.weight("green") == 100 and lb.weight("blue") == 0
        assert "server green" in config.read_text() and " weight 100 " in config.read_text().split("server green")[1]
        undone = agent_cli("rollout", "undo", "--journal", str(journal), "--reason", "customers complain")
        assert undone.returncode == 0, undone.stderr + undone.stdout
        code, out, err = finish(driver, 60)
        assert code == 1 and "undone" in out, err + out
        assert lb.weight("blue") == 100 and lb.weight("green") == 0
        assert " weight 100 " in config.read_text().split("server blue")[1].split("\n")[0]
        assert not (lb.dir / "decommissioned").exists()
        events = journal_events(lb)
        manual = [e for e in events if e["event"] == "decision" and e["verdict"] == "manual"]
        assert manual and "hotfix, approved by SRE" in manual[0]["reason"]

        # retry: the stages again (green is deployed: prepare is skipped), then a real promotion
        # whose decommission runs after a short grace period.
        plan.write_text(plan.read_text().replace("grace_s = 60", "grace_s = 0.5"))
        retried = agent_cli("rollout", "retry", "--plan", str(plan), timeout=90)
        assert retried.returncode == 0, retried.stderr + retried.stdout
    assert users.errors == 0, users.__dict__
    assert users.served.get("green", 0) > 0
    assert len((lb.dir / "deployed.log").read_text().splitlines()) == 1
    assert (lb.dir / "decommissioned").read_text().strip() == "blue"
    events = journal_events(lb)
    assert [e["event"] for e in events][-2:] == ["decommissioned", "roles"]
    assert events[-1]["blue"] == "green" and events[-1]["green"] == "blue"
    assert [e for e in events if e["event"] == "start"][-1]["retry_of"]
    notified = [json.loads(line) for line in (lb.dir / "notified.jsonl").read_text().splitlines() if line.strip()]
    assert {"paused", "resumed", "decision", "promoted", "decommissioned"} <= {n["event"] for n in notified}

    # green is the new blue in HAProxy's own config: a restart keeps it serving.
    lb.restart_haproxy()
    assert set(lb.served_by(50)) == {"green"}
    check = agent_cli("rollout", "--plan", str(plan), "--check")
    assert check.returncode == 0 and "blue green UP weight 100" in check.stdout, check.stdout + check.stderr
