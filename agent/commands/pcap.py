"""`guardian-agent pcap FILE --out DIR`: flows and request→response turns of a capture."""

from __future__ import annotations

from pathlib import Path

import click

from agent.commands.report import NO_HTML_OPTION, emit_html_report
from core.errors import BadInput


@click.command(name="pcap")
@click.argument("capture_file", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle directory (created; refused if not empty).")
@click.option("--block-mib", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Read the capture in blocks of this size (bounds memory on multi-GB files).")
@click.option("--max-flows", type=click.IntRange(1, None), default=1_000_000, show_default=True,
              help="Live flows tracked at once (~300 bytes each); new flows beyond it are folded "
                   "into one 'other' row and a finding counts them.")
@click.option("--flow-idle-s", type=click.FloatRange(0, None, min_open=True), default=900.0, show_default=True,
              help="A flow silent this long (capture time) is finished; a later packet on its "
                   "4-tuple starts a new flow row.")
@NO_HTML_OPTION
def pcap(capture_file: Path, out_dir: Path, block_mib: int, max_flows: int = 1_000_000,
         flow_idle_s: float = 900.0, no_html: bool = False) -> None:
    """Analyse a pcap/pcapng capture into a bundle with `flows` and `turns`.

    \b
    Reads Ethernet, Linux cooked (SLL/SLL2), raw IP and loopback captures, IPv4 and IPv6,
    and TCP inside VXLAN, Geneve, GRE/ERSPAN, IP-in-IP, MPLS and PPPoE (flows.encapsulation);
    packets not decoded are counted by reason in the manifest. A truncated or corrupt file:
    what came before the bad record is written (the manifest says partial) and the command
    exits 2 naming the byte offset. Memory is flat in the length of the capture: flows and
    turns are written in batches as flows finish.
    """
    from agent.input_files import check_input_file
    from core.host import Host
    from agent.progress import terminal_progress
    from probes.pcap_analysis import (FLOWS_SCHEMA, TURNS_SCHEMA, FlowFindings, FlowLimits, analyse_capture,
                                      capture_findings, summary_headlines)
    from probes.pcap_reader import CaptureReader
    from reports.bundle import BundleWriter, ProbeRecord, validate_out_dir

    # A FIFO or a pipe (process substitution, /dev/stdin) would block the reader, which needs
    # the file's size and reads it in blocks: refused before anything is written.
    check_input_file(capture_file, not_regular_hint="save the capture to a file first")
    import pyarrow as pa

    validate_out_dir(out_dir)
    # Opening validates the format and link type before anything is written.
    reader = CaptureReader(capture_file, block_bytes=block_mib << 20,
                           progress=terminal_progress(capture_file.name))
    limits = FlowLimits(max_live_flows=max_flows, idle_timeout_s=flow_idle_s)
    writer = BundleWriter(out_dir, host=Host.real())
    flow_findings = FlowFindings()
    try:
        # Flows and turns stream into their Parquet files batch by batch as flows finish: memory
        # follows the live flows, not the length of the capture.
        with writer.table_stream("flows", FLOWS_SCHEMA, "pcap") as flows_out, \
                writer.table_stream("turns", TURNS_SCHEMA, "pcap") as turns_out:
            def write_flows(table: pa.Table) -> None:
                flow_findings.add(table)
                flows_out.write(table)

            _, _, summary = analyse_capture(reader, limits=limits, flow_sink=write_flows, turn_sink=turns_out.write)
        findings = pa.concat_tables([flow_findings.table("pcap"), capture_findings(summary, "pcap")])
        counts = {"flows": writer.tables_written["flows"], "turns": writer.tables_written["turns"],
                  "findings": writer.write_table("findings", findings, "pcap")}
    except BaseException:
        if not writer.finished:
            writer.discard()
        raise
    status = "failed" if summary.partial else "ok"
    writer.add_probe(ProbeRecord("pcap", status, summary.error, counts, summary.seconds))
    writer.finish(extra={"source": {"kind": "pcap", **summary.as_dict()}, "partial": summary.partial})
    rate = summary.packets / summary.seconds if summary.seconds > 0 else 0.0
    not_decoded = sum(summary.not_decoded.values())
    said = f", {not_decoded} not decoded: by reason in the manifest" if not_decoded else ""
    click.echo(f"{summary.packets} packets ({summary.tcp_packets} TCP{said}) in {summary.seconds:.2f} s "
               f"({rate / 1e6:.2f}M packets/s) → {writer.out_dir}")
    for line in summary_headlines(summary):
        click.echo(line)
    emit_html_report(writer.out_dir, no_html)
    if summary.partial:
        raise BadInput(f"{summary.error} (partial bundle written to {writer.out_dir})")


commands = [pcap]
