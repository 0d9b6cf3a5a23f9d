#!/usr/bin/env bash
# The main job through the coordinator: partd (in a temporary state dir)
# grants a 2-vCPU, 64 MiB partition in one transaction and boots the test
# guest in part-vmm; partctl shows it running with its resources and its
# console, then stops it politely (ACPI power button) and shows everything
# back in `available`. Needs only access to /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p part-vmm -p partctl -p partvisor-test-guest
cargo build -q -p partd
guest=$(ls -t target/debug/build/partvisor-test-guest-*/out/partvisor-testguest.elf | head -n1)

state=$(mktemp -d)
target/debug/partd --state-dir "$state" 2>"$state/partd.log" &
partd_pid=$!
trap 'kill "$partd_pid" 2>/dev/null; wait "$partd_pid" 2>/dev/null; rm -rf "$state"' EXIT
export PARTD_SOCKET=$state/partd.sock
for _ in $(seq 100); do [ -S "$PARTD_SOCKET" ] && break; sleep 0.05; done

ctl() { echo "\$ partctl $*"; target/debug/partctl "$@"; }
ctl create resources/examples/testguest.toml --kernel "$guest"
ctl start testguest
sleep 1
echo "\$ partctl console testguest   (2 s)"
timeout 2 target/debug/partctl console testguest </dev/null || true
ctl list
ctl resources
ctl stop testguest
ctl show testguest
ctl log testguest
