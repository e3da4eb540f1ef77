"""Shared test fixtures.

Live tests (marked `live`) run against the real kernel, real servers and real processes. They
need root; when that is missing they skip and say why, loudly. In CI and on a developer's root
shell they run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
VENV_BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="LIVE TEST SKIPPED: needs root (eBPF, ptrace, /proc/sys writes); run `make test` as root")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_agent(*args: str, timeout: float = 120, env: dict | None = None, cwd: Path | None = None,
              input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess (the way users and controllers call it)."""
    command = [sys.executable, "-m", "agent.cli", *args]
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or PROJECT_ROOT, input=input_text)


@pytest.fixture
def agent_cli():
    return run_agent


@pytest.fixture
def cli_runner():
    """Click's in-process runner bound to our main() error handling."""
    from click.testing import CliRunner

    from agent.cli import main

    class Runner:
        def invoke(self, args: list[str]):
            runner = CliRunner()

            def entry():
                main(args)

            import click

            command = click.Command("guardian-agent", callback=entry)
            return runner.invoke(command, [], catch_exceptions=False)

    return Runner()


# Child-script source: a loopback server answering "ping" with "pong" on a thread, and `client`,
# one connection to it (the tcp probe then has a connection with sRTT samples).
LOOPBACK_PING_PONG = """
import socket, threading
server = socket.create_server(("127.0.0.1", 0))
def serve():
    peer, _ = server.accept()
    while peer.recv(64):
        peer.sendall(b"pong")
threading.Thread(target=serve, daemon=True).start()
client = socket.create_connection(server.getsockname())
"""

SYSCALL_LOAD = """
import os, sys, time
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    for _ in range(50):
        os.getppid()
    if client is not None:
        client.sendall(b"ping")
        client.recv(64)
    time.sleep(0.005)
"""


@contextmanager
def syscall_load(max_s: float = 60.0, tcp: bool = False):
    """A child that makes getppid bursts and 5 ms naps for at most MAX_S seconds (it stops by
    itself; leaving the block kills it sooner). The syscalls probe leaves out the agent's own
    calls, and a CI container may run nothing else: tests that expect rows bring their own load
    and check that its pid shows up. With `tcp`, each round is also a loopback ping/pong on one
    connection (for the tcp probe). Yields the child's pid."""
    source = (LOOPBACK_PING_PONG if tcp else "client = None\n") + SYSCALL_LOAD
    child = subprocess.Popen([sys.executable, "-c", source, str(max_s)])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


@pytest.fixture
def s3_server(free_port, monkeypatch):
    """A real S3 server (moto's) on a free loopback port, with test credentials in the env."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed: run `make setup`")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)

    class Server:
        endpoint = f"http://127.0.0.1:{free_port}"

        def __init__(self):
            self.server = None

        def start(self):
            # moto keeps its buckets in this process, so a stop/start is an outage, not a wipe.
            self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port, verbose=False)
            self.server.start()

        def stop(self):
            self.server.stop()
            self.server = None

    def reset():
        # moto keeps every bucket in this process across tests: start each test from an empty store.
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{Server.endpoint}/moto-api/reset", method="POST"),
                               timeout=10).close()

    server = Server()
    server.start()
    reset()
    yield server
    if server.server is not None:
        reset()
        server.stop()


@pytest.fixture
def tiny_tmpfs():
    """A real tmpfs of 64 KiB: writes fail with ENOSPC exactly as on a full /var (disk-full tests)."""
    mount = Path(f"/tmp/guardian-tmpfs-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
        mount.rmdir()


def fill_filesystem(directory: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem holding `directory` with one file, then free `leave_bytes` of it."""
    filler = directory / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while os.write(fd, b"\0" * 4096) == 4096:
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave_bytes))
    return filler
