#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which): the GPU tests at this commit, then the benches whose
# records predate a changed default. Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
source "$(dirname "$0")/gpu_setup.sh"
# Case (b) at batch 8-32 (its launches keep 128-token tiles, the twin's too): the
# token_major unequal rows against 85% of the read bandwidth, last at 84% / 83% (H200,
# d1e6cff), since c5994db with a request's start counted as 2 tiles in the cut (timed
# only in tune_decode's sweep on an H100 so far).
timeout 90 python3 -m vattn bench decode --cases b --batches 8,16,32 --repeats 30 \
    --json "$out/decode-b.json" > "$out/decode-b.md" 2>&1
# The fused kernel's decode split: in the four tuning cells (H200, tune-pod-h200.json,
# 50:50) 4096 was 0.3% (balanced) and 3.4% (decode-heavy) faster than 2048 where the
# decodes are many, and 3-35% slower where they are few; PodTiling(split=None) picks it
# from the shape (PodTiling.split_for), off until this sweep.
# The rule moves only the cells with 32 or 64 decodes at 16K (4096 there); two more
# cells check the boundary. POD_CELLS=grid sweeps all 54.
cells="$(python3 -c 'import itertools; print(",".join([f"{c}:{p}:{b}:16384" for c, p, b in
    itertools.product((512, 1024, 2048), (0, 4096, 16384), (32, 64))]
    + ["1024:4096:8:16384", "1024:4096:64:4096"]))')"
timeout "${SWEEP_TIMEOUT:-280}" python3 benchmarks/tune_pod.py --grid split \
    --cells "${POD_CELLS:-$cells}" \
    --policies 50:50 --repeats 10 --json "$out/tune-pod-split.json" > "$out/tune-pod-split.md" 2>&1
# The fused kernel's GPU tests (its sweep includes split=None; the whole suite:
# gpu_pending_2.sh).
timeout "${POD_TEST_TIMEOUT:-150}" python3 -m pytest -m gpu -q tests/test_pod.py 2>&1 | tee "$out/pytest-pod.log" | tail -5
tail -14 "$out/decode-b.md"; tail -3 "$out/tune-pod-split.md"
