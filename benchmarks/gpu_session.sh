#!/usr/bin/env bash
# One device call: install, the whole test suite, info, the core benchmark twice (the
# spread between the two runs is the noise band). Logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/vattn-out}"; mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || cat "$out/install.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q tests "$@" 2>&1 | tee "$out/pytest.log" | tail -25
python3 -m vattn info 2>&1 | tee "$out/info.txt"
for i in 1 2; do python3 -m vattn bench core --json "$out/core$i.json" 2>&1 | tee "$out/core$i.md"; done
