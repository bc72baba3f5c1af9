#!/usr/bin/env bash
# The main job: a live re6st-rs mesh on this machine (as root): a registry and
# re6stnet nodes in network namespaces. Extra arguments go to re6st-demo (try
# --help, --nodes N, --keep; `./scripts/demo.sh cleanup` after a crash).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# The demo runs the registry, re6st-conf and re6stnet binaries: build them all
# (cargo shows its progress; the first build takes several minutes).
echo "re6st-demo: building the release binaries (the first build takes several minutes)..."
cargo build --release --workspace --bins
exec ./target/release/re6st-demo "$@"
