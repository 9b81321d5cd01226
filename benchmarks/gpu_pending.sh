#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which): the GPU tests at this commit, then the benches whose
# records predate a changed default. Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
source "$(dirname "$0")/gpu_setup.sh"
# On a fresh machine every kernel compiles: the suite took 99 s warm and over 220 s cold
# (H100, aba6f1f).
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests 2>&1 | tee "$out/pytest.log" | tail -15
# The fused kernel with TMA boxes that end at the length (PodTiling.tma_shift, the
# default since 5eea67f): timed on an H100 at aba6f1f; the H200 record is of the
# whole-copy kernel.
timeout 200 python3 -m vattn bench pod --policy 50:50 --json "$out/pod-50-50.json" \
    --plot "$out/pod-50-50.png" > "$out/pod-50-50.md" 2>&1
# Case (b) at batch 8-32 (its launches keep 128-token tiles, the twin's too): the
# token_major unequal rows against 85% of the read bandwidth, last at 84% / 83% (H200,
# d1e6cff), since c5994db with a request's start counted as 2 tiles in the cut (timed
# only in tune_decode's sweep on an H100 so far).
timeout 90 python3 -m vattn bench decode --cases b --batches 8,16,32 --repeats 30 \
    --json "$out/decode-b.json" > "$out/decode-b.md" 2>&1
tail -8 "$out/pod-50-50.md"; tail -14 "$out/decode-b.md"
