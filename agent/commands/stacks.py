"""`guardian-agent stacks diff`: what changed between two stack profiles (bundles with a `stacks` table)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from core.atomic import write_text_atomic
from core.errors import BadInput


def load_folded(bundle_path: Path) -> tuple[dict[str, int], str]:
    """A bundle's stacks, merged across processes and threads, and its run id."""
    from reports.bundle import Bundle

    bundle = Bundle(bundle_path)
    if not bundle.has("stacks"):
        raise BadInput(f"{bundle_path}: bundle has no stacks table (record one with "
                       "`guardian-agent audit --probes stacks --pid PID`)")
    table = bundle.table("stacks")
    missing = {"stack", "samples"} - set(table.column_names)
    if missing:
        raise BadInput(f"{bundle_path}: stacks table lacks column {', '.join(sorted(missing))}")
    folded: dict[str, int] = {}
    for stack, samples in zip(table.column("stack").to_pylist(), table.column("samples").to_pylist()):
        if stack and samples:
            folded[stack] = folded.get(stack, 0) + int(samples)
    if not folded:
        raise BadInput(f"{bundle_path}: stacks table is empty (no samples to compare)")
    return folded, bundle.run_id


def _check_out_file(path: Path) -> None:
    if path.exists() and path.is_dir():
        raise BadInput(f"--out {path}: is a directory (give a file name such as diff.svg)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {path}: {parent} is not a writable directory")


@click.group(name="stacks")
def stacks() -> None:
    """Compare stack profiles recorded by `audit --probes stacks`."""


@stacks.command(name="diff")
@click.argument("baseline", metavar="BASELINE_BUNDLE", type=click.Path(path_type=Path))
@click.argument("candidate", metavar="CANDIDATE_BUNDLE", type=click.Path(path_type=Path))
@click.option("--out", "out_file", type=click.Path(path_type=Path), required=True,
              help="Differential flame graph to write (SVG).")
@click.option("--top", "top_n", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="How many grown (and shrunk) frames to print.")
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
def diff(baseline: Path, candidate: Path, out_file: Path, top_n: int, as_json: bool) -> None:
    """Differential flame graph of BASELINE_BUNDLE -> CANDIDATE_BUNDLE.

    Each frame is coloured by the change in its share of samples (red grew, blue shrank);
    shares, not counts, are compared, so runs of different length or rate compare fairly.
    Line numbers are ignored so a function still matches after code above it moved.
    Prints the functions whose self share (time running their own code) grew most, with their
    inclusive share beside. Exit 0 when the graph is written, 2 on bad input.
    """
    from reports.flamegraph import diff_frames, differential_svg

    _check_out_file(out_file)
    base_folded, base_run = load_folded(baseline)
    cand_folded, cand_run = load_folded(candidate)
    base_total, cand_total = sum(base_folded.values()), sum(cand_folded.values())
    svg = differential_svg(
        base_folded, cand_folded,
        title=f"stacks diff: {base_run} -> {cand_run}",
        subtitle=(f"baseline {base_total:,} samples, candidate {cand_total:,} samples; "
                  "red: share grew, blue: shrank; width: mean share of both"),
    )
    try:
        write_text_atomic(svg, out_file)
    except OSError as error:
        raise BadInput(f"--out {out_file}: cannot write ({error.strerror})") from None
    grew = diff_frames(base_folded, cand_folded, limit=top_n, grew=True)
    shrank = diff_frames(base_folded, cand_folded, limit=top_n, grew=False)
    if as_json:
        def as_dicts(changes):
            return [{"frame": c.frame, "baseline_pct": round(c.baseline_pct, 3),
                     "candidate_pct": round(c.candidate_pct, 3), "change_pts": round(c.change_pts, 3),
                     "baseline_inclusive_pct": round(c.baseline_inclusive_pct, 3),
                     "candidate_inclusive_pct": round(c.candidate_inclusive_pct, 3)}
                    for c in changes]

        click.echo(json.dumps({"svg": str(out_file), "baseline": {"run_id": base_run, "samples": base_total},
                               "candidate": {"run_id": cand_run, "samples": cand_total},
                               "grew": as_dicts(grew), "shrank": as_dicts(shrank)}, indent=2))
        return
    click.echo(f"wrote {out_file} (baseline {base_total:,} samples, candidate {cand_total:,} samples)")
    header = "   change   self share        inclusive share   frame"
    click.echo("frames that grew:" if grew else "no frame grew its share of samples")
    if grew:
        click.echo(header)
    for change in grew:
        click.echo(_change_line(change))
    if shrank:
        click.echo("frames that shrank:")
        for change in shrank[:min(top_n, 5)]:
            click.echo(_change_line(change))


def _change_line(change) -> str:
    return (f"  {change.change_pts:+6.1f} pts  {change.baseline_pct:5.1f}% -> {change.candidate_pct:5.1f}%"
            f"  {change.baseline_inclusive_pct:5.1f}% -> {change.candidate_inclusive_pct:5.1f}%  {change.frame}")


commands = [stacks]
