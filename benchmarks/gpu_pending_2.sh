#!/usr/bin/env bash
# The second device call of the pending work (gpu_pending.sh is the first): the whole GPU
# suite, then `vattn bench pod` at the default tiling. Logs and JSON under $OUT.
source "$(dirname "$0")/gpu_setup.sh"
# On a fresh machine every kernel compiles: the suite took 99 s warm and over 220 s cold
# (H100, aba6f1f).
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests 2>&1 | tee "$out/pytest.log" | tail -15
timeout 240 python3 -m vattn bench pod --policy 50:50 --json "$out/pod-50-50.json" \
    --plot "$out/pod-50-50.png" > "$out/pod-50-50.md" 2>&1
tail -8 "$out/pod-50-50.md"
