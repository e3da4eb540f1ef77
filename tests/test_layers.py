"""The import direction between the top-level packages, enforced on the source (every import
statement, at module or function level):

    core     the bottom layer: imports nothing else of the project
    reports  bundle format, renderers: core only
    probes   collection and analysis: core, and the renderers of reports
    agent    CLI, runner, daemon, tuning engine, gate, rollout, chaos: anything

No exception is tolerated: code two layers need lives in the lower one (pg-log analysis in
probes/pglog, the read-only half of tuning in probes/kernel_tuning).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "reports", "probes", "agent")
ALLOWED = {
    "core": set(),
    "reports": {"core"},
    "probes": {"core", "reports"},
    "agent": {"core", "reports", "probes"},
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations(package: str) -> list[str]:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports_of(path):
            top = module.split(".")[0]
            if top not in PACKAGES or top == package or top in ALLOWED[package]:
                continue
            wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {module}")
    return wrong


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down_the_layers(package):
    assert violations(package) == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The test itself can fail: a probe importing agent/ is caught."""
    fake = tmp_path / "probes"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from agent.runner import AuditRun\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("probes") == ["probes/bad.py:2: probes imports agent.runner"]
