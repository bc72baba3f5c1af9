#!/usr/bin/env bash
# Seeds the Babel fuzz corpora with every packet of the babeld capture
# (routing/tests/data/babel-vectors.txt): real packets as starting points.
set -euo pipefail
cd "$(dirname "$0")"
vectors=../routing/tests/data/babel-vectors.txt
for target in babel_wire babel_router; do
    mkdir -p "corpus/$target"
done
awk '
    /^== frame / { n++; next }
    n && /^   [0-9a-f][0-9a-f][0-9a-f][0-9a-f]  / {
        for (i = 2; i <= NF; i++) hex[n] = hex[n] "\\x" $i
    }
    END { for (i = 1; i <= n; i++) print i, hex[i] }
' "$vectors" | while read -r i hex; do
    printf '%b' "$hex" > "corpus/babel_wire/babeld-$i"
    # The router target reads a mode byte first (0: no MACs).
    { printf '\x00'; printf '%b' "$hex"; } > "corpus/babel_router/babeld-$i"
done
echo "seeded $(ls corpus/babel_wire | wc -l) packets from the babeld capture"
