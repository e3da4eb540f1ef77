"""guardian-agent command line.

Exit codes (core/errors.py): 0 done; 1 the work failed (or the gate failed); 2 bad input or
usage; 3 drift found (`tune plan`); 4 the gate is inconclusive or marginal; 130 interrupted
(Ctrl-C, SIGTERM). Bad input gets one clear line on stderr, never a traceback; `-v` shows
details. This is the only module that calls sys.exit.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from pathlib import Path

import click

from agent import __version__
from agent.option_types import INTERVAL_SECONDS, WINDOW_SECONDS, Seconds  # noqa: F401 - re-exported
from core.errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, BadInput, GuardianError,
                         Unavailable)
from probes.options import PROBE_OPTIONS, ProbeOption, validated_options


# Other command modules, each exposing `commands` (a list of click commands/groups).
# Explicit and ordered, like the probe registry: easy to read, no magic.
COMMAND_MODULES: tuple[str, ...] = (
    "agent.commands.chaos",
    "agent.commands.fleet",
    "agent.commands.gate",
    "agent.commands.rollout",
    "agent.commands.pcap",
    "agent.commands.pglog",
    "agent.commands.report",
    "agent.commands.stacks",
    "agent.commands.tune",
)


class Context:
    def __init__(self, verbose: bool):
        self.verbose = verbose


def echo_error(message: str) -> None:
    click.echo(f"guardian-agent: {message}", err=True)


def progress_printer(enabled: bool):
    def progress(message: str) -> None:
        if enabled:
            click.echo(f"… {message}", err=True)

    return progress


def countdown_ticker(enabled: bool):
    """On a terminal, one self-overwriting line with the seconds left in the window."""
    state = {"shown": False}

    def tick(remaining_s: float) -> None:
        if not enabled:
            return
        if remaining_s <= 0:
            if state["shown"]:
                click.echo("\r" + " " * 40 + "\r", err=True, nl=False)
            return
        state["shown"] = True
        click.echo(f"\r… {remaining_s:5.0f} s left (Ctrl-C ends the window early)", err=True, nl=False)

    return tick


def stderr_is_tty() -> bool:
    try:
        return os.isatty(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="guardian-agent")
@click.option("-v", "--verbose", is_flag=True, help="Show details (tracebacks, probe internals).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Host-level performance audit agent for latency-critical Linux hosts.

    \b
    Exit codes: 0 done, 1 the work failed (or the gate failed, or a chaos
                hypothesis was refuted), 2 bad input or usage, 3 drift found (tune plan),
                4 the gate is inconclusive or marginal (gate),
                130 interrupted (Ctrl-C or SIGTERM before the command finished).
    """
    ctx.obj = Context(verbose)


def parse_probe_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise BadInput("--probes: give a comma-separated list of probe names")
    return names


def click_settings(option: ProbeOption) -> dict:
    """The click flag of a declared probe option (probes/options.py): unset is None, so the
    declared default (shown in the help) applies."""
    settings: dict = {"help": option.help, "default": None}
    if option.kind == "boolean":
        settings.update(is_flag=True, default=False)
    elif option.kind in ("strings", "variables"):
        settings.update(multiple=True, default=())
    elif option.kind == "choice":
        settings["type"] = click.Choice(option.choices)
    else:
        settings["type"] = {"number": float, "integer": int, "path": click.Path(path_type=Path)}.get(option.kind, str)
    if option.metavar:
        settings["metavar"] = option.metavar
    return settings


def probe_option_flags(function):
    for option in reversed(PROBE_OPTIONS):
        function = click.option(option.cli_flag, option.name, **click_settings(option))(function)
    return function


@cli.command()
@click.option("--duration", "duration_s", type=WINDOW_SECONDS, default=10.0, show_default=True,
              help="Window length in seconds.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Bundle directory (created; refused if not empty). Default ./guardian-reports/<run_id>/.")
@click.option("--probes", "probe_list", metavar="NAME[,NAME...]",
              help="Probes to run (default: every available default probe). See `guardian-agent probes`.")
