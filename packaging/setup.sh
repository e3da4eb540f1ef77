#!/usr/bin/env bash
# Idempotent bootstrap for a fresh Debian/Ubuntu host, run as root by `make setup`.
# Installs only what is missing, makes tracefs reachable, provides kernel headers for BCC,
# and leaves the project venv at .venv/ (system Python + system site packages, so the
# distro's `bcc` module imports).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (installs packages, mounts tracefs, loads eBPF)"; exit 2
fi
export DEBIAN_FRONTEND=noninteractive

# 1. Debian packages, only the missing ones (apt-get update first when anything is missing).
wanted=$(grep -vE '^\s*(#|$)' packaging/apt-packages.txt | tr '\n' ' ')
missing=()
for package in $wanted; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "system packages present"
fi

# 2. tracefs/debugfs: BCC and the tracepoint probes need them mounted.
if [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null && say "mounted tracefs" || say "could not mount tracefs"
fi
if [ ! -e /sys/kernel/debug/tracing ] && ! mountpoint -q /sys/kernel/debug; then
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null && say "mounted debugfs" || true
fi

# 3. Kernel headers for BCC: see kernel-headers.sh (never installs a kernel image).
bash packaging/kernel-headers.sh

# 4. The venv, from the system Python so the distro's bcc imports; pip only when requirements changed.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.base_prefix.startswith("/usr") else 1)'; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
    say "created .venv"
fi
stamp=.venv/.requirements.sha
digest=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
    # Some hosts' pip configuration names local mirror folders that do not exist; pip warns once
    # per package about each. Drop just those lines; every other message still shows.
    quiet_pip() { .venv/bin/pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
    # pyproject.toml lists every requirement once (packaging/requirements.py reads it).
    quiet_pip install -q --disable-pip-version-check $(/usr/bin/python3 packaging/requirements.py --all)
    quiet_pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    echo "$digest" > "$stamp"
    say "python packages installed"
else
    say "python packages present"
fi
.venv/bin/python -c 'import bcc' 2>/dev/null || say "WARNING: bcc does not import in .venv (python3-bpfcc missing?)"

# 5. `guardian-agent` on PATH: a symlink in /usr/local/bin to the venv's console script (never
#    over a file that is not ours, e.g. the .deb's /usr/bin/guardian-agent is left alone).
link=/usr/local/bin/guardian-agent
target="$(pwd)/.venv/bin/guardian-agent"
if [ -L "$link" ] || [ ! -e "$link" ]; then
    if [ "$(readlink "$link" 2>/dev/null)" != "$target" ]; then
        ln -sfn "$target" "$link" && say "guardian-agent on PATH: $link -> $target"
    fi
else
    say "WARNING: $link exists and is not a symlink; left alone (run .venv/bin/guardian-agent)"
fi

# 6. promtool for the metrics tests (`promtool check metrics`), taken from Debian's prometheus
#    package without installing it: the package would also install and start a Prometheus server.
tools=/var/lib/guardian-agent/tools
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$tools/promtool" ]; then
    scratch=$(mktemp -d)
    if (cd "$scratch" && apt-get download -q prometheus >/dev/null 2>&1) \
        && dpkg-deb -x "$scratch"/prometheus_*.deb "$scratch/x" && [ -x "$scratch/x/usr/bin/promtool" ]; then
        mkdir -p "$tools" && install -m 0755 "$scratch/x/usr/bin/promtool" "$tools/promtool"
        say "promtool installed in $tools (from Debian's prometheus package, server not installed)"
    else
        say "promtool not available (the metrics tests then skip promtool and still parse with prometheus_client)"
    fi
    rm -rf "$scratch"
fi
say "ready"
