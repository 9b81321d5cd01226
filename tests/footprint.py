"""Compile `pod_attention`'s kernel ahead of time for sm_90 (no GPU needed: Triton's
bundled ptxas) and print its footprint as JSON, for `test_pod.py`.

Run as ``TRITON_INTERPRET=0 python -m tests.footprint``: the interpreter, which the test
suite turns on where there is no GPU, cannot compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vattn.kernels.pod import PodTiling, _pod_kernel

POINTERS = {"qp_ptr": "*bf16", "op_ptr": "*bf16", "qd_ptr": "*bf16", "od_ptr": "*bf16",
            "k_ptr": "*bf16", "v_ptr": "*bf16", "lens_ptr": "*i32", "slots_ptr": "*i32",
            "part_ptr": "*fp32", "lse_ptr": "*fp32", "counters_ptr": "*i32",
            "arrive_ptr": "*i32", "trace_ptr": "*i64"}


def footprint(tma: bool, tiling: PodTiling | None = None) -> dict[str, object]:
    """Shared memory (bytes), registers per thread and whether bulk tensor copies are
    in the code, of the fused kernel for Llama-3-8B heads (32 / 8 / 128), bf16, 50:50."""
    t = tiling or PodTiling()
    const = dict(NUM_HEADS=32, NUM_KV_HEADS=8, NUM_SPLITS=8, HEAD_DIM=128, HAS_SLOTS=True,
                 POLICY=1, NUM_SM=132, UPCAST=False, PRECISION=None, INTERPRETED=False,
                 SPLIT=t.split, BLOCK_M=t.block_m, BLOCK_G=16, BLOCK_N=t.block_n,
                 BLOCK_ND=t.decode_block_n, BLOCK_D=128,
                 DECODE_STAGES=t.decode_stages or t.num_stages, TRACE=False, TMA=tma)
    signature, attrs = {}, {}
    for i, name in enumerate(_pod_kernel.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name.endswith("_desc"):
            tokens = t.block_n if name in ("kp_desc", "vp_desc") else t.decode_block_n
            signature[name] = f"tensordesc<bf16[1, {tokens}, 1, 128]>" if tma else "*bf16"
        else:
            signature[name] = POINTERS.get(name, "fp32" if name == "qk_scale" else "i32")
        if signature[name].startswith("*") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]     # as the launch specializes them
    kernel = triton.compile(ASTSource(_pod_kernel, signature, const, attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=t.num_warps, num_stages=t.num_stages))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    registers = int(usage.split("REG:")[1].split()[0])
    return {"shared": kernel.metadata.shared, "registers": registers,
            "bulk copies": "cp.async.bulk.tensor" in kernel.asm["ptx"]}


if __name__ == "__main__":
    print(json.dumps({str(tma): footprint(tma) for tma in (False, True)}))
