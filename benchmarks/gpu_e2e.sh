#!/usr/bin/env bash
# One device call for the transformers integration: install, the GPU tests, `vattn demo`
# and `vattn bench e2e` (its arguments passed through). Logs, JSON and PNG under $OUT.
# FlashAttention-3 joins the tests when .fa3/ is carried (see gpu_kernels.sh).
source "$(dirname "$0")/gpu_setup.sh"
if [ "${TESTS:-1}" = 1 ]; then
    timeout "${TEST_TIMEOUT:-220}" python3 -m pytest -m gpu -q -rs tests 2>&1 | tee "$out/pytest.log" | tail -15
    timeout "${DEMO_TIMEOUT:-90}" python3 -m vattn demo 2>&1 | tee "$out/demo.log" | tail -6
fi
timeout "${BENCH_TIMEOUT:-300}" python3 -m vattn bench e2e --json "$out/e2e.json" --plot "$out/e2e.png" "$@" 2>&1 | tee "$out/e2e.md" | tail -70
