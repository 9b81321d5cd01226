#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which). Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
source "$(dirname "$0")/gpu_setup.sh"
# The decode tile at the split from the shape (the default since 6627461): 64 tokens was
# chosen with 2048-token splits, before the TMA copies. Every cell of the grid, 50:50.
VATTN_FA3_LIBRARY= timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/tune_pod.py --grid decode-tile \
    --cells "${POD_CELLS:-grid}" --policies 50:50 --repeats 10 \
    --json "$out/tune-pod-decode-tile.json" > "$out/tune-pod-decode-tile.md" 2>&1
grep -c "50:50" "$out/tune-pod-decode-tile.md"; grep -i "error\|out of" "$out/tune-pod-decode-tile.md" | head -5
