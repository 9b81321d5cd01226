"""Compile the decode and fused kernels ahead of time for sm_90 (no GPU needed: Triton's
bundled ptxas) and print their footprints as JSON, for `test_pod.py` and
`test_kernels.py`.

Run as ``TRITON_INTERPRET=0 python -m tests.footprint``: the interpreter, which the test
suite turns on where there is no GPU, cannot compile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vattn.kernels.decode import Tiling, _split_kernel, default_tiling
from vattn.kernels.paged import paged_tiling
from vattn.kernels.pod import PodTiling, _pod_kernel

POINTERS = {"qp_ptr": "*bf16", "op_ptr": "*bf16", "qd_ptr": "*bf16", "od_ptr": "*bf16",
            "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
            "lens_ptr": "*i32", "slots_ptr": "*i32", "starts_ptr": "*i32",
            "table_ptr": "*i32", "part_ptr": "*fp32", "o_ptr": "*fp32", "lse_ptr": "*fp32",
            "counters_ptr": "*i32", "arrive_ptr": "*i32", "trace_ptr": "*i64"}
SM90 = GPUTarget("cuda", 90, 32)
SHARED_PER_SM = 228 * 1024
"""Shared memory of an sm_90 SM; each resident program also reserves 1 KiB of it."""
REGISTERS_PER_SM = 65536


def _compile(fn: triton.JITFunction, const: dict[str, object], descriptors: dict[str, str],
             num_warps: int, num_stages: int,
             max_registers: int | None = None) -> dict[str, object]:
    """Shared memory (bytes), registers per thread, stack bytes per thread (where spilled
    registers go) and whether bulk tensor copies are in the code of `fn` compiled for
    sm_90; pointers and strides 16-divisible, as the launches specialize them."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name in descriptors:
            signature[name] = descriptors[name]
        else:
            signature[name] = POINTERS.get(name, "fp32" if name == "qk_scale" else "i32")
        if signature[name].startswith("*") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, const, attrs), target=SM90,
                            options=dict(num_warps=num_warps, num_stages=num_stages,
                                         **({} if max_registers is None
                                            else {"maxnreg": max_registers})))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    registers = int(usage.split("REG:")[1].split()[0])
    stack = int(usage.split("STACK:")[1].split()[0])       # spilled registers live here
    return {"shared": kernel.metadata.shared, "registers": registers, "stack": stack,
            "threads": 32 * num_warps,
            "bulk copies": "cp.async.bulk.tensor" in kernel.asm["ptx"]}


def programs_that_fit(used: dict[str, object]) -> int:
    """Programs of this footprint an sm_90 SM holds at once (registers are handed out
    per warp in steps of 256, i.e. 8 a thread)."""
    shared, registers, threads = (int(used[k]) for k in ("shared", "registers", "threads"))
    by_shared = SHARED_PER_SM // (shared + 1024)
    by_registers = REGISTERS_PER_SM // (-(-registers // 8) * 8 * threads)
    return min(by_shared, by_registers)


def split_footprint(tiling: Tiling, kv_block: int = 0, head_dim: int = 128,
                    fused: bool = True, batch: int = 8) -> dict[str, object]:
    """`decode_attention`'s split launch (or the paged twin's, `kv_block` > 0) for
    Llama-3-8B's 32 / 8 heads, bf16, with slots."""
    const = dict(GROUP=4, HEAD_DIM=head_dim, KV_BLOCK=kv_block, HAS_SLOTS=kv_block == 0,
                 HAS_STARTS=False, CHECK_SLOTS=kv_block == 0, FUSED=fused,
                 FLAT=tiling.flat, INTERPRETED=False, UPCAST=False, PRECISION=None,
                 PDL=tiling.pdl, BLOCK_B=max(2, triton.next_power_of_2(batch)),
                 BLOCK_G=16, BLOCK_N=tiling.block_n, BLOCK_D=head_dim,
                 ROW_COST=tiling.row_cost)
    return _compile(_split_kernel, const, {}, tiling.num_warps, tiling.num_stages)


def pod_footprint(tma: bool, shift: bool = False,
                  tiling: PodTiling | None = None) -> dict[str, object]:
    """The fused kernel's, for Llama-3-8B heads (32 / 8 / 128), bf16, 50:50; `shift`:
    `PodTiling.tma_shift`; the default tiling unless `tiling` is given."""
    t = tiling or PodTiling()
    split = t.split_for(32, 8, 16384, 132)      # 32 decodes at 16K on 132 SMs
    const = dict(NUM_HEADS=32, NUM_KV_HEADS=8, NUM_SPLITS=triton.cdiv(16384, split),
                 HEAD_DIM=128, HAS_SLOTS=True,
                 POLICY=1, NUM_SM=132, UPCAST=False, PRECISION=None, INTERPRETED=False,
                 SPLIT=split, BLOCK_M=t.block_m, BLOCK_G=16, BLOCK_N=t.block_n,
                 BLOCK_ND=t.decode_block_n, BLOCK_D=128,
                 DECODE_STAGES=t.decode_stages or t.num_stages, TRACE=False, TMA=tma,
                 SHIFT=shift)
    descriptors = {name: f"tensordesc<bf16[1, {n}, 1, 128]>" if tma else "*bf16"
                   for name, n in (("kp_desc", t.block_n), ("vp_desc", t.block_n),
                                   ("kd_desc", t.decode_block_n),
                                   ("vd_desc", t.decode_block_n))}
    return _compile(_pod_kernel, const, descriptors, t.num_warps, t.num_stages,
                    t.max_registers)


def decode_tilings() -> dict[str, tuple[Tiling, int, int]]:
    """The tilings the decode launches take (`tiling_for`'s three tile sizes, the paged
    twin's three at both block sizes, head dim 256's of both), with the KV block size
    and head dim of each."""
    base, paged = default_tiling(128), paged_tiling(128)
    short = {n: dataclasses.replace(base, block_n=n, row_cost=0) for n in (64, 32)}
    return {"n128": (base, 0, 128), "n64": (short[64], 0, 128), "n32": (short[32], 0, 128),
            "paged-16": (paged, 16, 128), "paged-128": (paged, 128, 128),
            **{f"paged-{block}-n{n}": (dataclasses.replace(paged, block_n=n), block, 128)
               for block in (16, 128) for n in (64, 32)},
            "d256": (default_tiling(256), 0, 256),
            "paged-d256": (paged_tiling(256), 16, 256)}


def _placed(used: dict[str, object], programs_per_sm: int) -> dict[str, object]:
    """A footprint with the programs an SM its grid expects and those that fit."""
    return {**used, "programs_per_sm": programs_per_sm, "fit": programs_that_fit(used)}


if __name__ == "__main__":
    # The fused kernel expects two programs an SM: a prefill tile beside a decode split.
    found = {f"pod tma={tma}": _placed(pod_footprint(tma), 2) for tma in (False, True)}
    found["pod tma=shift"] = _placed(pod_footprint(True, shift=True), 2)
    found.update({name: _placed(split_footprint(tiling, kv_block, head_dim),
                                tiling.programs_per_sm)
                  for name, (tiling, kv_block, head_dim) in decode_tilings().items()})
    print(json.dumps(found))
