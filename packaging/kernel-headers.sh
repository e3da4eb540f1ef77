#!/usr/bin/env bash
# Kernel headers for BCC, without ever touching the boot chain.
#
# Order: the running kernel's own headers (/lib/modules/R/build), the kernel's built-in kheaders
# (/sys/kernel/kheaders.tar.xz, which BCC unpacks itself), the distro's headers package for
# exactly this release (installed only when apt's simulation shows it pulls no linux-image), and
# last a borrowed Debian cloud headers package that is *unpacked* with dpkg-deb into the agent's
# state directory, never installed: installing it drags in linux-image-*, which rewrites /vmlinuz
# and the initrd, so the host's next boot could change kernel. Tracepoint programs compile
# against borrowed headers because their layouts come from tracefs and our BPF C never
# dereferences kernel structs. The agent points BCC at the unpacked tree via BCC_KERNEL_SOURCE.
set -euo pipefail
say() { printf 'setup: %s\n' "$*"; }
release=$(uname -r)
state_root=${GUARDIAN_AGENT_HEADERS_DIR:-/var/lib/guardian-agent/kernel-headers}
borrowed="$state_root/$release"

if [ -e "/lib/modules/$release/build/include" ]; then
    say "kernel headers present at /lib/modules/$release/build"; exit 0
fi
if [ -e /sys/kernel/kheaders.tar.xz ]; then
    say "kernel provides its own headers (kheaders); BCC uses them"; exit 0
fi
if [ -e "$borrowed/build/include" ]; then
    say "borrowed kernel headers present at $borrowed/build"; exit 0
fi
[ -n "$(apt-cache search --names-only '^linux-headers-' 2>/dev/null | head -1)" ] || apt-get update -q >/dev/null
if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
    # The simulation is read whole before it is searched: `apt-get -s | grep -q` under pipefail
    # lets grep's early exit SIGPIPE apt-get, the pipeline then "fails", and the headers package
    # that pulls a kernel image was installed. A simulation that fails is no licence either.
    if ! simulation=$(apt-get install -s --no-install-recommends "linux-headers-$release" 2>/dev/null); then
        say "apt cannot simulate installing linux-headers-$release: unpacking instead"
    elif grep -q '^Inst linux-image' <<<"$simulation"; then
        say "linux-headers-$release would pull a kernel image: unpacking instead"
    else
        apt-get install -y -q --no-install-recommends "linux-headers-$release"
        say "installed linux-headers-$release"; exit 0
    fi
fi
newest=$(apt-cache search --names-only '^linux-headers-[0-9].*-cloud-amd64$' | awk '{print $1}' | sort -V | tail -1)
if [ -z "$newest" ]; then
    say "no kernel headers available for $release: the syscalls and tcp probes will report unavailable"
    exit 0
fi
version=${newest#linux-headers-}
common="linux-headers-${version%-cloud-amd64}-common"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$newest" "$common" >/dev/null 2>&1) || {
    say "could not download $newest: the syscalls and tcp probes will report unavailable"; exit 0; }
staging="$borrowed.partial"
rm -rf "$staging"
mkdir -p "$staging/root"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$staging/root"; done
# One merged tree: BCC given BCC_KERNEL_SOURCE looks for both the generic headers (the -common
# package) and the generated, arch-specific ones in that single directory (seen with BCC 0.26).
# The common tree first, then the arch overlay without clobbering (the common Makefile stays).
mkdir -p "$staging/build"
cp -a "$staging/root/usr/src/$common/." "$staging/build/"
cp -an "$staging/root/usr/src/linux-headers-$version/." "$staging/build/"
rm -rf "$staging/root"
echo "$newest" > "$staging/package"
rm -rf "$borrowed"
mv "$staging" "$borrowed"   # whole tree or nothing: a cut-off unpack never looks present
say "NOTE: no headers package for kernel $release; unpacked $newest into $borrowed (not installed; tracepoints only)"
