#!/usr/bin/env bash
# One device call for the fused kernel: install, its GPU tests, `vattn bench pod` (its
# arguments passed through) for both policies. Logs, JSON and PNG under $OUT.
# FlashAttention-3 joins the baselines when .fa3/ is carried (see gpu_kernels.sh).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/vattn-out}"; mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || cat "$out/install.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ -f .fa3/_vllm_fa3_C.abi3.so.xz ] && xz -dc .fa3/_vllm_fa3_C.abi3.so.xz > /tmp/fa3.so && export VATTN_FA3_LIBRARY=/tmp/fa3.so
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -m gpu -q tests/test_pod.py tests/test_bench_pod.py 2>&1 | tee "$out/pytest.log" | tail -15
for policy in proportional 50:50; do
    tag="${policy/:/-}"
    timeout "${BENCH_TIMEOUT:-200}" python3 -m vattn bench pod --policy "$policy" \
        --json "$out/pod-$tag.json" --plot "$out/pod-$tag.png" "$@" 2>&1 | tee "$out/pod-$tag.md" | tail -8
done