@click.option("--pid", "pids", type=int, multiple=True, help="Target process (repeatable).")
@click.option("--process", "process_names", multiple=True, help="Target processes by name (repeatable).")
@click.option("--unit", "units", multiple=True, help="Target a systemd unit's processes (repeatable).")
@probe_option_flags
@click.option("--no-html", "no_html", is_flag=True, help="Do not write report.html into the bundle.")
@click.pass_obj
def audit(obj: Context, duration_s, out_dir, probe_list, pids, process_names, units, no_html=False,
          **option_values) -> None:
    """Run probes side by side over one window and write a report bundle.

    Prints each probe's status and the findings, most severe first. Exit 0 when the bundle is
    complete (Ctrl-C ends the window early and still writes it); 1 when no probe could collect
    anything (the bundle records why); 2 when an option given to a probe is wrong (--profile,
    --iface, --capture-filter, --jitter-cpus, a refused --pg-dsn login), before the window.
    Probe options (--interval ... --peer-role) can also be set in config.toml's [probe_options]
    under their names (interval_s, peer_roles ...) for `collect` and the daemon.
    """
    from core.children import clean_stale_temp_dirs
    from core.host import Host
    from agent.runner import AuditRun, select_probes
    from agent.summary import nothing_collected, render_summary
    from probes import REGISTRY
    from probes.base import ProbeConfig
    from reports.bundle import BundleWriter, new_run_id, validate_out_dir
    from agent.tuning.ledger import with_ledger_dir

    if duration_s <= 0:
        raise BadInput(f"--duration must be positive, not {duration_s:g}")
    options = with_ledger_dir(validated_options(option_values))
    clean_stale_temp_dirs()  # left by an audit that was SIGKILLed (its children died with it)
    host = Host.real()
    for pid in pids:
        if pid <= 0 or not host.pid_exists(pid):
            raise BadInput(f"--pid {pid}: no such process")
    if process_names or units:
        from probes.targets import resolve_targets

        # A name or unit that matches nothing is a typo, not an empty audit: refuse it up front.
        # The matches join --pid so every probe (host, syscalls, stacks...) targets them.
        resolved = resolve_targets(host, (), process_names, units)
        pids = tuple(dict.fromkeys([*pids, *(target.pid for target in resolved)]))
    names = parse_probe_list(probe_list)
    probe_classes = select_probes(names, REGISTRY)
    run_id = new_run_id(host.hostname())
    target = out_dir if out_dir is not None else Path("guardian-reports") / run_id
    validate_out_dir(target)
    config = ProbeConfig(host=host, pids=tuple(pids), options=options,
                         process_names=tuple(process_names), units=tuple(units))
    writer = BundleWriter(target, run_id=run_id, host=host)
    run = AuditRun(probe_classes, config, writer, duration_s,
                   progress=progress_printer(stderr_is_tty() or obj.verbose),
                   ticker=countdown_ticker(stderr_is_tty()))

    previous = {}

    def on_signal(signum, frame):  # noqa: ARG001 - signal signature
        run.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, on_signal)
    try:
        result = run.run()
    except BadInput:
        writer.discard()  # refused before the window: leave --out as it was
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    click.echo(render_summary(result, writer.out_dir, verbose=obj.verbose))
    from agent.commands.report import emit_html_report

    emit_html_report(writer.out_dir, no_html)
    return EXIT_FAILED if nothing_collected(result) else EXIT_OK


@cli.command(name="probes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--pid", "pids", type=int, multiple=True, help="Check availability for this target.")
def probes_command(as_json: bool, pids) -> None:
    """List every probe with available / unavailable and the reason."""
    import json

    from probes import REGISTRY
    from probes.base import ProbeConfig

    config = ProbeConfig(pids=tuple(pids))
    rows = []
    for probe_class in REGISTRY:
        try:
            probe_class(config).check()
            status, reason = "available", ""
        except Unavailable as error:
            status, reason = "unavailable", str(error)
        except Exception as error:  # a check that crashes is a bug, reported not raised
            status, reason = "unavailable", f"check failed: {type(error).__name__}: {error}"
        rows.append({"name": probe_class.name, "status": status, "reason": reason,
                     "default": probe_class.default_enabled,
                     "description": probe_class.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max((len(row["name"]) for row in rows), default=4)
    for row in rows:
        flag = "" if row["default"] else " (on request)"
        line = f"{row['name']:<{width}}  {row['status']:<11}  {row['description']}{flag}"
        click.echo(line)
        if row["reason"]:
            click.echo(f"{'':<{width}}  {'':<11}  ↳ {row['reason']}")


def _register_command_modules() -> None:
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        for command in module.commands:
            cli.add_command(command)


_register_command_modules()


def main(argv: list[str] | None = None) -> None:
    verbose = "-v" in (argv if argv is not None else sys.argv[1:]) or "--verbose" in (
        argv if argv is not None else sys.argv[1:])
    try:
        code = cli.main(args=argv, prog_name="guardian-agent", standalone_mode=False)
    except SystemExit as done:
        # click turns EPIPE (output piped into `head`) into exit 1 and wraps stdout; the reader
        # having seen enough is not a failure.
        if done.code == 1 and type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
            sys.exit(EXIT_OK)
        raise
    except click.exceptions.Abort:
        echo_error("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        # Usage errors: click prints "Usage: ... Error: ..." — keep it to one clear line.
        echo_error(error.format_message())
        sys.exit(EXIT_BAD_INPUT if error.exit_code == 2 else error.exit_code)
    except GuardianError as error:
        echo_error(str(error))
        if verbose:
            traceback.print_exc()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        echo_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(EXIT_OK)
    except Exception as error:  # a bug: still one line unless -v
        echo_error(f"internal error: {type(error).__name__}: {error} (run with -v for details)")
        if verbose:
            traceback.print_exc()
        sys.exit(EXIT_FAILED)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
