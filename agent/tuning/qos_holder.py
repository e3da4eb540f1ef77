"""Hold a PM QoS CPU latency request: `python -m agent.tuning.qos_holder --value-us 0 --token T`.

/dev/cpu_dma_latency limits C-states only while the file stays open (the request is dropped when
the descriptor closes), so a one-shot `tune apply` cannot hold it. apply starts this small process
in its own session; it survives the CLI (and a kill -9 of the CLI), and `tune rollback` finds it
by the token in its argv and stops it, which releases exactly this request and nothing else.
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys

DEVICE = "/dev/cpu_dma_latency"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--value-us", type=int, required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    try:
        fd = os.open(DEVICE, os.O_WRONLY)
        os.write(fd, struct.pack("i", args.value_us))
    except OSError as error:
        print(f"error {error.strerror}", flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    print("holding", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
