#!/usr/bin/env bash
# One device call for the fused kernel: install, its GPU tests, `vattn bench pod` (its
# arguments passed through) for both policies. Logs, JSON and PNG under $OUT.
# FlashAttention-3 joins the baselines when .fa3/ is carried (see gpu_kernels.sh).
source "$(dirname "$0")/gpu_setup.sh"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -m gpu -q tests/test_pod.py tests/test_bench_pod.py 2>&1 | tee "$out/pytest.log" | tail -15
for policy in proportional 50:50; do
    tag="${policy/:/-}"
    timeout "${BENCH_TIMEOUT:-200}" python3 -m vattn bench pod --policy "$policy" \
        --json "$out/pod-$tag.json" --plot "$out/pod-$tag.png" "$@" 2>&1 | tee "$out/pod-$tag.md" | tail -8
done
