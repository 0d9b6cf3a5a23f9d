#!/usr/bin/env bash
# Installs everything partvisor's tests and benchmarks need on a Debian 12
# machine, as root: Debian packages through apt-get, and Debian's cloud kernel
# for the Linux smoke test. Safe to run again; it stops at the first failure
# with the failing tool's own message.
#
# Usage: resources/setup.sh            (the README's test command runs it)
#
# QEMU generations. The tests and benchmarks use Debian 12's QEMU 7.2
# (qemu-system-x86 for the test guest's microvm runs, qemu-storage-daemon
# from qemu-system-common for the blk comparisons). Some machine images
# preinstall a backported qemu-utils 10.x that declares
# `Breaks: qemu-system-common (< 1:8.0)`; no apt source carries the matching
# qemu-system 10.x, so this script installs all three QEMU packages from
# bookworm together, downgrading qemu-utils where needed (qemu-img 7.2 does
# everything the tests ask of it).
set -euo pipefail
cd "$(dirname "$0")/.."

# The QEMU generation every QEMU package must come from.
QEMU_SUITE=bookworm
QEMU_VERSION_PREFIX='1:7.2+'

# Debian packages and why:
#   qemu-system-x86, qemu-system-common, qemu-utils: QEMU microvm boots of the
#     test guest, qemu-storage-daemon, qemu-img (see above);
#   lz4, binutils, python3: Linux kernel extraction and the guest build's
#     disassembly check of its CPL 0 code;
#   iproute2: network-namespace, veth and tap tests;
#   util-linux (setpriv, unshare, nsenter) and systemd (systemd-analyze, and
#     systemd itself, run as PID 1 of private namespaces): partd's uid and
#     unit tests;
#   ca-certificates: apt over https mirrors.
# Crates installed with cargo: vhost-device-vsock and cargo-fuzz (below).
PACKAGES=(lz4 binutils iproute2 util-linux systemd python3 ca-certificates)
QEMU_PACKAGES=(qemu-system-x86 qemu-system-common qemu-utils)

export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (apt-get installs packages)" >&2
    exit 1
fi

apt-get update -qq

qemu_targets=()
for p in "${QEMU_PACKAGES[@]}"; do qemu_targets+=("$p/$QEMU_SUITE"); done

# apt-get explains a refusal (unmet dependencies, Breaks, held packages)
# partly on stdout and partly on stderr: keep its stdout and show it whole
# when the install fails.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "${PACKAGES[@]}" "${qemu_targets[@]}" >"$log"; then
    cat "$log" >&2
    echo "setup: apt-get install failed (its messages above)" >&2
    exit 1
fi

for p in "${QEMU_PACKAGES[@]}"; do
    v=$(dpkg-query -W -f='${Version}' "$p")
    case "$v" in
        "$QEMU_VERSION_PREFIX"*) ;;
        *)
            echo "setup: $p is $v, expected the $QEMU_SUITE generation ${QEMU_VERSION_PREFIX}*" >&2
            exit 1
            ;;
    esac
done
echo "setup: QEMU $(dpkg-query -W -f='${Version}' qemu-system-x86) from $QEMU_SUITE"

# The toolchain's own checkers, which .ci/run runs before the tests.
for tool in fmt clippy; do
    if ! out=$(cargo "$tool" --version 2>&1); then
        echo "setup: cargo $tool is missing: $out" >&2
        exit 1
    fi
done

# vhost-device-vsock: the rust-vmm vsock backend the vsock interop test and
# benchmark run beside part-io vsock. Pinned: its command line (`--vm
# guest-cid=..,socket=..,uds-path=..[,groups=..]`) is what the tests use.
VHOST_DEVICE_VSOCK_VERSION=0.3.0
if [ "$(vhost-device-vsock --version 2>/dev/null)" != "vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION" ]; then
    cargo install --locked --quiet "vhost-device-vsock@$VHOST_DEVICE_VSOCK_VERSION"
fi
echo "setup: $(vhost-device-vsock --version)"

# cargo-fuzz: builds and runs the fuzz targets (tests/fuzz). It works on the
# stable toolchain with `-s none` (coverage instrumentation through -C
# flags only; no sanitizer, which would need nightly).
CARGO_FUZZ_VERSION=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    cargo install --locked --quiet "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi
echo "setup: $(cargo fuzz --version)"

# Linux smoke test kernel (writes target/linux/status; see the script).
resources/linux/fetch-kernel.sh target/linux
