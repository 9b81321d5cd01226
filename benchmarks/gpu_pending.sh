#!/usr/bin/env bash
# One device call for what was written on a CPU and waits for a GPU (docs/benchmarks.md
# says which), most needed first: the A/B behind a default that changed, the GPU tests
# at this commit, then the A/B of an option that is off until timed. Each step has its
# own timeout so that one slow step cannot take the call's whole limit. Logs and JSON
# under $OUT; the summary tables print last.
source "$(dirname "$0")/gpu_setup.sh"
# Head dim 256's default (runs for two programs an SM, two waves) against one wave and
# three 4-warp tilings that fit two an SM.
timeout 120 python3 benchmarks/tune_decode.py --grid d256 \
    --shapes a-16k-d256,b-8-d256,b-8-unequal-d256 --json "$out/tune-decode-d256.json" \
    > "$out/tune-decode-d256.md" 2>&1
timeout "${TEST_TIMEOUT:-220}" python3 -m pytest -m gpu -q tests 2>&1 | tee "$out/pytest.log" | tail -15
# The fused kernel's TMA boxes shifted back (PodTiling.tma_shift) against copied whole.
timeout 200 python3 benchmarks/tune_pod.py --grid shift --policies 50:50,paired --repeats 10 \
    --json "$out/tune-pod-shift.json" > "$out/tune-pod-shift.md" 2>&1
grep -A7 "^| cell" "$out/tune-pod-shift.md" | grep -v "^--"; tail -6 "$out/tune-decode-d256.md"
