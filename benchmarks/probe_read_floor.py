"""Probe: the fastest one launch that reads case (a)'s K/V, against issue 5's model.

Case (a) of `vattn bench decode` (batch 1, 2 KV heads, head dim 128, context 512..64K,
`per_layer` cache) asks for a time within 1.5x of ``KV bytes / read bandwidth + the
two-launch floor``, where the floor is our kernel with every length zero. This probe
measures what a kernel pays that reads those bytes once and does nothing else: each
program sums one tile of tokens (both heads, K and V) and stores one float. Its tile
is swept (16..512 tokens, so 32..4096 programs at 64K), and the fastest counts. Timed
as the bench times: CUDA-graph replays rotating over the cache's layers (cold L2),
median, on the same cache. Where this floor is already above 1.5x the model, no
kernel that reads the K/V in one launch meets the target there.

Two more reads show what the structure of a decode kernel adds to that floor, each at
its fastest tile: the same read masked by the request's length, loaded from device
memory first (a kernel that serves per-request lengths cannot address its K/V before
that load returns), and that read followed by a second launch that sums the per-program
floats (the merge of a split-KV kernel).

    python3 benchmarks/probe_read_floor.py --json read-floor.json
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch
import triton
import triton.language as tl

from vattn.bench import common
from vattn.bench.decode import Workload, launch_floor, layers_for_cold_l2, read_bandwidth
from vattn.kernels import decode_attention

CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
TILES = (16, 32, 64, 128, 256, 512)


@triton.jit
def _read_kernel(k_ptr, v_ptr, out_ptr, tokens, lens_ptr, stride_l,  # type: ignore[no-untyped-def]
                 ROW: tl.constexpr, BLOCK: tl.constexpr, LOADED: tl.constexpr):
    """Sum tokens ``[pid * BLOCK, (pid + 1) * BLOCK)`` of K and V (ROW elements a token,
    contiguous) into one float: every byte is read once, nothing is computed on it.
    `LOADED`: the length is ``lens[0]``, loaded first (the K/V loads wait for it)."""
    pid = tl.program_id(0)
    if LOADED:
        tokens = tl.load(lens_ptr)
    pos = pid * BLOCK + tl.arange(0, BLOCK)
    offs = pos.to(tl.int64)[:, None] * stride_l + tl.arange(0, ROW)[None, :]
    mask = (pos < tokens)[:, None]
    k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(tl.sum(k + v, 1), 0))


@triton.jit
def _sum_kernel(out_ptr, total_ptr, count, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """A second launch: the per-program floats summed into one."""
    offs = tl.arange(0, BLOCK)
    tl.store(total_ptr, tl.sum(tl.load(out_ptr + offs, mask=offs < count, other=0.0), 0))


def read_call(k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, tokens: int,
              block: int, lens: torch.Tensor | None = None, merge: bool = False) -> None:
    """One read of `tokens` tokens in tiles of `block`; with `lens` (int32 ``[1]``, its
    value `tokens`) masked by the loaded length; `merge`: then the second launch, which
    leaves the sum in ``out[-1]``."""
    grid = (triton.cdiv(tokens, block),)
    warps = 4 if block <= 128 else 8
    _read_kernel[grid](k, v, out, tokens, lens if lens is not None else out, k.stride(1),
                       ROW=k.shape[2] * k.shape[3], BLOCK=block, LOADED=lens is not None,
                       num_warps=warps)
    if merge:
        _sum_kernel[(1,)](out, out[-1:], grid[0],
                          BLOCK=max(16, triton.next_power_of_2(grid[0])), num_warps=4)


def probe(context: int, repeats: int, bandwidth: float, floor: float) -> dict[str, Any]:
    kv_bytes = 2 * context * 2 * 128 * 2
    layers = layers_for_cold_l2(kv_bytes, 4)
    w = Workload("cuda", "per_layer", 16, 2, 128, [context], layers)
    try:
        kvs = [w.cache.kv(layer) for layer in range(layers)]
        k0 = kvs[0][0]
        if k0.stride(2) != k0.shape[3] or k0.stride(1) != k0.shape[2] * k0.shape[3]:
            raise SystemExit("per_layer K/V: a token's heads are expected contiguous")
        out = torch.empty(triton.cdiv(context, min(TILES)) + 1, device="cuda")
        first = torch.stack([kvs[0][0][0, :context], kvs[0][1][0, :context]]).float().sum()
        lens = w.lens
        for extra in ({}, {"lens": lens, "merge": True}):
            read_call(kvs[0][0][0:1], kvs[0][1][0:1], out, context, 128, **extra)
            got = out[-1] if extra else out[:triton.cdiv(context, 128)].sum()
            if not torch.allclose(got, first, rtol=1e-3, atol=1e-1):
                raise AssertionError(f"read kernel {extra and 'after the length, merged'} "
                                     f"sums {got.item()}, expected {first.item()}")
        times, after, merged = {}, {}, {}
        for block in TILES:
            for found, extra in ((times, {}), (after, {"lens": lens}),
                                 (merged, {"lens": lens, "merge": True})):
                calls = [functools.partial(read_call, k, v, out, context, block, **extra)
                         for k, v in kvs]
                found[block] = common.median(common.graph_times(calls, repeats))
        space = torch.zeros(2, dtype=torch.int32, device="cuda")
        ours = common.median(common.graph_times(
            [functools.partial(decode_attention, w.q, k, v, w.lens, workspace=space)
             for k, v in kvs], repeats))
    finally:
        w.close()
    best = min(times, key=times.__getitem__)
    model = kv_bytes / bandwidth + floor
    return {"context": context, "model us": round(model * 1e6, 1),
            "1.5x model us": round(1.5 * model * 1e6, 1),
            "read floor us": round(times[best] * 1e6, 1), "best tile": best,
            "read floor / model": f"{times[best] / model:.2f}x",
            "after the length us": round(min(after.values()) * 1e6, 1),
            "and a merge launch us": round(min(merged.values()) * 1e6, 1),
            "vattn-triton us": round(ours * 1e6, 1),
            "ours / read floor": f"{ours / times[best]:.2f}x",
            **{f"tile {b} us": round(t * 1e6, 1) for b, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    emit = functools.partial(print, flush=True)
    header = common.script_header("probe_read_floor", emit)
    device = torch.device("cuda")
    bandwidth, floor = read_bandwidth(device), launch_floor(device)
    header.update({"read bandwidth TB/s": f"{bandwidth / 1e12:.2f}",
                   "two-launch floor us": f"{floor * 1e6:.1f}"})
    emit(f"read bandwidth {bandwidth / 1e12:.2f} TB/s, floor {floor * 1e6:.1f} us")
    rows = [probe(int(c), args.repeats, bandwidth, floor) for c in args.contexts.split(",")]
    emit(common.markdown_table(rows))
    if args.json:
        common.write_json(args.json, {"environment": header, "rows": rows})


if __name__ == "__main__":
    main()
