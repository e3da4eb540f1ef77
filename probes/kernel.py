"""kernel: audit the running kernel against a tuning profile (`audit --profile NAME`).

Read-only: the same plan `guardian-agent tune plan` prints, one row per tuning item, plus a
finding for every item out of profile. Boot cmdline items are reported as reboot-required.
Each row also carries the last effect `tune experiment` measured for that item on this host
(the impact ledger, reports/tuning_impact.py): a profile says what to set, the ledger says
whether it helped here; an applied item measured to worsen latency gets a finding of its own.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa

from core.errors import BadInput, Unavailable, WorkFailed
from probes.base import ProbeBase, finding, findings_table, rows_to_table
from reports.tuning_impact import MEASURED_COLUMNS, effect_text, last_effects, measured_effect

SEVERITY_BY_RISK = {"high": "critical", "medium": "warning", "low": "warning"}


def measured_rows(effect: dict | None) -> dict:
    return {column: (effect or {}).get(name) for name, column in MEASURED_COLUMNS.items()}


def effect_words(effect: dict) -> str:
    """effect_text plus where it was measured, for findings and the terminal summary."""
    return effect_text(effect) + f" ({effect.get('workload') or 'workload'}, run {effect['run_id']})"


def kernel_rows(plan, effects: dict[str, dict] | None = None) -> list[dict]:
    effects = effects or {}
    return [{
        "item": item.item, "kind": item.kind, "current": item.current, "expected": item.target,
        "compliant": item.compliant, "source": item.source, "reboot_required": item.reboot_required,
        "risk": item.risk, "why": item.why, "note": item.note, "profile": plan.profile.name,
        **measured_rows(effects.get(item.item)),
    } for item in plan.items]


def measured_findings(plan, effects: dict[str, dict]) -> list[dict]:
    """An item the profile wants and this host has, measured here to make latency worse."""
    rows = []
    for item in plan.items:
        effect = effects.get(item.item)
        if item.compliant and effect is not None and effect["verdict"] == "worsens":
            rows.append(finding("kernel", "warning", item.item,
                                f"set to {item.current} as profile {plan.profile.name} expects, but measured on "
                                f"this host it {effect_words(effect)}",
                                f"roll it back (`guardian-agent tune rollback`) or drop it from the profile for "
                                f"this host; re-measure with `guardian-agent tune experiment --items {item.item}`"))
    return rows


def kernel_findings(plan, effects: dict[str, dict] | None = None) -> list[dict]:
    effects = effects or {}
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
        if item.item in effects:
            message += f"; measured here: {effect_words(effects[item.item])}"
        rows.append(finding("kernel", SEVERITY_BY_RISK.get(item.risk, "warning"), item.item, message,
                            recommendation))
    return rows + measured_findings(plan, effects)


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
        pa.field("measured_effect_pct", pa.float64()),  # (tuned - untuned) / untuned of the metric
        pa.field("measured_effect_low_pct", pa.float64()),
        pa.field("measured_effect_high_pct", pa.float64()),
        pa.field("measured_p_value", pa.float64()),
        pa.field("measured_verdict", pa.string()),  # improves / no measurable effect / worsens / inconclusive
        pa.field("measured_value", pa.string()),  # the value the experiment set
        pa.field("measured_workload", pa.string()),
        pa.field("measured_metric", pa.string()),
        pa.field("measured_run_id", pa.string()),
        pa.field("measured_at", pa.timestamp("us", tz="UTC")),
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
            # --profile was asked for by name: an unknown or broken profile is the user's input.
            raise BadInput(f"--profile {profile}: {error}") from None

    def check(self) -> None:
        self._load()

    def collect(self, window) -> dict[str, pa.Table]:
        from probes.kernel_tuning.plan import build_plan

        plan = build_plan(self.host, self._load())
        effects, trouble = self._effects()
        return {"kernel": rows_to_table(kernel_rows(plan, effects), self.schema),
                "findings": findings_table(kernel_findings(plan, effects) + trouble)}

    def _effects(self) -> tuple[dict[str, dict], list[dict]]:
        """The ledger's last effect per item on this host; a damaged ledger costs the columns,
        not the audit (the finding names it)."""

        directory = self.option("tuning_state_dir")
        if directory is None:
            return {}, []
        try:
            return last_effects(directory, self.host.hostname()), []
        except WorkFailed as error:
            return {}, [finding("kernel", "warning", "tuning impact ledger", str(error),
                                "move the file aside; the next `tune experiment` starts a new ledger")]

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
        lines = [line]
        measured = [r for r in rows if r.get("measured_verdict")]
        if measured:
            counts = {verdict: sum(1 for r in measured if r["measured_verdict"] == verdict)
                      for verdict in ("improves", "no measurable effect", "worsens", "inconclusive")}
            lines.append(f"kernel: measured on this host: {len(measured)}/{len(rows)} items; "
                         + ", ".join(f"{count} {verdict}" for verdict, count in counts.items() if count))
            for row in sorted(measured, key=lambda r: -abs(r.get("measured_effect_pct") or 0.0))[:5]:
                lines.append(f"  {row['item']}: {effect_words(measured_effect(row))}")
        return lines
