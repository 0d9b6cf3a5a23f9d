#!/usr/bin/env bash
# The main job: builds everything, starts a partd with its state in a fresh
# folder under $HOME, creates two guest partitions (main-job/alpha.toml and
# main-job/beta.toml: a disk, a NIC on switch `lan` and a guest socket
# device each) and boots them. partd starts their I/O partitions first: one
# `part-io blk` per guest for its disk, one `part-io net` for the switch and
# the host's one `part-io vsock`. The guests write and verify their disks,
# alpha sends 10,000 frames to beta through the switch, beta checks every
# one; then they talk over AF_VSOCK (64 MiB each way at once, checksums
# compared, and 64-byte round trips) and the job prints the throughput and
# round-trip figures. It prints what happened, stops both guests (their
# memory returns to `available` once the backends have let go of it) and
# exits non-zero if any check failed. Needs /dev/kvm and a Rust toolchain.
#
# Environment: CARGO (default cargo), CARGO_TARGET_DIR (default ./target),
# PARTVISOR_GUEST (the test guest ELF; default: the one cargo built).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
cargo=${CARGO:-cargo}
target=${CARGO_TARGET_DIR:-$repo/target}
bin=$target/debug
t0=$(date +%s)
step() { printf '\n== [%3ss] %s\n' "$(($(date +%s) - t0))" "$*"; }
failures=0
check() { # check DESCRIPTION FILE PATTERN
    if grep -qF -- "$3" "$2"; then
        echo "  ok    $1"
    else
        echo "  FAIL  $1: no \"$3\" in $2"
        failures=$((failures + 1))
    fi
}

step "1/7 building part-vmm, part-io, partd, partctl and the test guest (a first build takes minutes)"
"$cargo" build -p part-vmm -p part-io -p partctl -p partvisor-test-guest
"$cargo" build -p partd
guest=${PARTVISOR_GUEST:-$(ls -t "$target"/debug/build/partvisor-test-guest-*/out/partvisor-testguest.elf | head -n1)}
echo "  binaries in $bin, test guest $guest"

step "2/7 starting partd with its state under \$HOME"
mkdir -p "$HOME/.cache"
state=$(mktemp -d "$HOME/.cache/partvisor-main-job.XXXXXX")
partd_pid=
cleanup() {
    local ctl="$bin/partctl --socket $state/partd.sock"
    for p in alpha beta; do $ctl stop --force "$p" >/dev/null 2>&1 || true; done
    [ -n "$partd_pid" ] && kill "$partd_pid" 2>/dev/null && wait "$partd_pid" 2>/dev/null
    # I/O partitions outlive partd and their guests by design (a switch
    # serves every partition defined on it): this job ends the ones it made.
    for rec in "$state"/switches/*/net.json "$state"/partitions/*/blk.json "$state"/vsock/vsock.json; do
        [ -f "$rec" ] || continue
        pid=$(grep -o '"pid":[0-9]*' "$rec" | cut -d: -f2)
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = part-io ] && kill "$pid" 2>/dev/null
    done
    rm -rf "$state"
}
trap cleanup EXIT
# The disk images and the definitions live side by side in the state dir.
for p in alpha beta; do
    truncate -s 4M "$state/$p.img"
    cp "resources/examples/main-job/$p.toml" "$state/$p.toml"
done
"$bin/partd" --state-dir "$state" --disk-image "$state/alpha.img" \
    --disk-image "$state/beta.img" 2>"$state/partd.log" &
partd_pid=$!
export PARTD_SOCKET=$state/partd.sock
for _ in $(seq 200); do [ -S "$PARTD_SOCKET" ] && break; sleep 0.05; done
echo "  partd pid $partd_pid serving $PARTD_SOCKET"
ctl() { echo "\$ partctl $*"; "$bin/partctl" "$@"; }

step "3/7 creating the partitions (MACs come from the resource map)"
ctl create "$state/beta.toml" --kernel "$guest"
beta_mac=$("$bin/partctl" --json show beta | tr -d ' \n' | grep -o '"macs":\["[^"]*"' | cut -d'"' -f4)
echo "  beta's MAC: $beta_mac (alpha's command line says {mac:beta}: partd fills it in at start)"
ctl create "$state/alpha.toml" --kernel "$guest"

step "4/7 booting: partd starts each guest's I/O partitions, then its monitor"
ctl start beta
ctl start alpha
ctl show alpha
ctl show beta

