#!/usr/bin/env bash
# One device call for the transformers integration: install, the GPU tests, `vattn demo`
# and `vattn bench e2e` (its arguments passed through). Logs, JSON and PNG under $OUT.
# FlashAttention-3 joins the tests when .fa3/ is carried (see gpu_kernels.sh).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/vattn-out}"; mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || cat "$out/install.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ -f .fa3/_vllm_fa3_C.abi3.so.xz ] && xz -dc .fa3/_vllm_fa3_C.abi3.so.xz > /tmp/fa3.so && export VATTN_FA3_LIBRARY=/tmp/fa3.so
if [ "${TESTS:-1}" = 1 ]; then
    timeout "${TEST_TIMEOUT:-220}" python3 -m pytest -m gpu -q -rs tests 2>&1 | tee "$out/pytest.log" | tail -15
    timeout "${DEMO_TIMEOUT:-90}" python3 -m vattn demo 2>&1 | tee "$out/demo.log" | tail -6
fi
timeout "${BENCH_TIMEOUT:-300}" python3 -m vattn bench e2e --json "$out/e2e.json" --plot "$out/e2e.png" "$@" 2>&1 | tee "$out/e2e.md" | tail -70
