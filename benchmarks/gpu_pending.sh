#!/usr/bin/env bash
# One device call for what the records still lack (docs/benchmarks.md says which): case
# (b) of `vattn bench decode` at the `row_cost=2` default and `vattn bench pod` at the
# split from the shape, both recorded on an H100 and owed on an H200. The headers name
# the GPU that ran them. Each step has its own timeout; logs and JSON under $OUT, the
# summaries last.
source "$(dirname "$0")/gpu_setup.sh"
timeout "${DECODE_TIMEOUT:-200}" python3 -m vattn bench decode --cases b --batches 8,16,32 \
    --repeats 30 --json "$out/decode-b.json" > "$out/decode-b.md" 2>&1
timeout "${POD_TIMEOUT:-300}" python3 -m vattn bench pod --policy 50:50 \
    --json "$out/pod-50-50.json" --plot "$out/pod-50-50.png" > "$out/pod-50-50.md" 2>&1
grep -E "^\| (per_layer|token_major)" "$out/decode-b.md" | head -12
tail -8 "$out/pod-50-50.md"
