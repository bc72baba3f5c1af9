#!/usr/bin/env bash
# Builds the fuzz crate and runs every target briefly (the Babel ones from the
# corpus seeded with the babeld capture) (CI's short run; longer runs by
# hand: RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET -- -max_total_time=600).
# CI builds unoptimised (--dev): about 4 min instead of 10-15 for the
# release build on 2 cores, for a few times fewer runs in the 20 s.
# Installs cargo-fuzz when it is missing. Seconds per target: $1 (20).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
./fuzz/seed-corpus.sh
cd fuzz
cargo fuzz build --dev
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^re6st-fuzz$')
for target in $targets; do
    mkdir -p "corpus/$target"
    cargo fuzz run --dev "$target" "corpus/$target" -- -max_total_time="$secs" 2>&1 | tail -n 3
done
echo "fuzz:" $targets "ran ${secs} s each without a crash"
