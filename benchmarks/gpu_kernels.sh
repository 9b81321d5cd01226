#!/usr/bin/env bash
# One device call for the kernels: install, the GPU tests, `vattn bench decode` (its
# arguments passed through) and, with TUNE=1, the tiling sweep. Logs and JSON under $OUT.
# FlashAttention-3 joins when .fa3/ (carried, git-ignored) holds vLLM's _vllm_fa3_C.abi3.so.xz:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 vllm==0.25.0   # then, from the wheel (a zip):
#   unzip -p vllm-*.whl vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so | xz -9 > .fa3/_vllm_fa3_C.abi3.so.xz
source "$(dirname "$0")/gpu_setup.sh"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu -q tests ${TESTS:-} 2>&1 | tee "$out/pytest.log" | tail -15
timeout "${BENCH_TIMEOUT:-300}" python3 -m vattn bench decode --json "$out/decode.json" --plot "$out/decode" "$@" 2>&1 | tee "$out/decode.md" | tail -80
if [ "${TUNE:-0}" = 1 ]; then
    timeout "${TUNE_TIMEOUT:-300}" python3 benchmarks/tune_decode.py --json "$out/tune.json" ${TUNE_ARGS:-} 2>&1 | tee "$out/tune.md" | tail -14
fi
