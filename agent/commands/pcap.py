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
@NO_HTML_OPTION
def pcap(capture_file: Path, out_dir: Path, block_mib: int, no_html: bool = False) -> None:
    """Analyse a pcap/pcapng capture into a bundle with `flows` and `turns`.

    \b
    Reads Ethernet, Linux cooked (SLL/SLL2), raw IP and loopback captures, IPv4 and IPv6,
    and TCP inside VXLAN, Geneve, GRE/ERSPAN, IP-in-IP, MPLS and PPPoE (flows.encapsulation);
    packets not decoded are counted by reason in the manifest. A truncated or corrupt file:
    what came before the bad record is written (the manifest says partial) and the command
    exits 2 naming the byte offset.
    """
    from agent.input_files import check_input_file
    from core.host import Host
    from agent.progress import terminal_progress
    from probes.pcap_analysis import analyse_capture, capture_findings, flows_findings, flows_headlines
    from probes.pcap_reader import CaptureReader
    from reports.bundle import BundleWriter, ProbeRecord, validate_out_dir

    # A FIFO or a pipe (process substitution, /dev/stdin) would block the reader, which needs
    # the file's size and reads it in blocks: refused before anything is written.
    check_input_file(capture_file, not_regular_hint="save the capture to a file first")
    validate_out_dir(out_dir)
    # Opening validates the format and link type before anything is written.
    reader = CaptureReader(capture_file, block_bytes=block_mib << 20,
                           progress=terminal_progress(capture_file.name))
    # Turns beyond a million go to a memory-mapped spill file in DIR (removed as soon as it is
    # mapped), so memory stays bounded by the flows, not by the length of the capture.
    flows, turns, summary = analyse_capture(reader, spill_dir=out_dir)
    import pyarrow as pa

    findings = pa.concat_tables([flows_findings(flows, "pcap"), capture_findings(summary, "pcap")])
    writer = BundleWriter(out_dir, host=Host.real())
    counts = {
        "flows": writer.write_table("flows", flows, "pcap"),
        "turns": writer.write_table("turns", turns, "pcap"),
        "findings": writer.write_table("findings", findings, "pcap"),
    }
    status = "failed" if summary.partial else "ok"
    writer.add_probe(ProbeRecord("pcap", status, summary.error, counts, summary.seconds))
    writer.finish(extra={"source": {"kind": "pcap", **summary.as_dict()}, "partial": summary.partial})
    rate = summary.packets / summary.seconds if summary.seconds > 0 else 0.0
    not_decoded = sum(summary.not_decoded.values())
    said = f", {not_decoded} not decoded: by reason in the manifest" if not_decoded else ""
    click.echo(f"{summary.packets} packets ({summary.tcp_packets} TCP{said}) in {summary.seconds:.2f} s "
               f"({rate / 1e6:.2f}M packets/s) → {writer.out_dir}")
    for line in flows_headlines({"flows": flows, "turns": turns}):
        click.echo(line)
    emit_html_report(writer.out_dir, no_html)
    if summary.partial:
        raise BadInput(f"{summary.error} (partial bundle written to {writer.out_dir})")


commands = [pcap]
