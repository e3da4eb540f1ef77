"""Shared BCC plumbing for the eBPF probes: prerequisites and one-at-a-time compilation."""

from __future__ import annotations

import os
import sys
import threading
from typing import Iterable

from core.errors import Unavailable, WorkFailed

# BCC's clang front end (its in-memory kernel headers) is not thread-safe: two probes compiling
# at once in the runner's parallel prepare threads make one fail with "'linux/types.h' file not
# found" (seen with BCC 0.26, tcp + syscalls). Every eBPF probe compiles under this lock.
COMPILE_LOCK = threading.Lock()


class quiet_stderr:
    """Send fd 2 to /dev/null while clang runs inside BCC: borrowed kernel headers make it print
    pages of warnings that mean nothing to a user."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False


def compile_program(source: str):
    """Compile and load a BCC program (serialised, warnings silenced)."""
    # BCC on use only: it is optional (Debian's python3-bpfcc), and `probes` runs without it.
    import bcc

    with COMPILE_LOCK, quiet_stderr():
        return bcc.BPF(text=source, cflags=["-Wno-everything"])


class LoadedProgram:
    """Mixin for probes that hold a loaded BCC program in `self._bpf`: one way to let it go."""

    _bpf = None

    def detach(self) -> None:
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None

    def abandon(self) -> None:
        self.detach()

    def close(self) -> None:
        self.detach()


# Where `make setup` unpacks borrowed headers when the running kernel has no package of its own
# (packaging/kernel-headers.sh): unpacked, never installed, so no kernel image comes with them.
BORROWED_HEADERS_DIR = "/var/lib/guardian-agent/kernel-headers"


def kernel_headers_dir(host) -> str | None:
    """The kernel header tree BCC should compile against, or None (then BCC cannot run)."""
    release = host.kernel_release()
    if host.exists(f"/lib/modules/{release}/build"):
        return f"/lib/modules/{release}/build"
    if host.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"  # BCC unpacks the kernel's own headers itself
    borrowed = f"{BORROWED_HEADERS_DIR}/{release}/build"
    if host.exists(f"{borrowed}/include"):
        return borrowed
    return None


def bpf_prerequisites(host, events: Iterable[str]) -> None:
    """Raise Unavailable naming the fix when BCC cannot run here."""
    if os.geteuid() != 0:
        raise Unavailable("needs CAP_BPF and CAP_PERFMON: run as root")
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise Unavailable("BCC not importable: apt-get install python3-bpfcc (and use a venv with "
                          "--system-site-packages)") from None
    headers = kernel_headers_dir(host)
    if headers is None:
        release = host.kernel_release()
        raise Unavailable(f"kernel headers missing: install linux-headers-{release} (or run `make setup`, "
                          "which unpacks borrowed headers into the agent's state directory)")
    if host.is_real and headers.startswith(BORROWED_HEADERS_DIR):
        # BCC reads BCC_KERNEL_SOURCE instead of /lib/modules/R/build (bcc loader, since 0.10).
        os.environ.setdefault("BCC_KERNEL_SOURCE", str(host.path(headers)))
    tracing = "/sys/kernel/tracing/events"
    if not host.exists(tracing):
        if host.exists("/sys/kernel/debug/tracing/events"):
            tracing = "/sys/kernel/debug/tracing/events"
        else:
            raise Unavailable("tracefs not mounted: mount -t tracefs tracefs /sys/kernel/tracing")
    for event in events:
        if not host.exists(f"{tracing}/{event}"):
            raise Unavailable(f"tracepoint {event} missing on this kernel")


def possible_cpu_count() -> int:
    """CPUs a per-CPU map holds a value for (the kernel sizes them by possible, not online, CPUs)."""
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def lookup_batch(table, max_entries: int, key_bytes: int, value_bytes: int,
                 start: int | None = None) -> tuple[bytes, bytes, int]:
    """Read up to `max_entries` entries of a BCC map with BPF_MAP_LOOKUP_BATCH (kernel 5.6+):
    one bpf() call per map instead of one per entry. `value_bytes` is one entry's whole value (a
    per-CPU map: round_up(size, 8) x possible CPUs; BCC 0.26's own items_lookup_batch sizes
    values without the CPUs). An array read starts at index `start`. Returns (keys, values,
    entries read)."""
    import ctypes
    import errno

    from bcc.libbcc import lib

    keys = ctypes.create_string_buffer(max(key_bytes * max_entries, 1))
    values = ctypes.create_string_buffer(max(value_bytes * max_entries, 1))
    # The batch token is the last key read (an array's index; a hash's bucket number).
    token_in, token_out = ctypes.c_uint32(0), ctypes.c_uint32(0)
    has_token = False
    if start:
        token_in.value, has_token = start - 1, True
    total = 0
    while total < max_entries:
        count = ctypes.c_uint32(max_entries - total)
        result = lib.bpf_lookup_batch(
            table.map_fd, ctypes.byref(token_in) if has_token else None, ctypes.byref(token_out),
            ctypes.c_void_p(ctypes.addressof(keys) + total * key_bytes),
            ctypes.c_void_p(ctypes.addressof(values) + total * value_bytes), ctypes.byref(count))
        code = ctypes.get_errno()
        total += count.value
        if result != 0:
            if code == errno.ENOENT or -result == errno.ENOENT:
                break  # read to the end
            raise WorkFailed(f"BPF_MAP_LOOKUP_BATCH failed: {os.strerror(code or -result)}")
        if count.value == 0:
            break
        token_in.value, has_token = token_out.value, True
    return keys.raw[:total * key_bytes], values.raw[:total * value_bytes], total
