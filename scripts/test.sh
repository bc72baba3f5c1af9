#!/usr/bin/env bash
# The whole test suite: unit, simulation and network-namespace tests (as root;
# without root the namespace tests are reported as ignored, loudly).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo test --workspace "$@"
