"""A child with a known syscall mix, driven over stdin so the probe is attached first.

argv: N M — N clock_nanosleep calls of 1 ms, then M getppid calls, each made directly with
syscall(2) so libc caching or vDSO shortcuts cannot hide or add calls.
"""

import ctypes
import sys

SYS_GETPPID = 110
SYS_CLOCK_NANOSLEEP = 230
CLOCK_MONOTONIC = 1


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def main() -> None:
    sleeps, getppids = int(sys.argv[1]), int(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    one_ms = Timespec(0, 1_000_000)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    for _ in range(sleeps):
        libc.syscall(SYS_CLOCK_NANOSLEEP, CLOCK_MONOTONIC, 0, ctypes.byref(one_ms), None)
    for _ in range(getppids):
        libc.syscall(SYS_GETPPID)
    sys.stdout.write("done\n")
    sys.stdout.flush()
    sys.stdin.readline()


if __name__ == "__main__":
    main()
