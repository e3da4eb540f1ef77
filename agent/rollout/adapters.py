"""Traffic adapters: move a share of traffic between blue and green.

HAProxy: the runtime API on its admin socket (`stats socket ... level admin`), so a weight change
is one write and takes effect for the next request, no reload. Weights are percentages
(green = w, blue = 100 - w); HAProxy accepts 0..256 and roundrobin honours them dynamically.
Command: any other balancer, through a command template with {blue} and {green}.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import time

from core.errors import BadInput, WorkFailed
from agent.rollout.plan import TrafficSettings


class TrafficAdapter:
    def check(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def set_weights(self, blue_pct: float, green_pct: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def all_to_blue(self) -> None:
        self.set_weights(100, 0)


class HAProxyAdapter(TrafficAdapter):
    def __init__(self, settings: TrafficSettings):
        self.settings = settings

    def command(self, line: str) -> str:
        """One runtime API command over a fresh connection (the non-interactive mode)."""
        address = self.settings.socket
        try:
            if address.startswith("ipv4@") or (":" in address and not address.startswith("/")):
                host, port = address.removeprefix("ipv4@").rsplit(":", 1)
                connection = socket.create_connection((host, int(port)), timeout=self.settings.timeout_s)
            else:
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                connection.settimeout(self.settings.timeout_s)
                connection.connect(address)
        except (OSError, ValueError) as error:
            raise WorkFailed(f"haproxy admin socket {address}: {error}") from None
        with connection:
            connection.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace").strip()

    def weight(self, server: str) -> int:
        answer = self.command(f"get weight {self.settings.backend}/{server}")
        try:
            return int(answer.split()[0])
        except (ValueError, IndexError):
            raise WorkFailed(f"haproxy: get weight {self.settings.backend}/{server}: {answer!r}") from None

    def check(self) -> None:
        weights = {}
        for server in (self.settings.blue, self.settings.green):
            try:
                weights[server] = self.weight(server)
            except WorkFailed as error:
                raise BadInput(f"traffic: {error}") from None
        # Prove, before any step runs, that the socket is at admin level and that the backend's
        # algorithm takes intermediate weights at runtime (static-rr and consistent hashing accept
        # only 0% and 100%). While green has weight 0, nudging blue's weight moves no traffic.
        blue, current = self.settings.blue, weights[self.settings.blue]
        probe = current - 1 if weights[self.settings.green] == 0 and current >= 2 else current
        answer = self.command(f"set server {self.settings.backend}/{blue} weight {probe}")
        if probe != current:
            self.command(f"set server {self.settings.backend}/{blue} weight {current}")
        if answer:
            raise BadInput(f"traffic: haproxy refuses runtime weights for {self.settings.backend}/{blue}: "
                           f"{answer.splitlines()[0]}")

    def set_weights(self, blue_pct: float, green_pct: float) -> None:
        # Green first when shifting back to blue, so a failure half-way leaves less on green.
        order = [(self.settings.green, green_pct), (self.settings.blue, blue_pct)]
        if green_pct > 0:
            order.reverse()
        for server, weight in order:
            answer = self.command(f"set server {self.settings.backend}/{server} weight {int(round(weight))}")
            if answer:
                raise WorkFailed(f"haproxy: set weight {self.settings.backend}/{server}: {answer}")


class CommandAdapter(TrafficAdapter):
    def __init__(self, settings: TrafficSettings):
        self.settings = settings

    def check(self) -> None:
        import shutil

        program = shlex.split(self.settings.set_weights)[0]
        if shutil.which(program) is None:
            raise BadInput(f"traffic.set_weights: {program!r} not found on PATH")

    def set_weights(self, blue_pct: float, green_pct: float) -> None:
        command = [part.format(blue=f"{blue_pct:g}", green=f"{green_pct:g}")
                   for part in shlex.split(self.settings.set_weights)]
        started = time.monotonic()
        try:
            from core.children import run

            result = run(command, capture_output=True, text=True, timeout=self.settings.timeout_s)
        except subprocess.TimeoutExpired:
            raise WorkFailed(f"traffic command timed out after {self.settings.timeout_s:g} s") from None
        except OSError as error:
            raise WorkFailed(f"traffic command: {error}") from None
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            raise WorkFailed(f"traffic command exit {result.returncode} after "
                             f"{time.monotonic() - started:.1f} s: {tail[0]}")


def make_adapter(settings: TrafficSettings) -> TrafficAdapter:
    if settings.adapter == "haproxy":
        return HAProxyAdapter(settings)
    if settings.adapter == "command":
        return CommandAdapter(settings)
    raise BadInput(f"traffic.adapter: unknown adapter {settings.adapter!r}")


def adapter_from_dict(data: dict) -> TrafficAdapter:
    return make_adapter(TrafficSettings(**data))
