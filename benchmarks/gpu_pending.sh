#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which). Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
# Carry .fa3 so that `vattn bench pod` has FlashAttention-3 among its baselines.
source "$(dirname "$0")/gpu_setup.sh"
# The policies at the split from the shape (the default since 6627461): 50:50 was chosen
# with 2048-token splits. Every cell of the grid, ours and torch's FA2 as the separate
# kernels (FlashAttention-3 left out).
VATTN_FA3_LIBRARY= timeout "${SWEEP_TIMEOUT:-150}" python3 benchmarks/tune_pod.py --grid quick \
    --cells grid --policies "${POD_POLICIES:-proportional,50:50,paired}" --repeats 10 \
    --json "$out/tune-pod-policies.json" > "$out/tune-pod-policies.md" 2>&1
# A second `vattn bench pod` at the default (the first: 9cff1fd, 1.129x / 1.107x on an
# H100), for the run-to-run spread.
timeout "${BENCH_TIMEOUT:-150}" python3 -m vattn bench pod --policy 50:50 --json "$out/pod-50-50.json" \
    > "$out/pod-50-50.md" 2>&1
grep -c "50:50" "$out/tune-pod-policies.md"; tail -3 "$out/pod-50-50.md"
