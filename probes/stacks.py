"""stacks probe: sampled call stacks of live processes, as a table, a flame graph and a speedscope file.

Python processes are sampled with py-spy, non-blocking by default: py-spy reads the interpreter's
memory with process_vm_readv and never ptrace-stops the target, so a hot trading thread is not
paused (a sample can then be torn, which py-spy counts as an error; `--blocking` pauses the
target for exact stacks). Native processes, or any target with `--native`, are sampled with
`perf record -F RATE -g` (frame-pointer call chains; perf never stops the target either).

The default rate, 97 Hz, is prime so sampling does not lock step with 10 ms / 100 Hz timers in the
target and over- or under-count the work they trigger.

Table `stacks`: one row per distinct (process, thread, stack): folded stack root->leaf, samples,
thread, pid, the sampler (`source`), and the sampling mode flags (`includes_idle`, `gil_only`,
`blocking`). py-spy's output formats do not mark individual samples as idle or GIL-holding, so the
flags record what was sampled: only running threads (default), idle ones too (`--stack-threads
all`), or only the thread holding the GIL (`--stack-threads gil`).
Extras: stacks.svg (searchable flame graph) and stacks.speedscope.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable

import pyarrow as pa

from core import children
from core.errors import BadInput, Unavailable
from core.host import Host
from probes.base import ProbeBase, ProbeConfig, Window, finding, findings_table, rows_to_table
from probes.options import BY_NAME
from probes.targets import Target, children_of, resolve_targets

NAME = "stacks"
DEFAULT_RATE_HZ = BY_NAME["sample_rate_hz"].default  # declared once, in probes/options.py
MAX_RATE_HZ = 1000
STOP_TIMEOUT_S = 15.0
CAP_SYS_PTRACE_BIT = 19
# A function holding this share of a process's samples gets a finding.
HOT_FUNCTION_MIN_SHARE = 0.20
# Above this share of failed samples, non-blocking sampling is losing too much.
SAMPLE_ERROR_WARN_SHARE = 0.10
THREAD_MODES = ("running", "all", "gil")

SCHEMA = pa.schema(
    [
        pa.field("stack", pa.string(), nullable=False),
        pa.field("samples", pa.int64(), nullable=False),
        pa.field("thread", pa.string()),
        pa.field("thread_id", pa.int64()),
        pa.field("pid", pa.int64(), nullable=False),
        pa.field("process", pa.string()),
        pa.field("source", pa.string(), nullable=False),  # py-spy | perf
        pa.field("sample_rate_hz", pa.int32(), nullable=False),
        pa.field("includes_idle", pa.bool_(), nullable=False),
        pa.field("gil_only", pa.bool_(), nullable=False),
        pa.field("blocking", pa.bool_(), nullable=False),
    ]
)


# ---------------------------------------------------------------------------------------------
# Pure parsing / folding


_THREAD_FRAME = re.compile(r"^thread \((?P<tid>0x[0-9a-fA-F]+|\d+)\)(?::\s*(?P<name>.*))?$")
_PROCESS_FRAME = re.compile(r"^process (?P<pid>\d+):", re.DOTALL)
_PYTHON_LIB = re.compile(r"/lib/python\d+(?:\.\d+)?/(?P<rest>.+)$")


def short_filename(path: str) -> str:
    """`.../site-packages/numpy/core/x.py` -> `numpy/core/x.py`, stdlib -> `threading.py`,
    anything else -> its basename: readable in a frame, and stable across hosts and venvs."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    match = _PYTHON_LIB.search(path)
    if match:
        return match.group("rest")
    return os.path.basename(path) or path


def _clean(name: str) -> str:
    # ';' separates frames in the folded format and a newline ends a record.
    return name.replace(";", ":").replace("\n", " ").strip()


def python_frame_name(frame: dict) -> str:
    name = _clean(frame.get("name") or "?")
    filename = frame.get("file") or ""
    line = frame.get("line")
    if not filename:
        return name
    where = _clean(short_filename(filename))
    return f"{name} ({where}:{line})" if line else f"{name} ({where})"


