#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which). Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
source "$(dirname "$0")/gpu_setup.sh"
# The fused kernel's decode split over the whole grid of `vattn bench pod`: on an H100
# (505ae32, 20 cells at 16K) 8192 was the fastest of 2048/4096/8192 in 14 cells and 4096
# in the other 6, by up to 13% over 4096 and 17% over 2048 (the default). JSON is
# written after every cell, so a cut-short sweep keeps what it timed.
timeout "${SWEEP_TIMEOUT:-420}" python3 benchmarks/tune_pod.py --grid split \
    --splits "${POD_SPLITS:-2048,4096,8192,16384}" --cells "${POD_CELLS:-grid}" \
    --policies 50:50 --repeats 10 --json "$out/tune-pod-split.json" > "$out/tune-pod-split.md" 2>&1
# Case (b) at batch 8-32 since c5994db (a request's start counted as 2 tiles in the cut):
# run on an H100 at 505ae32 (90-101% of the read bandwidth); the H200 rows
# (token_major unequal, batch 8/16: 84%/83% at d1e6cff) are still owed.
timeout "${DECODE_TIMEOUT:-90}" python3 -m vattn bench decode --cases b --batches 8,16,32 \
    --repeats 30 --json "$out/decode-b.json" > "$out/decode-b.md" 2>&1
grep -c "^| c" "$out/tune-pod-split.md"; tail -14 "$out/decode-b.md"
