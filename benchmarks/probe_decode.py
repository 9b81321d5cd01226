"""First GPU look at `vattn.kernels.decode_attention` against torch's kernels, on a real
`VirtualKVCache` (all 32 Llama-3-8B layers, so `token_major` has its real token stride).

A probe, not `vattn bench decode`: no paged twin, no FlashAttention-3, one run. Cold L2:
each call reads another layer (0.5-2 GiB of KV). Prints a Markdown table.

    python3 benchmarks/probe_decode.py --batches 1,8,32 --context 16384
"""

from __future__ import annotations

import argparse

import torch

from vattn import VirtualKVCache
from vattn.bench import common
from vattn.kernels import decode_attention

HQ, HKV, D, LAYERS = 32, 8, 128, 32


def read_bandwidth() -> float:
    """Bytes per second a large bf16 sum reads (the HBM read ceiling)."""
    x = torch.randn(1 << 31, device="cuda", dtype=torch.bfloat16)      # 4 GiB
    seconds = common.median(common.cuda_times([lambda: x.sum()], 20))
    return x.numel() * 2 / seconds


def two_launch_floor() -> float:
    """Our two launches with nothing to read (every length zero)."""
    k = torch.randn(1, 64, HKV, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, HQ, D, device="cuda", dtype=torch.bfloat16)
    zero = torch.zeros(1, dtype=torch.int32, device="cuda")
    return common.median(common.cuda_times([lambda: decode_attention(q, k, k, zero)], 50))


def run(layout: str, batch: int, context: int, unequal: bool) -> list[dict[str, object]]:
    rows = []
    with VirtualKVCache(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D,
                        dtype=torch.bfloat16, max_batch_size=batch, max_context_len=context,
                        device="cuda", layout=layout) as cache:  # type: ignore[arg-type]
        slots = [cache.allocate() for _ in range(batch)]
        gen = torch.Generator().manual_seed(batch)
        lengths = (torch.randint(1, context + 1, (batch,), generator=gen) if unequal
                   else torch.full((batch,), context))
        cache.step({s: int(n) for s, n in zip(slots, lengths, strict=True)})
        for layer in range(LAYERS):
            for t in cache.kv(layer):
                for s, n in zip(slots, lengths.tolist(), strict=True):
                    t[s, :n].normal_()
        lens = lengths.to("cuda", torch.int32)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
        lmax = cache.max_context_len
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        cu_k = cu_q * lmax
        kv_bytes = 2 * int(lengths.sum()) * HKV * D * 2

        def ours(layer: int) -> object:
            k, v = cache.kv(layer)
            return decode_attention(q, k, v, lens)

        def fa2(layer: int) -> object:
            k, v = cache.kv(layer)
            return torch.ops.aten._flash_attention_forward(
                q, k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 1, lmax, 0.0, False, False,
                seqused_k=lens)[0]

        def sdpa(layer: int) -> object:
            k, v = cache.kv(layer)
            return torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], k[:, :context].transpose(1, 2),
                v[:, :context].transpose(1, 2), enable_gqa=True)

        kernels = [("vattn-triton", ours), ("torch-fa2", fa2)]
        if not unequal:
            kernels.append(("sdpa", sdpa))
        for name, fn in kernels:
            calls = [lambda layer=layer, fn=fn: fn(layer) for layer in range(LAYERS)]
            seconds = common.median(common.cuda_times(calls, 64))
            rows.append({"layout": layout, "batch": batch, "context": context,
                         "lengths": "unequal" if unequal else "equal", "kernel": name,
                         "us": round(seconds * 1e6, 1),
                         "TB/s": round(kv_bytes / seconds / 1e12, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--layouts", default="per_layer,token_major")
    args = parser.parse_args()
    bandwidth, floor = read_bandwidth(), two_launch_floor()
    print(f"read bandwidth {bandwidth / 1e12:.2f} TB/s, two-launch floor "
          f"{floor * 1e6:.1f} us")
    rows = []
    for layout in args.layouts.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for unequal in (False, True):
                rows += run(layout, batch, args.context, unequal)
    for row in rows:
        row["of read bw"] = f"{float(row['TB/s']) * 1e12 / bandwidth:.0%}"  # type: ignore[arg-type]
    print(common.markdown_table(rows))


if __name__ == "__main__":
    main()
