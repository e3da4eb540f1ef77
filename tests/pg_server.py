"""A throwaway PostgreSQL 15 server for tests and benchmarks (importable by anyone).

    with PgServer(statement_logging=True) as server:
        server.psql("SELECT 1")
        server.pgbench("-i", "-s", "1")
        server.log_paths()   # {"stderr": Path, "csv": Path, "json": Path}

initdb runs as the `postgres` user in a temp dir; the server listens on a free loopback port and a
unix socket inside that dir, with pg_stat_statements preloaded and (optionally) every statement
logged to stderr, csvlog and jsonlog at once, so a test can compare the three formats entry for
entry. Durability is switched off (fsync, synchronous_commit): these servers hold nothing worth
keeping and the tests share two cores.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path(os.environ.get("GUARDIAN_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"
# A password-protected role so tests can exercise scram auth (and its failure) on loopback.
AUDITOR_ROLE = "auditor"
AUDITOR_PASSWORD = "s3cret-auditor-pw"
DEFAULT_PREFIX = "%m [%p] %q%u@%d "


def postgres_available() -> str | None:
    """None when a server can be started here, else the reason (for a loud skip)."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql-15)"
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        return f"no '{SERVER_USER}' system user (installed with the postgresql package)"
    if os.geteuid() != 0:
        return "needs root to run initdb as the postgres user"
    return None


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgServer:
    def __init__(self, statement_logging: bool = True, log_line_prefix: str = DEFAULT_PREFIX,
                 extra_settings: dict[str, str] | None = None, base_dir: Path | None = None):
        self.statement_logging = statement_logging
        self.log_line_prefix = log_line_prefix
        self.extra_settings = dict(extra_settings or {})
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="guardian-pg-"))
        self.data_dir = self.base_dir / "data"
        self.log_dir = self.base_dir / "log"
        self.socket_dir = self.base_dir / "socket"
        self.port = 0
        self.started = False
        self._account = pwd.getpwnam(SERVER_USER)

    # -- lifecycle -------------------------------------------------------------------------------
    def _as_postgres(self, command: list[str], timeout: float = 120, check: bool = True,
                     input_text: str | None = None) -> subprocess.CompletedProcess:
        def demote() -> None:
            os.setgroups([])
            os.setgid(self._account.pw_gid)
            os.setuid(self._account.pw_uid)

        result = subprocess.run(command, preexec_fn=demote, capture_output=True, text=True,
                                timeout=timeout, cwd=self.base_dir, input=input_text,
                                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PGTZ": "UTC"})
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} failed ({result.returncode}): "
                               f"{result.stderr.strip()[-2000:]}")
        return result

    def start(self) -> "PgServer":
        reason = postgres_available()
        if reason:
            raise RuntimeError(reason)
        for directory in (self.base_dir, self.log_dir, self.socket_dir):
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, self._account.pw_uid, self._account.pw_gid)
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data_dir), "-U", SERVER_USER,
                           "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"])
        self.port = free_loopback_port()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "shared_preload_libraries": "'pg_stat_statements'",
            "pg_stat_statements.track": "'top'",
            "track_io_timing": "on",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "64MB",
            "max_connections": "40",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "logging_collector": "on",
            "log_destination": "'stderr,csvlog,jsonlog'",
            "log_directory": f"'{self.log_dir}'",
            "log_filename": "'postgresql.log'",
            "log_rotation_age": "0",
            "log_rotation_size": "0",
            "log_line_prefix": f"'{self.log_line_prefix}'",
            "log_min_duration_statement": "0" if self.statement_logging else "-1",
            "log_autovacuum_min_duration": "-1",
            "log_checkpoints": "off",
        }
        settings.update(self.extra_settings)
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# guardian-agent test server\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")
        # Superuser trusted on loopback (test plumbing); every other role must use scram.
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {SERVER_USER} 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60",
                           "-l", str(self.base_dir / "pg_ctl.log"), "start"])
        self.started = True
        self.psql(f"CREATE ROLE {AUDITOR_ROLE} LOGIN PASSWORD '{AUDITOR_PASSWORD}' "
                  "IN ROLE pg_read_all_stats, pg_monitor")
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return self

    def stop(self) -> None:
        if self.started:
            self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                               "stop"], check=False)
            self.started = False
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "PgServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- using it --------------------------------------------------------------------------------
    def dsn(self, user: str = SERVER_USER, database: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres", timeout: float = 120) -> str:
        """Run SQL through psql over the unix socket; returns unaligned, tuples-only output."""
        result = self._as_postgres([str(PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                    "-h", str(self.socket_dir), "-p", str(self.port), "-d", database,
                                    "-U", SERVER_USER, "-f", "-"], timeout=timeout, input_text=sql)
        return result.stdout.strip()

    def pgbench(self, *args: str, database: str = "postgres", timeout: float = 300) -> str:
        result = self._as_postgres([str(PG_BIN / "pgbench"), "-h", str(self.socket_dir), "-p",
                                    str(self.port), "-U", SERVER_USER, *args, database], timeout=timeout)
        return result.stdout + result.stderr

    def log_paths(self) -> dict[str, Path]:
        return {"stderr": self.log_dir / "postgresql.log", "csv": self.log_dir / "postgresql.csv",
                "json": self.log_dir / "postgresql.json"}

    def mark_logs(self, timeout_s: float = 20.0) -> str:
        """Log a unique statement and wait until every log file holds it, so a reader sees the
        logging collector's output complete up to this point."""
        marker = f"guardian_marker_{time.monotonic_ns()}"
        self.psql(f"SELECT '{marker}'")
        deadline = time.monotonic() + timeout_s
        paths = [p for p in self.log_paths().values()]
        while time.monotonic() < deadline:
            if all(p.exists() and marker.encode() in p.read_bytes()[-65536:] for p in paths):
                return marker
            time.sleep(0.05)
        raise RuntimeError(f"log marker did not reach every log file within {timeout_s} s")
