"""kernel: audit the running kernel against a tuning profile (`audit --profile NAME`).

Read-only: the same plan `guardian-agent tune plan` prints, one row per tuning item, plus a
finding for every item out of profile. Boot cmdline items are reported as reboot-required.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa

from core.errors import BadInput, Unavailable
from probes.base import ProbeBase, finding, findings_table, rows_to_table

SEVERITY_BY_RISK = {"high": "critical", "medium": "warning", "low": "warning"}


def kernel_rows(plan) -> list[dict]:
    return [{
        "item": item.item, "kind": item.kind, "current": item.current, "expected": item.target,
        "compliant": item.compliant, "source": item.source, "reboot_required": item.reboot_required,
        "risk": item.risk, "why": item.why, "note": item.note, "profile": plan.profile.name,
    } for item in plan.items]


def kernel_findings(plan) -> list[dict]:
    rows = []
    for item in plan.drifted:
        if item.kind == "cmdline":
            recommendation = f"add `{item.target}` to the kernel cmdline and reboot"
        elif item.kind == "topology":
            recommendation = item.note
        else:
            recommendation = f"guardian-agent tune apply --profile {plan.profile.name} --yes"
        message = f"{item.current if item.current is not None else 'absent'}, profile expects {item.target}"
        if item.why:
            message += f" ({item.why})"
        rows.append(finding("kernel", SEVERITY_BY_RISK.get(item.risk, "warning"), item.item, message,
                            recommendation))
    return rows


class KernelProbe(ProbeBase):
    name = "kernel"
    description = "Kernel settings vs a tuning profile (sysctl, THP, IRQ affinity, cmdline, topology)"
    schema: ClassVar[pa.Schema] = pa.schema([
        pa.field("item", pa.string(), nullable=False),
        pa.field("kind", pa.string()),
        pa.field("current", pa.string()),
        pa.field("expected", pa.string()),
        pa.field("compliant", pa.bool_()),  # null: not applicable on this host
        pa.field("source", pa.string()),
        pa.field("reboot_required", pa.bool_()),
        pa.field("risk", pa.string()),
        pa.field("why", pa.string()),
        pa.field("note", pa.string()),
        pa.field("profile", pa.string()),
    ])
    finish_grace_s = 10.0
    default_enabled = True

    def _load(self):
        from probes.kernel_tuning.profiles import load_profile

        profile = self.option("profile")
        if not profile:
            raise Unavailable("needs --profile NAME (a tuning profile to audit the kernel against, "
                              "e.g. trading-latency)")
        try:
            return load_profile(profile, self.option("profile_dir"),
                                dict(self.option("profile_vars") or {}), self.host)
        except BadInput as error:
            raise Unavailable(f"profile {profile}: {error}") from None

    def check(self) -> None:
        self._load()

    def collect(self, window) -> dict[str, pa.Table]:
        from probes.kernel_tuning.plan import build_plan

        plan = build_plan(self.host, self._load())
        return {"kernel": rows_to_table(kernel_rows(plan), self.schema),
                "findings": findings_table(kernel_findings(plan))}

    @staticmethod
    def headlines(tables) -> list[str]:
        table = tables.get("kernel")
        if table is None or table.num_rows == 0:
            return []
        rows = table.to_pylist()
        profile = rows[0]["profile"]
        applicable = [r for r in rows if r["compliant"] is not None]
        compliant = sum(1 for r in applicable if r["compliant"])
        reboot = sum(1 for r in applicable if not r["compliant"] and r["reboot_required"])
        line = f"kernel: profile {profile}: {compliant}/{len(applicable)} items compliant"
        if reboot:
            line += f", {reboot} need a reboot (boot cmdline)"
        if len(applicable) - compliant - reboot:
            line += f"; `guardian-agent tune plan --profile {profile}` shows the diff"
        return [line]