def _pyspy_samples(document: dict, default_pid: int):
    """(pid, thread, thread_id, stack, weight) for each sample of a py-spy speedscope document,
    in py-spy's (time) order. py-spy marks the process and the thread as pseudo-frames at the
    root of each sample; they become columns, not frames."""
    frames = document.get("shared", {}).get("frames", [])
    names = [python_frame_name(frame) for frame in frames]
    for profile in document.get("profiles", []):
        weights = profile.get("weights") or []
        for position, sample in enumerate(profile.get("samples", [])):
            pid, thread, thread_id = default_pid, "", None
            stack: list[str] = []
            for index in sample:
                raw = frames[index].get("name") or ""
                if not frames[index].get("file"):
                    process = _PROCESS_FRAME.match(raw)
                    if process:
                        pid = int(process.group("pid"))
                        continue
                    thread_match = _THREAD_FRAME.match(raw)
                    if thread_match:
                        tid_text = thread_match.group("tid")
                        thread_id = int(tid_text, 16) if tid_text.startswith("0x") else int(tid_text)
                        thread = _clean(thread_match.group("name") or "")
                        continue
                stack.append(names[index])
            if not stack:
                continue
            weight = weights[position] if position < len(weights) else 1
            yield (pid, thread or (f"tid {thread_id}" if thread_id is not None else ""), thread_id,
                   ";".join(stack), weight)


def pyspy_speedscope_rows(document: dict, default_pid: int) -> list[dict]:
    """Fold a py-spy speedscope document (recorded with --threads, optionally --subprocesses) into
    rows {pid, thread, thread_id, stack, samples}."""
    counts: dict[tuple[int, str, int | None, str], int] = {}
    for pid, thread, thread_id, stack, _weight in _pyspy_samples(document, default_pid):
        key = (pid, thread, thread_id, stack)
        counts[key] = counts.get(key, 0) + 1
    return [
        {"pid": pid, "thread": thread, "thread_id": thread_id, "stack": stack, "samples": samples}
        for (pid, thread, thread_id, stack), samples in sorted(counts.items(), key=lambda kv: -kv[1])
    ]


def pyspy_timeline_rows(document: dict, default_pid: int) -> list[dict]:
    """py-spy's samples in time order for the speedscope file (its Time Order view), with runs of
    the same stack on a thread merged into one weighted sample (py-spy weights are seconds)."""
    rows: list[dict] = []
    last: dict[tuple, dict] = {}
    for pid, thread, thread_id, stack, weight in _pyspy_samples(document, default_pid):
        key = (pid, thread, thread_id)
        previous = last.get(key)
        if previous is not None and previous["stack"] == stack:
            previous["samples"] += weight
            continue
        last[key] = {"pid": pid, "thread": thread, "thread_id": thread_id, "stack": stack, "samples": weight,
                     "source": "py-spy"}
        rows.append(last[key])
    return rows


_PERF_HEADER = re.compile(r"^(?P<comm>\S.*?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s*(?::.*)?$")
_PERF_FRAME = re.compile(r"^\s+(?P<ip>[0-9a-fA-F]+)\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)\s*$")


# x86-64 and arm64 kernels live in the upper half of the address space.
KERNEL_ADDRESS_MIN = 0xFFFF800000000000


def _perf_frame_name(sym: str, dso: str, ip: int = 0) -> str:
    """flamegraph.pl's stackcollapse-perf conventions: an unresolved symbol shows its library as
    `[libfoo.so]`, kernel frames get a `[k]` suffix. The kernel's dso is `[kernel.kallsyms]`, or
    the vmlinux path when perf found a matching one, so the address decides."""
    sym = re.sub(r"\+0x[0-9a-fA-F]+$", "", sym.strip())
    if ip >= KERNEL_ADDRESS_MIN or dso.startswith("[kernel") or dso.endswith("vmlinux"):
        return _clean(f"{sym} [k]" if sym and sym != "[unknown]" else "[kernel] [k]")
    if not sym or sym == "[unknown]":
        base = os.path.basename(dso) if dso and dso != "[unknown]" else "unknown"
        return _clean(f"[{base}]")
    return _clean(sym)


