#!/usr/bin/env bash
# CI's fuzz smoke step: builds every target (cargo-fuzz, stable toolchain,
# no sanitizer) and runs each for FUZZ_SECONDS (default 15) from the corpus
# kept in tests/fuzz/corpus/<target>. New inputs go to a scratch directory,
# so the committed corpus is only read. A crash, a time-out, the memory
# limit or a target that does not run fails the step; the input that did it
# is left in tests/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${FUZZ_SECONDS:-15}
cargo fuzz build --fuzz-dir tests/fuzz -s none
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
targets=$(cargo fuzz list --fuzz-dir tests/fuzz)
[ -n "$targets" ] || { echo "fuzz: cargo fuzz list found no targets" >&2; exit 1; }
failed=0
for target in $targets; do
    mkdir -p "$scratch/$target" "tests/fuzz/corpus/$target" "tests/fuzz/artifacts/$target"
    log="$scratch/$target.log"
    if tests/fuzz/target/x86_64-unknown-linux-gnu/release/"$target" \
        "$scratch/$target" "tests/fuzz/corpus/$target" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="tests/fuzz/artifacts/$target/" >"$log" 2>&1; then
        echo "fuzz $target: $(grep -E '^Done [0-9]+ runs' "$log")"
    else
        echo "fuzz $target FAILED:"
        tail -n 40 "$log"
        failed=1
    fi
done
exit $failed
