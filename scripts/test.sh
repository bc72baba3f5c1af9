#!/usr/bin/env bash
# The whole test suite: unit, simulation and network-namespace tests (as root;
# without root the namespace tests are reported as ignored, loudly).
# Arguments go to `cargo test`. Ends with one summary line over all targets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The namespace tests run the binaries of every package: build them all first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^(passed|failed|ignored);?$/) { n[$(i)] += $(i-1) }
        }
     }
     END { printf "tests: %d passed, %d failed, %d skipped\n", n["passed;"], n["failed;"], n["ignored;"] }' "$log"
exit "$status"