def perf_script_rows(text: str) -> list[dict]:
    """Fold `perf script -F comm,pid,tid,ip,sym,dso` output into rows {pid, thread, thread_id,
    process, stack, samples}. perf prints each call chain leaf first; folded stacks are root first.
    Runs of unresolved frames collapse to one, as they carry no information for a reader."""
    counts: dict[tuple[int, str, int, str], int] = {}
    header: tuple[str, int, int] | None = None
    chain: list[str] = []

    def flush() -> None:
        if header is None:
            return
        frames: list[str] = []
        for frame in reversed(chain):
            if frames and frame == frames[-1] and frame.startswith("["):
                continue
            frames.append(frame)
        if not frames:
            frames = ["[unknown]"]
        key = (header[1], header[0], header[2], ";".join(frames))
        counts[key] = counts.get(key, 0) + 1

    for line in text.splitlines():
        if not line.strip():
            flush()
            header, chain = None, []
            continue
        frame = _PERF_FRAME.match(line)
        if frame and header is not None:
            chain.append(_perf_frame_name(frame.group("sym"), frame.group("dso"), int(frame.group("ip"), 16)))
            continue
        head = _PERF_HEADER.match(line)
        if head and not line[0].isspace():
            flush()
            header, chain = (head.group("comm").strip(), int(head.group("pid")), int(head.group("tid"))), []
    flush()
    return [
        {"pid": pid, "thread": comm, "thread_id": tid, "process": None, "stack": stack, "samples": samples}
        for (pid, comm, tid, stack), samples in sorted(counts.items(), key=lambda kv: -kv[1])
    ]


_PYSPY_COUNTS = re.compile(r"Samples:\s*(?P<samples>\d+)\s+Errors:\s*(?P<errors>\d+)")


def pyspy_sample_counts(stderr: str) -> tuple[int, int]:
    match = None
    for match in _PYSPY_COUNTS.finditer(stderr):
        pass
    return (int(match.group("samples")), int(match.group("errors"))) if match else (0, 0)


def pyspy_target_exited(stderr: str) -> bool:
    return "process exited" in stderr.lower()


def pyspy_failure_reason(stderr: str, pid: int, comm: str = "") -> str:
    """One actionable line from py-spy's error output (which ends in a Rust backtrace)."""
    who = f"pid {pid}" + (f" ({comm})" if comm else "")
    lowered = stderr.lower()
    if "permission denied" in lowered or "operation not permitted" in lowered:
        return (f"py-spy cannot read {who}: permission denied. It needs CAP_SYS_PTRACE (run as root) "
                "and kernel.yama.ptrace_scope <= 2 (sysctl kernel.yama.ptrace_scope)")
    version = re.search(r"unsupported (?:version of )?python(?: version)?[:\s]*([0-9][0-9.]*\w*)", stderr,
                        re.IGNORECASE)
    if version:
        return (f"{who} runs Python {version.group(1)}, which this py-spy ({pyspy_version()}) cannot read: "
                "upgrade py-spy (pip install -U py-spy)")
    if "failed to find python version" in lowered or "failed to find a python interpreter" in lowered:
        return (f"{who} is not a Python process py-spy can read (no interpreter found); "
                "use --native to sample it with perf")
    if "no such process" in lowered or "failed to get process executable name" in lowered:
        return f"{who} exited before sampling started"
    first = next((line.strip() for line in stderr.splitlines()
                  if line.strip() and not line.startswith("py-spy>")), "no output")
    return f"py-spy failed on {who}: {first[:200]}"


def perf_failure_reason(stderr: str, pids: Iterable[int]) -> str:
    who = ", ".join(str(pid) for pid in pids)
    lowered = stderr.lower()
    if "perf_event_paranoid" in lowered or "permission" in lowered or "access to performance" in lowered:
        return (f"perf cannot sample pid {who}: needs CAP_PERFMON (run as root) or "
                "kernel.perf_event_paranoid <= 1")
    if "perf not found for kernel" in lowered or "no such file" in lowered:
        return "perf does not match this kernel: install linux-perf (or linux-tools-$(uname -r))"
    first = next((line.strip() for line in stderr.splitlines() if line.strip()), "no output")
    return f"perf record failed for pid {who}: {first[:200]}"


