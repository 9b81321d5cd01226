#!/usr/bin/env bash
# One device call for what was written or changed on a CPU and waits for a GPU
# (docs/benchmarks.md says which): the GPU tests at this commit, then the benches whose
# records predate a changed default. Each step has its own timeout so that one slow step
# cannot take the call's whole limit. Logs and JSON under $OUT; the summaries print last.
source "$(dirname "$0")/gpu_setup.sh"
timeout "${TEST_TIMEOUT:-220}" python3 -m pytest -m gpu -q tests 2>&1 | tee "$out/pytest.log" | tail -15
# The fused kernel with TMA boxes that end at the length (PodTiling.tma_shift, the
# default since 5eea67f): its record is of the whole-copy kernel.
timeout 200 python3 -m vattn bench pod --policy 50:50 --json "$out/pod-50-50.json" \
    --plot "$out/pod-50-50.png" > "$out/pod-50-50.md" 2>&1
# The paged twin with tiles as short as the contiguous kernel takes in case (a), for a
# fair ablation there (its own tiling is tuned on case (b)).
for block in 16 128; do
    timeout 80 python3 benchmarks/tune_decode.py --grid paged --paged "$block" \
        --shapes a-512,a-2k,a-8k,a-16k --json "$out/tune-paged-$block.json" \
        > "$out/tune-paged-$block.md" 2>&1
done
tail -8 "$out/pod-50-50.md"; tail -6 "$out/tune-paged-16.md"; tail -6 "$out/tune-paged-128.md"
