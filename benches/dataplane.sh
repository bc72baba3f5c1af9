#!/usr/bin/env bash
# Data-plane benchmark, all systems side by side in one run (as root):
# raw veth, boringtun-cli 0.7.1 (installed with cargo if missing) and
# re6st-tunnel, iperf3 TCP over a tunnel of MTU 1420 between two namespaces.
# Arguments go to re6st-bench-tunnel (--reps 5 --duration 10 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
if ! command -v wg >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wireguard-tools
fi
if ! command -v boringtun-cli >/dev/null; then
    cargo install boringtun-cli --version 0.7.1 --locked
fi
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet -p netns-tests --bin re6st-bench-tunnel
exec ./target/release/re6st-bench-tunnel "$@"
