#!/usr/bin/env bash
# Installs, as root on Debian, the packages the demo, the tests and the
# benchmarks use (g++: libFuzzer, built by scripts/fuzz-smoke.sh; chromium:
# the topology page test, headless). Does nothing when they are all there
# already (so it runs `apt-get update` at most once per machine).
set -euo pipefail
PKGS=(iproute2 nftables iputils-ping iperf3 procps babeld g++ chromium)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing ${missing[*]}" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "deps: cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }
