"""Traffic adapters: move a share of traffic between blue and green.

HAProxy: the runtime API on its admin socket (`stats socket ... level admin`), so a weight change
is one write and takes effect for the next request, no reload. Weights are percentages
(green = w, blue = 100 - w); HAProxy accepts 0..256 and roundrobin honours them dynamically.
Command: any other balancer, through a command template with {blue} and {green}.

Both are read back (`observe`): the driver never trusts its own last write. HAProxy says each
server's weight, health state (UP / DOWN / MAINT / "no check") and its own pid and uptime, so a
restart (weights back to the config file's) or a DOWN green is seen at the next evaluation.
"""

from __future__ import annotations

import csv
import io
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass

from core.errors import BadInput, WorkFailed
from agent.rollout.plan import TrafficSettings


# HAProxy 2.6 `show stat` server status values that route traffic. "no check" means HAProxy does
# not health-check the server: it routes to it blindly, and the driver says so in `--check`.
ROUTABLE_STATES = ("UP", "no check")


@dataclass
class ServerView:
    weight: float | None  # None: the balancer cannot say
    state: str  # UP, DOWN, MAINT, DRAIN, NOLB, "no check", or "unknown"

    @property
    def routable(self) -> bool:
        # "UP 1/3" is going down (one failed check), "DOWN 1/2" is coming up: only a plain UP counts.
        return self.state in ROUTABLE_STATES or self.state == "unknown"


@dataclass
class BalancerView:
    """What the balancer itself says, read back after every write and at every evaluation."""
    blue: ServerView
    green: ServerView
    instance: str = ""  # HAProxy's pid: changes when the balancer restarts or reloads
    uptime_s: float | None = None  # goes back to 0 on a restart

    def as_dict(self) -> dict:
        return {"blue": self.blue.__dict__, "green": self.green.__dict__, "instance": self.instance,
                "uptime_s": self.uptime_s}

    def restarted_since(self, earlier: "BalancerView | None") -> bool:
        if earlier is None:
            return False
        if earlier.instance and self.instance != earlier.instance:
            return True
        return None not in (earlier.uptime_s, self.uptime_s) and self.uptime_s + 1 < earlier.uptime_s


