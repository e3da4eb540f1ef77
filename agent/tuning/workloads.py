"""Where `tune experiment` gets its latency samples: one measuring window at a time.

    --workload CMD   a command (split like a shell would, not run by one: the child is the
                     command itself, so the kernel kills it with the agent) started for each
                     window and stopped at its end (SIGTERM, then SIGKILL), or ending by itself.
                     It prints one sample per line: an integer number of ns, or a JSON object
                     with one of latency_ns, latency_us, latency_ms (a number).
    --kpi-url URL    HTTP GETs timed request -> full response by the rollout's KPI collector.
    --kpi NAME       built-ins: loopback-rtt and syscall (agent/tuning/kpi_builtin.py, read like a
                     --workload command), timer-jitter (the jitter meter: oslat's loop gaps where
                     rt-tests is installed, else the Python busy loop of probes/jitter_loop.py).

Each workload's check() runs before anything is changed on the host: a command that prints
nothing or garbage, or a URL that refuses, is bad input and the experiment stops right there.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from core.children import spawn
from core.errors import BadInput, WorkFailed

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
BUILTIN_KPIS = ("loopback-rtt", "timer-jitter", "syscall")
JSON_FIELDS_NS = (("latency_ns", 1), ("latency_us", 1_000), ("latency_ms", 1_000_000))
# A window keeps at most this many samples (evenly thinned past it): the loopback built-in makes
# ~50 000 a second, and the gate's tests need thousands, not millions, to resolve a few percent.
MAX_SAMPLES_PER_WINDOW = 50_000
CHECK_WINDOW_S = 1.0
CHECK_SAMPLES = 20  # the check stops once the workload has shown this many good lines
START_GRACE_S = 5.0
STOP_GRACE_S = 2.0
# oslat puts every loop iteration in a 1 us bucket; gaps of at least this many us are the jitter
# samples (a 1-bucket "gap" is the loop itself running).
JITTER_MIN_GAP_US = 2
PYTHON_JITTER_THRESHOLD_NS = 5_000


def parse_sample(line: str) -> int | None:
    """One output line -> ns, None for a blank line; ValueError for anything else."""
    text = line.strip()
    if not text:
        return None
    if text.lstrip("-").isdigit():
        value = int(text)
    else:
        try:
            record = json.loads(text)
        except ValueError:
            raise ValueError(text) from None
        if not isinstance(record, dict):
            raise ValueError(text)
        for name, scale in JSON_FIELDS_NS:
            number = record.get(name)
            if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number):
                value = int(round(number * scale))
                break
        else:
            raise ValueError(text)
    if value < 0:
        raise ValueError(text)
    return value


def thin(samples: list[int], limit: int = MAX_SAMPLES_PER_WINDOW) -> list[int]:
    if len(samples) <= limit:
        return samples
    picks = np.linspace(0, len(samples) - 1, limit).astype(np.int64)
    return [samples[i] for i in picks]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # The crash tests' kill point is for the agent itself, not for its workload's children.
    env.pop("GUARDIAN_AGENT_TEST_KILL_AT", None)
    return env


class CommandWorkload:
    """A command printing one latency per line, run for each window."""

    def __init__(self, command: str, label: str | None = None, metric: str = "latency"):
        try:
            self.argv = shlex.split(command)
        except ValueError as error:
            raise BadInput(f"--workload {command!r}: {error}") from None
        if not self.argv:
            raise BadInput("--workload: empty command")
        if shutil.which(self.argv[0]) is None:
            raise BadInput(f"--workload: {self.argv[0]}: command not found")
        self.name = label or command
        self.metric = metric
        self.option = "--workload" if label is None else "--kpi"

    def check(self, window_s: float) -> None:
        samples = self.measure(min(window_s, CHECK_WINDOW_S), checking=True)
        if not samples:
            raise BadInput(f"{self.option} {self.name!r} printed no latency sample within {START_GRACE_S:g} s "
                           "(one integer ns, or a JSON line with latency_ns/latency_us/latency_ms, per line)")

    def measure(self, window_s: float, checking: bool = False) -> list[int]:
        process = spawn(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env=child_env())
        samples: list[int] = []
        pending = b""
        try:
            # The window starts at the first sample, so a command's start-up (an interpreter
            # loading) costs no samples; a command silent for START_GRACE_S gives up.
            deadline = time.monotonic() + window_s + START_GRACE_S
            descriptor = process.stdout.fileno()
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ready, _, _ = select.select([descriptor], [], [], remaining)
                if not ready:
                    break
                chunk = os.read(descriptor, 1 << 16)
                if not chunk:
                    break  # the command ended by itself
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                had_samples = bool(samples)
                for raw in lines:
                    self._add(samples, raw, checking)
                if samples and not had_samples:
                    deadline = time.monotonic() + window_s
                if checking and len(samples) >= CHECK_SAMPLES:
                    break
        finally:
            stderr = self._stop(process)
        if process.returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL) and not samples:
            why = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {process.returncode}"
            error = BadInput if checking else WorkFailed
            raise error(f"{self.option} {self.name!r} failed: {why[:200]}")
        return thin(samples)

    def _add(self, samples: list[int], raw: bytes, checking: bool) -> None:
        line = raw.decode(errors="replace")
        try:
            value = parse_sample(line)
        except ValueError:
            error = BadInput if checking else WorkFailed
            raise error(f"{self.option} {self.name!r} printed {line.strip()[:60]!r}: not a latency (one integer "
                        "ns, or a JSON line with latency_ns/latency_us/latency_ms, per line)") from None
        if value is not None:
            samples.append(value)

    @staticmethod
    def _stop(process: subprocess.Popen) -> str:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        process.stderr.close()
        return stderr[-2000:]


class BuiltinCommand(CommandWorkload):
    """loopback-rtt and syscall: agent/tuning/kpi_builtin.py, told how long each window is."""

    def __init__(self, name: str):
        super().__init__(shlex.join([sys.executable, "-m", "agent.tuning.kpi_builtin", name,
                                     "--duration-s", "1"]), label=name,
                         metric={"loopback-rtt": "round trip", "syscall": "syscall"}[name])
        self.kpi = name

    def measure(self, window_s: float, checking: bool = False) -> list[int]:
        self.argv[-1] = f"{window_s:.3f}"
        # The child stops itself at the end of the window, timed from its own start.
        return super().measure(window_s, checking)


class TimerJitter:
    """The jitter meter's loop gaps on one CPU: the last CPU this process may run on (it is kept
    100% busy for each window, as oslat itself does)."""

    name = "timer-jitter"
    metric = "timer jitter"

    def __init__(self):
        self.cpu = max(os.sched_getaffinity(0))
        self.native = shutil.which("oslat") is not None

    def check(self, window_s: float) -> None:
        if not self.measure(min(window_s, CHECK_WINDOW_S), checking=True):
            raise WorkFailed(f"--kpi timer-jitter: no loop gap measured on cpu {self.cpu}")

    def measure(self, window_s: float, checking: bool = False) -> list[int]:
        if self.native:
            return thin(self._oslat(max(1, round(window_s))))
        return thin(self._python_loop(window_s))

    def _oslat(self, duration_s: int) -> list[int]:
        from probes.jitter import oslat_command

        with tempfile.TemporaryDirectory(prefix="guardian-tune-") as directory:
            report_path = os.path.join(directory, "oslat.json")
            process = spawn(oslat_command([self.cpu], duration_s, report_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
            _, stderr = process.communicate(timeout=duration_s + 30)
            if process.returncode != 0 or not os.path.exists(report_path):
                raise WorkFailed(f"--kpi timer-jitter: oslat failed: {stderr.decode(errors='replace').strip()[-200:]}")
            report = json.loads(Path(report_path).read_text())
        samples: list[int] = []
        for thread in report.get("thread", {}).values():
            for bucket_us, count in sorted((int(k), int(v)) for k, v in thread.get("histogram", {}).items()):
                if bucket_us >= JITTER_MIN_GAP_US and count:
                    samples.extend([bucket_us * 1000] * count)
        return samples

    def _python_loop(self, window_s: float) -> list[int]:
        process = spawn([sys.executable, "-m", "probes.jitter_loop", "--cpu", str(self.cpu),
                         "--duration-ns", str(int(window_s * 1e9)), "--threshold-ns", str(PYTHON_JITTER_THRESHOLD_NS)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
        stdout, stderr = process.communicate(timeout=window_s + 30)
        try:
            return [int(gap) for gap in json.loads(stdout)["gaps_ns"]]
        except (ValueError, KeyError):
            raise WorkFailed(f"--kpi timer-jitter: the busy loop failed: {stderr.decode(errors='replace')[-200:]}") from None


class UrlWorkload:
    """HTTP GETs through the rollout's KPI collector, every response counted for the current arm
    (the tuned host serves them all: no version header to tell blue from green)."""

    metric = "HTTP latency"

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise BadInput(f"--kpi-url {url!r}: expected http://HOST[:PORT]/PATH")
        try:
            parts.port
        except ValueError:
            raise BadInput(f"--kpi-url {url!r}: bad port") from None
        self.url = url
        self.name = url

    def check(self, window_s: float) -> None:
        parts = urlsplit(self.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=2.0)
        try:
            connection.request("GET", parts.path or "/")
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise BadInput(f"--kpi-url {self.url}: {reason}") from None
        finally:
            connection.close()
        if response.status >= 500:
            raise BadInput(f"--kpi-url {self.url}: answers HTTP {response.status}")

    def measure(self, window_s: float, checking: bool = False) -> list[int]:
        from agent.rollout.collector import LoadCollector
        from agent.rollout.plan import KpiSettings

        class ArmCollector(LoadCollector):
            def record(self, served_by, stage, wall_ns, latency_ns, status, request_bytes, response_bytes):
                super().record("experiment", stage, wall_ns, latency_ns, status, request_bytes, response_bytes)

        collector = ArmCollector(KpiSettings(url=self.url, concurrency=2), "experiment", "unused")
        collector.start()
        try:
            time.sleep(window_s)
        finally:
            collector.stop()
        samples = collector.snapshot()
        errors = sum(1 for s in samples if s.error) + collector.unattributed.total
        if errors > len(samples) // 2:
            raise WorkFailed(f"--kpi-url {self.url}: {errors} of {len(samples) + collector.unattributed.total} "
                             "requests failed in one window")
        return thin([s.latency_ns for s in samples if not s.error])


def make_workload(command: str | None, url: str | None, builtin: str | None):
    given = [value for value in (command, url, builtin) if value]
    if len(given) != 1:
        raise BadInput("give exactly one of --workload CMD, --kpi-url URL, --kpi NAME")
    if command:
        return CommandWorkload(command)
    if url:
        return UrlWorkload(url)
    if builtin == "timer-jitter":
        return TimerJitter()
    if builtin in BUILTIN_KPIS:
        return BuiltinCommand(builtin)
    raise BadInput(f"--kpi {builtin!r}: unknown (known: {', '.join(BUILTIN_KPIS)})")
