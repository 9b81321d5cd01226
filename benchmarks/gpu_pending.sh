#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which). Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
# Carry .fa3 so that `vattn bench pod` has FlashAttention-3 among its baselines.
source "$(dirname "$0")/gpu_setup.sh"
# The decode split from the shape is the default since 6627461 (up to 8192 tokens): the
# fused kernel's GPU tests, then `vattn bench pod` at it (last at aba6f1f on an H100 with
# 2048-token splits: 1.079x / 1.060x).
timeout "${POD_TEST_TIMEOUT:-140}" python3 -m pytest -m gpu -q tests/test_pod.py 2>&1 | tee "$out/pytest-pod.log" | tail -3
timeout "${BENCH_TIMEOUT:-240}" python3 -m vattn bench pod --policy 50:50 --json "$out/pod-50-50.json" \
    --plot "$out/pod-50-50.png" > "$out/pod-50-50.md" 2>&1
# The splits where the H100 sweep at 505ae32 had no cells: 8 decodes at 4K and 16K, and
# 32 or 64 at 4K (splits past a cell's context are timed once). JSON after every cell.
cells="$(python3 -c 'import itertools; print(",".join(f"{c}:{p}:{b}:{x}" for c, p, b, x in
    itertools.product((512, 1024, 2048), (0, 4096, 16384), (8, 32, 64), (4096, 16384))
    if b == 8 or x == 4096))')"
VATTN_FA3_LIBRARY= timeout "${SWEEP_TIMEOUT:-170}" python3 benchmarks/tune_pod.py --grid split \
    --splits "${POD_SPLITS:-2048,4096,8192,16384}" --cells "${POD_CELLS:-$cells}" \
    --policies 50:50 --repeats 10 --json "$out/tune-pod-split.json" > "$out/tune-pod-split.md" 2>&1
grep -c "^| c" "$out/tune-pod-split.md"; tail -8 "$out/pod-50-50.md"