step "5/7 the guests write and verify their disks, exchange 10,000 frames, then talk over vsock"
for p in alpha beta; do
    for _ in $(seq 60); do
        timeout 2 "$bin/partctl" console "$p" </dev/null >"$state/$p.console" 2>/dev/null || true
        grep -q "stay: idle" "$state/$p.console" && break
        grep -qE "^exit: [1-9]" "$state/$p.console" && break
        echo "  ... waiting for $p"
    done
    echo "  $p's console:"
    grep -E "^(blk|net|vsock|exit): " "$state/$p.console" | sed 's/^/    /' || true
done

step "6/7 stopping (memory is released once the backends have unmapped it)"
ctl stop alpha
ctl stop beta
ctl resources

step "7/7 what happened"
check "alpha wrote and verified its disk" "$state/alpha.console" "blk: verified 256 blocks ok"
check "beta wrote and verified its disk" "$state/beta.console" "blk: verified 256 blocks ok"
check "alpha sent 10,000 frames" "$state/alpha.console" "net: send 10000 frames 1000 bytes in"
check "beta received all 10,000, none lost or bad" "$state/beta.console" \
    "net: received 10000 frames ok lost=0 bad=0 dup=0"
check "beta received alpha's 64 MiB over vsock, every byte checked" "$state/beta.console" \
    "vsock: received 67108864 bytes from"
check "alpha received beta's 64 MiB over vsock, every byte checked" "$state/alpha.console" \
    "vsock: received 67108864 bytes from"
check "alpha timed 1000 round trips to beta's echo" "$state/alpha.console" "vsock: 1000 round trips of 64 bytes"
check "beta echoed every byte" "$state/beta.console" "vsock: echoed 64000 bytes"
sum() { grep -E "^vsock: $2 67108864 bytes" "$1" | grep -o 'sum=[0-9a-f]*' || echo "none in $1"; }
for dir in "alpha sent:beta received" "beta sent:alpha received"; do
    a=${dir%%:*} b=${dir##*:}
    sa=$(sum "$state/${a%% *}.console" "${a##* }") sb=$(sum "$state/${b%% *}.console" "${b##* }")
    if [ "$sa" = "$sb" ]; then
        echo "  ok    vsock checksum: $a = $b ($sa)"
    else
        echo "  FAIL  vsock checksum: $a $sa, $b $sb"
        failures=$((failures + 1))
    fi
done
us=$(grep -oE '^vsock: sent 67108864 bytes to [0-9]+:5000 in [0-9]+ us' "$state/alpha.console" | grep -oE '[0-9]+ us' | cut -d' ' -f1 || true)
rtt=$(grep -oE 'p50=[0-9]+ ns p99=[0-9]+ ns' "$state/alpha.console" || true)
if [ -n "$us" ] && [ "$us" -gt 0 ]; then
    echo "  vsock: 64 MiB each way at once in $((us / 1000)) ms: $((2 * 67108864 / us)) MB/s in all (debug build, guest clock); 64-byte round trips: $rtt"
fi
check "alpha stayed up until stopped" "$state/alpha.console" "stay: idle"
check "beta stayed up until stopped" "$state/beta.console" "stay: idle"
check "the switch saw both guests let go" "$state/switches/lan/net.log" "frontend disconnected"
check "the vsock relay took alpha out at its stop" "$state/vsock/vsock.log" "partition removed"
for p in alpha beta; do
    check "$p's backends unmapped its memory before the release" "$state/partd.log" \
        "$p: every backend has unmapped its memory"
    check "$p's memory back in available" "$state/partd.log" "$p: resources released (stopped)"
    if "$bin/partctl" --json show "$p" | tr -d ' \n' | grep -q '"memory":\[\]'; then
        echo "  ok    $p holds no memory"
    else
        echo "  FAIL  $p still holds memory"
        failures=$((failures + 1))
    fi
done
echo "  switch counters at disconnect:"
grep "frontend disconnected" "$state/switches/lan/net.log" | sed 's/.*frontend disconnected; /    /' || true
if [ "$failures" -ne 0 ]; then
    echo "main job: $failures check(s) FAILED after $(($(date +%s) - t0)) s (partd log below)"
    cat "$state/partd.log"
    exit 1
fi
echo "main job: every check passed in $(($(date +%s) - t0)) s"