class TrafficAdapter:
    # Whether weights must be whole numbers (HAProxy's runtime weights are integers 0..256).
    integer_weights = False

    def check(self) -> list[str]:  # pragma: no cover - interface
        """Connect to the balancer; raise BadInput when it cannot be driven; return warnings."""
        raise NotImplementedError

    def observe(self) -> BalancerView | None:
        """The balancer's own view of both servers, or None when it cannot be read back."""
        return None

    def set_weights(self, blue_pct: float, green_pct: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def all_to_blue(self) -> None:
        self.set_weights(100, 0)


class HAProxyAdapter(TrafficAdapter):
    integer_weights = True

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

    def server_states(self) -> dict[str, tuple[str, float | None]]:
        """{server: (status, weight)} of the backend, from `show stat` (CSV)."""
        answer = self.command(f"show stat {self.settings.backend} 4 -1")
        if not answer.startswith("# "):
            raise WorkFailed(f"haproxy: show stat {self.settings.backend}: {answer.splitlines()[:1]}")
        rows = csv.DictReader(io.StringIO(answer[2:]))
        states = {}
        for row in rows:
            if row.get("pxname") == self.settings.backend and row.get("svname") not in (None, "BACKEND"):
                states[row["svname"]] = (row.get("status", "unknown"), None)
        return states

    def instance(self) -> tuple[str, float | None]:
        """(process identity, uptime in s): a restart or a reload (new worker) changes the pid."""
        info = dict(line.split(": ", 1) for line in self.command("show info").splitlines() if ": " in line)
        uptime = info.get("Uptime_sec", "")
        return f"pid {info.get('Pid', '?')}", float(uptime) if uptime.isdigit() else None

    def observe(self) -> BalancerView:
        states = self.server_states()
        views = {}
        for role in ("blue", "green"):
            server = getattr(self.settings, role)
            if server not in states:
                raise WorkFailed(f"haproxy: backend {self.settings.backend} has no server {server!r} "
                                 f"(servers: {', '.join(sorted(states)) or 'none'})")
            views[role] = ServerView(float(self.weight(server)), states[server][0])
        instance, uptime_s = self.instance()
        return BalancerView(views["blue"], views["green"], instance, uptime_s)

    def check(self) -> list[str]:
        weights = {}
        for server in (self.settings.blue, self.settings.green):
            try:
                weights[server] = self.weight(server)
            except WorkFailed as error:
                raise BadInput(f"traffic: {error}") from None
        try:
            view = self.observe()
        except WorkFailed as error:
            raise BadInput(f"traffic: {error}") from None
        notes = []
        for role in ("blue", "green"):
            if getattr(view, role).state == "no check":
                notes.append(f"haproxy does not health-check {self.settings.backend}/{getattr(self.settings, role)} "
                             "(add `check` and `option httpchk`): a DOWN server cannot be seen")
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
        return notes

    def set_weights(self, blue_pct: float, green_pct: float) -> None:
        # The larger target first: between the two writes one server always has a weight (blue 0
        # then green 100 would leave HAProxy nothing to route to: 503s on a 100% flip), and a
        # rollback raises blue before it empties green.
        order = [(self.settings.blue, blue_pct), (self.settings.green, green_pct)]
        if green_pct > blue_pct:
            order.reverse()
        for server, weight in order:
            if weight != int(weight):
                # Never round: 0.4% rounded is 0%, and green would be promoted untested.
                raise BadInput(f"haproxy weights are integers: cannot set {server} to {weight:g}")
            answer = self.command(f"set server {self.settings.backend}/{server} weight {int(weight)}")
            if answer:
                raise WorkFailed(f"haproxy: set weight {self.settings.backend}/{server}: {answer}")


class CommandAdapter(TrafficAdapter):
    def __init__(self, settings: TrafficSettings):
        self.settings = settings

    def check(self) -> list[str]:
        import shutil

        for key in ("set_weights", "get_weights"):
            template = getattr(self.settings, key)
            if template and shutil.which(shlex.split(template)[0]) is None:
                raise BadInput(f"traffic.{key}: {shlex.split(template)[0]!r} not found on PATH")
        if not self.settings.get_weights:
            return ["traffic.get_weights not set: weights cannot be read back, nor green's health"]
        self.observe()
        return []

    def observe(self) -> BalancerView | None:
        """`get_weights` prints "BLUE GREEN" weights, optionally followed by green's state."""
        if not self.settings.get_weights:
            return None
        words = self._run(shlex.split(self.settings.get_weights)).split()
        try:
            blue, green = float(words[0]), float(words[1])
        except (IndexError, ValueError):
            raise WorkFailed(f"traffic.get_weights printed {' '.join(words[:4])!r}, expected BLUE GREEN [STATE]") \
                from None
        green_state = words[2] if len(words) > 2 else "unknown"
        return BalancerView(ServerView(blue, "unknown"), ServerView(green, green_state))

    def set_weights(self, blue_pct: float, green_pct: float) -> None:
        self._run([part.format(blue=f"{blue_pct:g}", green=f"{green_pct:g}")
                   for part in shlex.split(self.settings.set_weights)])

    def _run(self, command: list[str]) -> str:
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
        return result.stdout


def make_adapter(settings: TrafficSettings) -> TrafficAdapter:
    if settings.adapter == "haproxy":
        return HAProxyAdapter(settings)
    if settings.adapter == "command":
        return CommandAdapter(settings)
    raise BadInput(f"traffic.adapter: unknown adapter {settings.adapter!r}")


def adapter_from_dict(data: dict) -> TrafficAdapter:
    return make_adapter(TrafficSettings(**data))
