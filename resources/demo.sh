#!/usr/bin/env bash
# part-vmm alone, without the coordinator: build part-vmm
# and the test guest, boot the guest in a 2-vCPU, 64 MiB partition with its
# console on stdout, let it idle, then stop it politely (SIGTERM -> ACPI power
# button -> guest powers off) and show the exit status part-vmm reports.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p part-vmm -p partvisor-test-guest
guest=$(ls -t target/debug/build/partvisor-test-guest-*/out/partvisor-testguest.elf | head -n1)
echo "== booting $guest in part-vmm (2 vCPUs, 64 MiB); console follows"
target/debug/part-vmm --kernel "$guest" --vcpus 2 --memory-mib 64 \
    --cmdline "stay" --stop-timeout-ms 5000 &
pid=$!
sleep 2
echo "== sending SIGTERM (polite stop) to part-vmm $pid"
kill -TERM "$pid"
set +e
wait "$pid"
status=$?
set -e
echo "== part-vmm exited with status $status (0 = the guest powered off)"
exit "$status"
