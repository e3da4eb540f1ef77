#!/usr/bin/env bash
# `make deb`: build dist/guardian-agent_<version>_<arch>.deb.
#
# The package carries a ready venv in /opt/guardian-agent/venv, built on the system Python with
# system site packages so the distro's BCC (python3-bpfcc) imports. Building the venv here rather
# than in postinst keeps installs offline and identical across a fleet; the venv is built under a
# staging root and its absolute paths (shebangs, pyvenv.cfg, RECORD) are rewritten to /opt, the
# way dh-virtualenv does it. Wheels are kept in build/wheelhouse so rebuilds do not hit the index.
#
# Environment: DIST_DIR (default dist), BUILD_DIR (default build/deb).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'build-deb: [%3ss] %s\n' "$SECONDS" "$*"; }

PREFIX=/opt/guardian-agent
PYTHON=/usr/bin/python3
# pip from the project venv (`make setup`): Debian's python3 has no pip module of its own.
PIP=".venv/bin/python -m pip"
VERSION=$($PYTHON -c 'import re; print(re.search(r"__version__ = \"([^\"]+)\"", open("core/__init__.py").read()).group(1))')
ARCH=$(dpkg --print-architecture)
PY_MINOR=$($PYTHON -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PY_NEXT=$($PYTHON -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
DIST_DIR=${DIST_DIR:-dist}
BUILD_DIR=${BUILD_DIR:-build/deb}
WHEELHOUSE=build/wheelhouse
STAGE="$(realpath -m "$BUILD_DIR")/root"
PACKAGE="$DIST_DIR/guardian-agent_${VERSION}_${ARCH}.deb"
# Runtime libraries: packaging/pip-requirements.txt (what `make setup` installs, kept current by
# every probe's author) minus the tools only tests, benchmarks and notebooks use (matplotlib is not one:
# the HTML report draws its charts with it).
DEV_ONLY='^(pytest|pytest-timeout|pyperf|moto|moto\[server\]|ansible-core|polars|pandas)([<>=!~ ].*)?$'
EXTRA_RUNTIME=$(grep -vE '^\s*(#|$)' packaging/pip-requirements.txt | sed 's/\s*#.*//' | grep -vE "$DEV_ONLY" | tr '\n' ' ')

rm -rf "$STAGE"
mkdir -p "$STAGE$PREFIX" "$DIST_DIR" "$WHEELHOUSE"

say "building the guardian-agent wheel"
rm -f "$WHEELHOUSE"/guardian_agent-*.whl
$PIP wheel -q --no-deps --no-build-isolation -w "$WHEELHOUSE" .
wheel=$(ls "$WHEELHOUSE"/guardian_agent-"$VERSION"-*.whl)

say "creating the venv (system site packages, for python3-bpfcc)"
$PYTHON -m venv --system-site-packages --without-pip "$STAGE$PREFIX/venv"
venv_python="$STAGE$PREFIX/venv/bin/python"
# Everything the agent imports goes into the venv (--ignore-installed), so the package does not
# depend on whatever Python libraries the build host happens to have system-wide.
install_args=(--python "$venv_python" install -q --ignore-installed --no-warn-script-location
              --disable-pip-version-check)
if ! $PIP "${install_args[@]}" --no-index --find-links "$WHEELHOUSE" "$wheel" $EXTRA_RUNTIME 2>/dev/null; then
    say "filling build/wheelhouse from the package index (first build)"
    $PIP download -q -d "$WHEELHOUSE" "$wheel" $EXTRA_RUNTIME
    $PIP "${install_args[@]}" --no-index --find-links "$WHEELHOUSE" "$wheel" $EXTRA_RUNTIME
fi
"$venv_python" -c 'import agent.cli, agent.fleet.stores, boto3, duckdb, pyarrow' \
    || { say "the staged venv does not import the agent"; exit 1; }

# Test suites, C headers and Cython sources of the libraries are never imported at run time;
# they are a third of the files, and dpkg's install and removal time grows with the file count.
site="$STAGE$PREFIX/venv/lib/python$PY_MINOR/site-packages"
find "$site" -mindepth 2 -type d \( -name tests -o -name test \) \( -path '*/numpy/*' -o -path '*/scipy/*' \
    -o -path '*/pyarrow/*' \) -prune -exec rm -rf {} +
find "$site" -type f \( -name '*.h' -o -name '*.hpp' -o -name '*.pxd' -o -name '*.pyx' -o -name '*.pxi' \) -delete
find "$site" -type d -empty -delete

say "rewriting staging paths to $PREFIX"
grep -rlI --null -F "$STAGE" "$STAGE$PREFIX" | xargs -0 -r sed -i "s#$STAGE##g"
# pip's console scripts point at the staged interpreter; the venv's python is a symlink, fine.
find "$STAGE$PREFIX/venv/bin" -maxdepth 1 -type f -name 'activate*' -delete

mkdir -p "$STAGE/usr/bin" "$STAGE/lib/systemd/system" "$STAGE$PREFIX/share/doc" "$STAGE/DEBIAN"
ln -s "$PREFIX/venv/bin/guardian-agent" "$STAGE/usr/bin/guardian-agent"
install -m 0644 packaging/systemd/guardian-agent.service packaging/systemd/guardian-agent-collect.service \
    packaging/systemd/guardian-agent-collect.timer "$STAGE/lib/systemd/system/"
[ -f docs/fleet.md ] && install -m 0644 docs/fleet.md "$STAGE$PREFIX/share/doc/fleet.md"
cat > "$STAGE$PREFIX/share/config.example.toml" <<'EOF'
# /etc/guardian-agent/config.toml — see /opt/guardian-agent/share/doc/fleet.md
[dataset]
root = "/var/lib/guardian-agent/dataset"     # or "s3://bucket/prefix" (AWS_* in /etc/guardian-agent/environment)
# s3_endpoint_url = "https://minio.internal:9000"
spool_dir = "/var/lib/guardian-agent/spool"
spool_max_mb = 1024
spool_policy = "drop-oldest"                 # or "refuse-new"

[collect]                                    # guardian-agent-collect.timer
probes = ["host", "syscalls", "tcp", "stacks"]
duration_s = 30

[daemon]                                     # guardian-agent.service
probes = ["host", "syscalls", "tcp"]
window_s = 300
cpu_budget_pct = 0.5
rss_limit_mb = 200

[targets]
process_names = []
units = []

# [postgres]
# dsn_file = "/etc/guardian-agent/pg.dsn"    # mode 0600
EOF

installed_kb=$(du -sk "$STAGE" --exclude=DEBIAN | cut -f1)
cat > "$STAGE/DEBIAN/control" <<EOF
Package: guardian-agent
Version: $VERSION
Architecture: $ARCH
Maintainer: guardian-agent maintainers <root@localhost>
Section: admin
Priority: optional
Installed-Size: $installed_kb
Depends: python3 (>= $PY_MINOR), python3 (<< $PY_NEXT), python3-bpfcc
Recommends: bpfcc-tools, tcpdump
Description: host-level performance audit agent for latency-critical Linux hosts
 eBPF syscall and TCP timings, Python stacks, packet captures, host counters and
 PostgreSQL slow-query evidence, written as Parquet into one Hive-partitioned
 fleet dataset (local or S3), with a daemon, a collection timer and SQL queries.
EOF

cat > "$STAGE/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    install -d -m 0755 /etc/guardian-agent
    [ -e /etc/guardian-agent/config.toml ] || \
        install -m 0644 /opt/guardian-agent/share/config.example.toml /etc/guardian-agent/config.toml
    install -d -m 0750 /var/lib/guardian-agent
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        systemctl enable guardian-agent.service guardian-agent-collect.timer || true
        systemctl restart guardian-agent.service || true
        systemctl start guardian-agent-collect.timer || true
    fi
fi
exit 0
EOF
cat > "$STAGE/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now guardian-agent.service guardian-agent-collect.timer || true
fi
exit 0
EOF
cat > "$STAGE/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
case "$1" in
    remove|purge)
        # Bytecode written after install (none normally: the venv ships compiled).
        rm -rf /opt/guardian-agent
        [ -d /run/systemd/system ] && systemctl daemon-reload || true
        ;;
esac
if [ "$1" = purge ]; then
    # Purge removes only what the package itself made. A pending tuning journal is the only
    # record of the host's original kernel values, the dataset is the user's data, and the
    # kernel headers belong to `make setup`: all three stay.
    rm -rf /etc/guardian-agent /var/lib/guardian-agent/spool
    if [ -n "$(ls -A /var/lib/guardian-agent/journal 2>/dev/null)" ]; then
        echo "guardian-agent: kept /var/lib/guardian-agent/journal: a tuning journal is pending;" \
             "restore with 'guardian-agent tune rollback' (reinstall the package) before deleting it" >&2
    fi
fi
exit 0
EOF
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

say "packing $PACKAGE"
# zstd -3: a quarter of xz's build time on two cores for a package that is mostly .so files.
dpkg-deb --root-owner-group -Zzstd -z3 --build "$STAGE" "$PACKAGE" >/dev/null
rm -rf "$STAGE"
say "built $PACKAGE ($(du -h "$PACKAGE" | cut -f1))"
