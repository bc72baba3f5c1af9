#!/usr/bin/env bash
# The main job: the live demo on this machine (as root). Extra arguments go to
# re6st-demo (try --help, --nodes N, --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
exec cargo run --release --quiet -p netns-tests --bin re6st-demo -- "$@"
