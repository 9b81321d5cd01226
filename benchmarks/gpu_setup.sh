# Sourced by the gpu_*.sh device scripts: strict mode, unbuffered output, $out (under
# $OUT), the project installed in place, the GPU named, and FlashAttention-3 enabled when
# .fa3/ (carried, git-ignored) holds vLLM's library (see gpu_kernels.sh for how to get it).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/vattn-out}"; mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || cat "$out/install.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ -f .fa3/_vllm_fa3_C.abi3.so.xz ] && xz -dc .fa3/_vllm_fa3_C.abi3.so.xz > /tmp/fa3.so && export VATTN_FA3_LIBRARY=/tmp/fa3.so
# Benchmark headers name the commit: the device's copy has no .git of its own.
[ -n "${VATTN_COMMIT:-}" ] || echo "warning: VATTN_COMMIT unset; headers may name a wrong commit" >&2
