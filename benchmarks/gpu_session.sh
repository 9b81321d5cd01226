#!/usr/bin/env bash
# One device call: install, GPU + cache tests, info, core benchmark. Logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/vattn-out}"; mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || cat "$out/install.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -x tests/test_gpu.py tests/test_cache.py tests/test_layout.py \
    tests/test_pages.py tests/test_allocator.py "$@" 2>&1 | tee "$out/pytest.log" | tail -25
python3 -m vattn info 2>&1 | tee "$out/info.txt"
python3 -m vattn bench core --json "$out/core.json" 2>&1 | tee "$out/core.md"