def graph_stacks(rows: list[dict]) -> dict[str, int]:
    """Stacks for the flame graph: process, sampler and thread become root frames only when the
    table holds more than one of them, so a single-threaded profile starts at its own code."""
    pids = {row["pid"] for row in rows}
    sources = {row["source"] for row in rows}
    threads = {(row["pid"], row["thread"]) for row in rows}
    folded: dict[str, int] = {}
    for row in rows:
        prefix = []
        if len(pids) > 1:
            prefix.append(f"{row.get('process') or 'pid'} ({row['pid']})")
        if len(sources) > 1:
            prefix.append("python (py-spy)" if row["source"] == "py-spy" else "native (perf)")
        if len(threads) > 1:
            prefix.append(f"thread {row.get('thread') or row.get('thread_id')}")
        stack = ";".join(prefix + [row["stack"]])
        folded[stack] = folded.get(stack, 0) + row["samples"]
    return folded


def speedscope_label(row: dict) -> str:
    return (f"{row.get('process') or 'pid'} {row['pid']} / {row.get('thread') or 'thread'}"
            f" ({row.get('thread_id')}) [{row['source']}]")


def speedscope_profiles(rows: list[dict]) -> dict[str, list[tuple[str, float]]]:
    """label -> [(stack, weight)] in the rows' order: time order for py-spy timeline rows, so
    speedscope's Time Order view shows when each stack ran (perf rows stay aggregated)."""
    profiles: dict[str, list[tuple[str, float]]] = {}
    for row in rows:
        profiles.setdefault(speedscope_label(row), []).append((row["stack"], row["samples"]))
    return profiles


def leaf_function(stack: str) -> str:
    from reports.flamegraph import frame_key

    return frame_key(stack.rsplit(";", 1)[-1])


def hot_functions(rows: list[dict], min_share: float = HOT_FUNCTION_MIN_SHARE) -> list[tuple[int, str, str, float]]:
    """(pid, process, function, self share) for functions holding >= min_share of a process's
    samples. Shares are per sampler: with --native, py-spy and perf sample the same CPU time."""
    per_pid: dict[tuple[int, str], int] = {}
    per_function: dict[tuple[int, str, str], int] = {}
    names: dict[int, str] = {}
    for row in rows:
        source = row.get("source") or ""
        per_pid[row["pid"], source] = per_pid.get((row["pid"], source), 0) + row["samples"]
        key = (row["pid"], source, leaf_function(row["stack"]))
        per_function[key] = per_function.get(key, 0) + row["samples"]
        names[row["pid"]] = row.get("process") or ""
    hot = [(pid, names[pid], function, samples / per_pid[pid, source])
           for (pid, source, function), samples in per_function.items()
           if per_pid[pid, source] and samples / per_pid[pid, source] >= min_share]
    hot.sort(key=lambda item: -item[3])
    return hot


