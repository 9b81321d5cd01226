#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which). Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
# Carry .fa3 so that `vattn bench pod` has FlashAttention-3 among its baselines. Owed on
# an H200 (the last H200 records predate both defaults; on an H100 both ran at 505ae32 /
# 9cff1fd): case (b) since row_cost=2 (c5994db), and `vattn bench pod` since the split
# from the shape (6627461).
source "$(dirname "$0")/gpu_setup.sh"
timeout "${POD_TEST_TIMEOUT:-140}" python3 -m pytest -m gpu -q tests/test_pod.py 2>&1 | tee "$out/pytest-pod.log" | tail -3
timeout "${DECODE_TIMEOUT:-90}" python3 -m vattn bench decode --cases b --batches 8,16,32 \
    --repeats 30 --json "$out/decode-b.json" > "$out/decode-b.md" 2>&1
timeout "${BENCH_TIMEOUT:-200}" python3 -m vattn bench pod --policy 50:50 --json "$out/pod-50-50.json" \
    --plot "$out/pod-50-50.png" > "$out/pod-50-50.md" 2>&1
tail -14 "$out/decode-b.md"; tail -3 "$out/pod-50-50.md"
