"""An nft table that dies with the agent: `flags owner`, held open by a child `nft -i`.

nftables (kernel >= 5.12, nft >= 0.9.9) deletes a table created with `flags owner` as soon as
the netlink socket that created it closes, and refuses changes to it from any other socket. The
socket belongs to an interactive `nft -i` child started with PR_SET_PDEATHSIG: when the agent is
SIGKILLed the child is killed, its socket closes and the kernel drops the table and every rule
in it, with nobody running a command. Removal is the same path: end the child.

Each table is built in one line, which `nft -i` commits as one transaction: either every rule of
the fault is live or none is.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import subprocess
import time

from core.errors import Unavailable, WorkFailed

from .base import end_process_group, process_identity, spawn_owned

NFT_FAMILY = "inet"


def nft_binary() -> str | None:
    return shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)


def nft_availability() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs CAP_NET_ADMIN (run as root)"
    if nft_binary() is None:
        return False, "nft not installed: apt-get install nftables"
    return True, ""


def table_exists(name: str) -> bool:
    binary = nft_binary()
    if binary is None:
        return False
    done = subprocess.run([binary, "list", "table", NFT_FAMILY, name], capture_output=True, text=True)
    return done.returncode == 0


class OwnedTable:
    """One `flags owner` table, its lifetime tied to a PDEATHSIG `nft -i` child."""

    def __init__(self, name: str, marker: str | None = None):
        self.name = name
        self.marker = marker
        self.child: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the holder child ahead of time (nft's own startup then costs apply() nothing)."""
        available, reason = nft_availability()
        if not available:
            raise Unavailable(reason)
        self.child = spawn_owned([nft_binary(), *(["-I", self.marker] if self.marker else []), "-i"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, helper=True)
        for stream in (self.child.stdout, self.child.stderr):
            fcntl.fcntl(stream, fcntl.F_SETFL, fcntl.fcntl(stream, fcntl.F_GETFL) | os.O_NONBLOCK)

    def create(self, body: str, timeout_s: float = 2.0) -> dict:
        """Create `table inet NAME { flags owner; BODY }` in one transaction; returns the child's
        identity for the journal. Raises WorkFailed with nft's own message if nft refused it."""
        if self.child is None:
            self.start()
        line = f"add table {NFT_FAMILY} {self.name} {{ flags owner; {body} }}"
        # `list table` after the change is the barrier: its output appears only once the
        # transaction before it was answered by the kernel.
        self.child.stdin.write(line.replace("\n", " ") + "\n")
        self.child.stdin.write(f"list table {NFT_FAMILY} {self.name}\n")
        self.child.stdin.flush()
        output, errors = self._read_until_listed(timeout_s)
        if "Error" in errors or f"table {NFT_FAMILY} {self.name}" not in output:
            self.destroy()
            message = " ".join(errors.split())[:400] or "no answer from nft -i"
            raise WorkFailed(f"nft refused the fault's rules: {message}")
        return process_identity(self.child.pid)

    def _read_until_listed(self, timeout_s: float) -> tuple[str, str]:
        output, errors = "", ""
        deadline = time.monotonic() + timeout_s
        streams = [self.child.stdout, self.child.stderr]
        while time.monotonic() < deadline:
            ready, _, _ = select.select(streams, [], [], max(0.0, deadline - time.monotonic()))
            for stream in ready:
                chunk = stream.read() or ""
                if stream is self.child.stdout:
                    output += chunk
                else:
                    errors += chunk
            if "\n}" in output or "Error" in errors or self.child.poll() is not None:
                # Error lines come in several pieces (message, rule, caret line): let them land.
                if "Error" in errors:
                    time.sleep(0.02)
                    errors += self.child.stderr.read() or ""
                break
        return output, errors

    def destroy(self) -> None:
        if self.child is None:
            return
        end_process_group(process_identity(self.child.pid))
        try:
            self.child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.child.stdin, self.child.stdout, self.child.stderr):
            try:
                stream.close()
            except (OSError, BrokenPipeError):
                pass
        self.child = None