# ---------------------------------------------------------------------------------------------
# Environment checks


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def pyspy_version() -> str:
    binary = find_py_spy()
    if not binary:
        return "not installed"
    try:
        return children.run([binary, "--version"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "py-spy"
    except (OSError, subprocess.TimeoutExpired):
        return "py-spy"


def find_perf() -> str | None:
    return shutil.which("perf")


def is_python_process(host: Host, pid: int) -> bool:
    """True when the process maps an interpreter: libpython (shared builds) or a python executable
    (static builds). Scripts named `python-foo` that exec something else are not fooled by argv."""
    try:
        exe = os.readlink(host.path(f"/proc/{pid}/exe")) if host.is_real else ""
    except OSError:
        exe = ""
    if re.search(r"/(?:python|pypy)[\d.]*[a-z]?$", exe or ""):
        return True
    maps = host.read_optional(f"/proc/{pid}/maps")
    return bool(re.search(r"/libpython\d", maps)) or bool(re.search(r"/bin/python[\d.]*\b", maps))


def has_ptrace_capability(host: Host) -> bool:
    if os.geteuid() == 0:
        return True
    for line in host.read_optional("/proc/self/status").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE_BIT & 1)
    return False


def ptrace_scope(host: Host) -> int | None:
    text = host.read_optional("/proc/sys/kernel/yama/ptrace_scope")
    return int(text) if text.isdigit() else None


def ptrace_problem(host: Host) -> str | None:
    scope = ptrace_scope(host)
    if scope == 3:
        return ("kernel.yama.ptrace_scope is 3 (no process may read another): stacks need it <= 2, "
                "which only a reboot can set")
    if not has_ptrace_capability(host):
        return ("reading another process's stacks needs CAP_SYS_PTRACE: run as root or grant it "
                f"(kernel.yama.ptrace_scope is {scope if scope is not None else 'not set (no Yama)'})")
    return None


# ---------------------------------------------------------------------------------------------
# The probe


@dataclass
class _Sampler:
    source: str
    pids: list[int]
    command: list[str]
    output: Path
    process: subprocess.Popen | None = None
    stderr_path: Path | None = None
    exited_at_s: float | None = None
    stderr: str = ""
    notes: list[str] = field(default_factory=list)


def pyspy_command(binary: str, pid: int, rate_hz: int, output: Path, blocking: bool = False,
                  subprocesses: bool = False, thread_mode: str = "running") -> list[str]:
    command = [binary, "record", "--pid", str(pid), "--rate", str(rate_hz), "--format", "speedscope",
               "--output", str(output), "--threads", "--function"]
    if not blocking:
        command.append("--nonblocking")
    if subprocesses:
        command.append("--subprocesses")
    if thread_mode == "all":
        command.append("--idle")
    elif thread_mode == "gil":
        command.append("--gil")
    return command


def perf_command(binary: str, pids: list[int], rate_hz: int, output: Path) -> list[str]:
    return [binary, "record", "-F", str(rate_hz), "-g", "-p", ",".join(str(pid) for pid in pids),
            "-o", str(output)]


class StacksProbe(ProbeBase):
    name: ClassVar[str] = NAME
    schema: ClassVar[pa.Schema] = SCHEMA
    description: ClassVar[str] = "Sampled call stacks of --pid/--process/--unit targets (py-spy; perf for native)"
    extras: ClassVar[tuple[str, ...]] = ("stacks.svg", "stacks.speedscope.json")
    # Stopping the samplers (<= STOP_TIMEOUT_S) plus `perf script` symbol resolution (<= 30 s).
    finish_grace_s: ClassVar[float] = 50.0

    def __init__(self, config: ProbeConfig | None = None) -> None:
        super().__init__(config)
        self.rate_hz = int(self.option("sample_rate_hz"))
        self.native = bool(self.option("native"))
        self.subprocesses = bool(self.option("subprocesses"))
        self.blocking = bool(self.option("blocking"))
        self.thread_mode = str(self.option("stack_threads"))
        self.targets: list[Target] = []
        self.python_pids: list[int] = []
        self.native_pids: list[int] = []
        self._samplers: list[_Sampler] = []
        self._timelines: list[dict] = []  # py-spy samples in time order, for the speedscope file
        # Targets left out (unreadable, exited, no sampler for them), named in the status reason.
        self._skipped: list[str] = []
        self._workdir: Path | None = None

    # -- check / prepare ---------------------------------------------------------------------

    def check(self) -> None:
        if not 1 <= self.rate_hz <= MAX_RATE_HZ:
            raise Unavailable(f"--rate {self.rate_hz}: give 1..{MAX_RATE_HZ} Hz (default {DEFAULT_RATE_HZ})")
        if self.thread_mode not in THREAD_MODES:
            raise Unavailable(f"--stack-threads {self.thread_mode}: one of {', '.join(THREAD_MODES)}")
        try:
            self.targets = resolve_targets(self.host, self.config.pids, self.config.process_names,
                                           self.config.units)
        except BadInput as error:
            raise Unavailable(str(error)) from None
        if not self.targets:
            raise Unavailable("no target: give --pid PID, --process NAME or --unit UNIT")
        problem = ptrace_problem(self.host)
        if problem:
            raise Unavailable(problem)
        self.python_pids, self.native_pids, self._skipped = [], [], []
        for target in self.targets:
            if is_python_process(self.host, target.pid):
                self.python_pids.append(target.pid)
            if self.native or not is_python_process(self.host, target.pid):
                self.native_pids.append(target.pid)
        if self.python_pids and not find_py_spy():
            raise Unavailable("py-spy not installed: pip install py-spy (make setup installs it)")
        if self.native_pids and not find_perf():
            plain = [t for t in self.targets if t.pid in self.native_pids and t.pid not in self.python_pids]
            if not plain:
                raise Unavailable("--native needs perf: install linux-perf")
            names = ", ".join(f"{t.pid} ({t.comm})" for t in plain)
            reason = (f"pid {names} is not a Python process and perf is not available for native stacks: "
                      "install linux-perf")
            if not self.python_pids:
                raise Unavailable(reason)
            self._skipped.append(reason)
            self.native_pids = []

    def prepare(self) -> None:
        """Dry-run py-spy once per Python target (a non-blocking `dump`, ~0.1 s) so an unreadable
        interpreter, a missing permission or an unsupported Python version is reported before the
        window instead of as an empty profile after it."""
        binary = find_py_spy()
        for pid in list(self.python_pids):
            try:
                result = children.run([binary, "dump", "--nonblocking", "--pid", str(pid)],
                                        capture_output=True, text=True, timeout=20)
            except subprocess.TimeoutExpired:
                continue  # a slow dump is not a failure to read; record will tell
            if result.returncode != 0:
                comm = next((t.comm for t in self.targets if t.pid == pid), "")
                if not self.host.pid_exists(pid):
                    reason = f"pid {pid} ({comm}) exited before sampling started"
                else:
                    reason = pyspy_failure_reason(result.stderr + result.stdout, pid, comm)
                # One unreadable process of a unit must not cost the others their profile.
                self.python_pids.remove(pid)
                self._skipped.append(reason)
        if not self.python_pids and not self.native_pids:
            raise Unavailable("; ".join(self._skipped))

    # -- collect -----------------------------------------------------------------------------

    def _start(self, sampler: _Sampler) -> None:
        assert self._workdir is not None
        sampler.stderr_path = self._workdir / f"{sampler.output.name}.stderr"
        with open(sampler.stderr_path, "w") as stderr:
            # A new session: the sampler must not get the audit's terminal Ctrl-C before we stop it
            # and let it write out what it has. py-spy reports progress (sample and error counts,
            # "process exited") on stdout and errors on stderr: keep both.
            sampler.process = children.spawn(sampler.command, stdout=stderr, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)

    def _stop_all(self) -> None:
        """SIGINT every sampler at once (each flushes what it has), then wait on one shared
        deadline, so N samplers take STOP_TIMEOUT_S at worst, not N times it."""
        for sampler in self._samplers:
            if sampler.process is not None and sampler.process.poll() is None:
                try:
                    sampler.process.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for sampler in self._samplers:
            if sampler.process is None:
                continue
            try:
                sampler.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                sampler.process.kill()
                sampler.process.wait()
                sampler.notes.append(f"{sampler.source} did not stop within {STOP_TIMEOUT_S:g} s and was killed")
            if sampler.stderr_path is not None:
                sampler.stderr = sampler.stderr_path.read_text(errors="replace")

    def abandon(self) -> None:
        for sampler in self._samplers:
            if sampler.process is not None and sampler.process.poll() is None:
                sampler.process.kill()

    def collect(self, window: Window) -> dict[str, pa.Table]:
        self._workdir = children.private_temp_dir("stacks")
        try:
            return self._collect(window, self._workdir)
        finally:
            self.abandon()
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _collect(self, window: Window, workdir: Path) -> dict[str, pa.Table]:
        self._timelines = []
        binary = find_py_spy()
        for pid in self.python_pids:
            output = workdir / f"pyspy-{pid}.json"
            self._samplers.append(_Sampler("py-spy", [pid], pyspy_command(
                binary, pid, self.rate_hz, output, self.blocking, self.subprocesses, self.thread_mode), output))
        if self.native_pids:
            pids = list(self.native_pids)
            if self.subprocesses:
                # perf -p follows the threads that exist at start; add the children explicitly.
                for pid in list(pids):
                    pids.extend(child for child in children_of(self.host, pid) if child not in pids)
            output = workdir / "perf.data"
            self._samplers.append(_Sampler("perf", pids, perf_command(find_perf(), pids, self.rate_hz, output),
                                           output))
        for sampler in self._samplers:
            self._start(sampler)
        started = time.monotonic()
        while not window.wait(0.2):
            running = False
            for sampler in self._samplers:
                if sampler.process.poll() is None:
                    running = True
                elif sampler.exited_at_s is None:
                    sampler.exited_at_s = time.monotonic() - started
            if not running:
                break
        self._stop_all()
        for sampler in self._samplers:
            if sampler.exited_at_s is None and sampler.process.returncode not in (0, None, -signal.SIGINT):
                sampler.exited_at_s = time.monotonic() - started

        rows: list[dict] = []
        reasons: list[str] = []
        findings: list[dict] = []
        comm_of = {t.pid: t.comm for t in self.targets}
        failed = 0
        reasons.extend(self._skipped)
        for sampler in self._samplers:
            found, reason, sampler_findings, sampler_failed = self._read(sampler, comm_of)
            rows.extend(found)
            findings.extend(sampler_findings)
            failed += sampler_failed
            if reason:
                reasons.append(reason)
        if not rows and failed:
            raise Unavailable("; ".join(reasons))
        if not rows:
            # An idle target is a result (it used no CPU), not a failure: an empty table says so.
            reasons.append("no samples: the targets did not run on a CPU during the window"
                           + ("" if self.thread_mode == "all" else " (--stack-threads all samples idle Python threads)"))
        self.status_reason = "; ".join(reasons)
        for row in rows:
            row.setdefault("process", None)
            if not row.get("process"):
                row["process"] = comm_of.get(row["pid"]) or self.host.read_optional(f"/proc/{row['pid']}/comm") or None
            row["sample_rate_hz"] = self.rate_hz
            row["includes_idle"] = row["source"] == "py-spy" and self.thread_mode == "all"
            row["gil_only"] = row["source"] == "py-spy" and self.thread_mode == "gil"
            row["blocking"] = row["source"] == "py-spy" and self.blocking
        rows.sort(key=lambda row: (-row["samples"], row["pid"], row["stack"]))
        table = rows_to_table(rows, SCHEMA)
        self._write_extras(rows, window)
        for pid, process, function, share in hot_functions(rows)[:5]:
            findings.append(finding(NAME, "info", f"{process or 'pid'} ({pid}): {function}",
                                    f"on top of the stack (running its own code) in {100 * share:.0f}% of "
                                    "the process's samples",
                                    "optimise or move this function off the latency-critical thread; "
                                    "see stacks.svg"))
        tables = {NAME: table}
        if findings:
            tables["findings"] = findings_table(findings)
        return tables

    def _read(self, sampler: _Sampler, comm_of: dict[int, str]) -> tuple[list[dict], str, list[dict], bool]:
        """Rows from one sampler, a status note (target exited, failure), findings, and whether
        the sampler failed (as opposed to sampling an idle target)."""
        pid_text = ", ".join(f"{pid} ({comm_of.get(pid, '')})" if comm_of.get(pid) else str(pid)
                             for pid in sampler.pids)
        notes = list(sampler.notes)
        findings: list[dict] = []
        rows: list[dict] = []
        if sampler.source == "py-spy":
            document = None
            if sampler.output.exists():
                try:
                    document = json.loads(sampler.output.read_text())
                except ValueError:
                    document = None
            if document is None:
                return [], pyspy_failure_reason(sampler.stderr, sampler.pids[0], comm_of.get(sampler.pids[0], "")), [], True
            rows = pyspy_speedscope_rows(document, sampler.pids[0])
            self._timelines.extend(pyspy_timeline_rows(document, sampler.pids[0]))
            samples, errors = pyspy_sample_counts(sampler.stderr)
            if samples and errors / (samples + errors) > SAMPLE_ERROR_WARN_SHARE and not self.blocking:
                findings.append(finding(NAME, "info", f"pid {pid_text}",
                                        f"{errors} of {samples + errors} non-blocking samples could not be read",
                                        "rerun with --blocking for exact stacks (pauses the target per sample)"))
            if pyspy_target_exited(sampler.stderr):
                exited = f" after {sampler.exited_at_s:.1f} s" if sampler.exited_at_s is not None else ""
                notes.append(f"pid {pid_text} exited{exited}; kept the {sum(r['samples'] for r in rows)} "
                             "samples taken so far")
        else:
            if not sampler.output.exists() or sampler.output.stat().st_size == 0:
                return [], perf_failure_reason(sampler.stderr, sampler.pids), [], True
            try:
                script = children.run([find_perf(), "script", "-i", str(sampler.output),
                                         "-F", "comm,pid,tid,ip,sym,dso"],
                                        capture_output=True, text=True, timeout=30, errors="replace")
            except subprocess.TimeoutExpired:
                return [], "perf script took over 30 s to resolve symbols; native stacks dropped", [], True
            rows = perf_script_rows(script.stdout)
            if not rows and sampler.process.returncode not in (0, -signal.SIGINT):
                return [], perf_failure_reason(sampler.stderr + script.stderr, sampler.pids), [], True
            gone = [pid for pid in sampler.pids if not self.host.pid_exists(pid)]
            if gone:
                notes.append(f"pid {', '.join(map(str, gone))} exited during the window; kept "
                             f"{sum(r['samples'] for r in rows)} native samples taken so far")
        for row in rows:
            row["source"] = sampler.source
        return rows, "; ".join(notes), findings, False

    def _write_extras(self, rows: list[dict], window: Window) -> None:
        from core.atomic import write_json_atomic, write_text_atomic
        from reports.flamegraph import flamegraph_svg, speedscope_profile

        total = sum(row["samples"] for row in rows)
        pids = sorted({row["pid"] for row in rows}) or [target.pid for target in self.targets]
        title = "stacks: " + ", ".join(f"{self.host.read_optional(f'/proc/{pid}/comm') or 'pid'} {pid}"
                                       for pid in pids[:4]) + (" ..." if len(pids) > 4 else "")
        mode = "blocking" if self.blocking else "non-blocking"
        subtitle = (f"{total:,} samples at {self.rate_hz} Hz over {window.elapsed():.1f} s "
                    f"({', '.join(sorted({row['source'] for row in rows}))}, {mode}, threads: {self.thread_mode})")
        write_text_atomic(flamegraph_svg(graph_stacks(rows), title=title, subtitle=subtitle),
                          window.extra_path("stacks.svg"))
        # py-spy's samples in time order (its own weights, in seconds); perf's stay aggregated.
        process_of = {row["pid"]: row.get("process") for row in rows}
        timeline = [{**row, "process": process_of.get(row["pid"])} for row in self._timelines]
        ordered = timeline + [row for row in rows if row["source"] != "py-spy"]
        profiles = speedscope_profiles(ordered)
        units = {label: "seconds" for label in speedscope_profiles(timeline)}
        write_json_atomic(speedscope_profile(profiles, name=title, units=units),
                          window.extra_path("stacks.speedscope.json"))

    @staticmethod
    def headlines(tables: dict[str, pa.Table]) -> list[str]:
        table = tables.get(NAME)
        if table is None or table.num_rows == 0:
            return []
        rows = table.select(["pid", "process", "stack", "samples", "source"]).to_pylist()
        total = sum(row["samples"] for row in rows)
        lines = [f"stacks: {total:,} samples from {len({row['pid'] for row in rows})} process(es); see stacks.svg"]
        for pid, process, function, share in hot_functions(rows, 0.0)[:3]:
            lines.append(f"  {100 * share:5.1f}%  {function}  [{process or 'pid'} {pid}]")
        return lines
