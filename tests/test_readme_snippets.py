"""Every snippet in README.md and docs/*.md works as written.

- ```python blocks run in the venv, in a directory holding what they read: `guardian-reports/RUN`
  is a real audit bundle (host, syscalls, kernel) and the dataset roots the snippets name
  (/var/lib/guardian-agent/dataset, /srv/fleet) are replaced by a real dataset made with
  `collect` (those paths are not written on this machine). matplotlib draws off-screen.
- ```toml blocks parse.
- every `guardian-agent ...` line of ```sh / ```console blocks parses against the real command
  line (command, subcommand, options and their values), without running: bracketed `[...]`
  parts are usage notation and left out, `\\` continuations are joined.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
DOCUMENTS = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
DATASET_ROOTS = ("/var/lib/guardian-agent/dataset", "/srv/fleet")


def blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            if match.group(1) == language:
                line = text[: match.start()].count("\n") + 1
                found.append((f"{document.relative_to(PROJECT)}:{line}", match.group(2)))
    return found


def test_every_document_has_been_read():
    assert blocks("python") and blocks("sh") and blocks("toml")


@pytest.fixture(scope="module")
def snippet_dir(tmp_path_factory):
    """A working directory with guardian-reports/RUN (a real audit) and a real fleet dataset."""
    if os.geteuid() != 0:
        pytest.skip("LIVE TEST SKIPPED: the snippets read real eBPF bundles; run as root")
    from agent.fleet.collect import collect_once
    from probes import REGISTRY
    from tests.conftest import run_agent, syscall_load
    from tests.test_fleet import make_config

    work = tmp_path_factory.mktemp("snippets")
    # The syscalls probe leaves out the agent's own calls and a CI machine may run nothing else:
    # bring a load so the snippets have syscall rows to read.
    with syscall_load():
        audit = run_agent("audit", "--duration", "1", "--probes", "host,syscalls,kernel", "--profile",
                          "trading-latency", "--out", str(work / "guardian-reports" / "RUN"), timeout=180)
        assert audit.returncode == 0, audit.stderr
        config = make_config(work / "dataset", probes=("host", "syscalls"))
        outcome = collect_once(config, REGISTRY, duration_s=1.0)
    assert outcome.drain is not None and not outcome.drain.error
    statuses = {o.name: (o.status, o.reason) for o in outcome.result.outcomes}
    assert all(status in ("ok", "partial") for status, _ in statuses.values()), statuses
    assert list((work / "dataset").glob("table=syscall_buckets/**/*.parquet")), statuses
    return work


@pytest.mark.live
@pytest.mark.parametrize("where,code", blocks("python"), ids=[where for where, _ in blocks("python")])
def test_python_snippet_runs(snippet_dir, where, code):
    for root in DATASET_ROOTS:
        code = code.replace(root, str(snippet_dir / "dataset"))
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(PROJECT))
    result = subprocess.run([sys.executable, "-c", code], cwd=snippet_dir, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, f"{where}:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("where,code", blocks("toml"), ids=[where for where, _ in blocks("toml")])
def test_toml_snippet_parses(where, code):
    tomllib.loads(code)


def command_lines() -> list[tuple[str, str]]:
    lines = []
    for language in ("sh", "console", ""):
        for where, code in blocks(language):
            joined = re.sub(r"\\\n\s*", " ", code)
            for line in joined.splitlines():
                line = line.strip().removeprefix("$ ")
                if not line.startswith("guardian-agent ") or line.split()[1].endswith(":"):
                    continue  # not a command (output such as "guardian-agent: error ...")
                line = re.sub(r"\s+#.*$", "", line)
                line = re.sub(r"\[[^\[\]]*\]", "", line)  # usage notation: [--json], [--var K=V ...]
                lines.append((where, line))
    return lines


def unparsed(context) -> list[str]:
    # click 8.2 deprecates protected_args (the subcommand and what follows it) in favour of args.
    protected = getattr(context, "_protected_args", None)
    return (context.protected_args if protected is None else protected) + context.args


def parse_only(arguments: list[str]) -> None:
    """Resolve the command path and parse every option with click, invoking nothing."""
    from agent.cli import cli

    context = cli.make_context("guardian-agent", list(arguments))
    command, remaining = cli, unparsed(context)
    while remaining and hasattr(command, "resolve_command"):
        name, command, remaining = command.resolve_command(context, remaining)
        context = command.make_context(name, remaining, parent=context)
        remaining = unparsed(context) if hasattr(command, "resolve_command") else []


@pytest.mark.parametrize("where,line", command_lines(), ids=[f"{w} {l[:60]}" for w, l in command_lines()])
def test_command_line_snippet_parses(where, line):
    parse_only(shlex.split(line)[1:])
