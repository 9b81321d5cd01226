"""Core cache numbers: bulk map through step, no-op step, fragmentation, decode on the cache.

Llama-3-8B KV shape (32 layers, 8 KV heads, head dim 128, bf16), 2 MiB pages, 32 slots
at 4096 tokens each on a GPU (20 GiB with ``per_layer``); on the host backend 8 slots at
1024 tokens (1 GiB), so that it fits in a small machine's memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from vattn.bench import common
from vattn.cache import VirtualKVCache
from vattn.errors import InvalidArgument

LLAMA3_8B = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "num_q_heads": 32}
GiB = 1 << 30


def _cache(device: str, layout: str, num_layers: int, context: int, slots: int = 32,
           read_slack: int = 256) -> VirtualKVCache:
    return VirtualKVCache(num_layers=num_layers, num_kv_heads=LLAMA3_8B["num_kv_heads"],
                          head_dim=LLAMA3_8B["head_dim"], dtype=torch.bfloat16,
                          max_batch_size=slots, max_context_len=context, device=device,
                          layout=layout, read_slack=read_slack,  # type: ignore[arg-type]
                          lookahead_tokens=0)


def bulk_map(device: str, layout: str, slots: int, tokens: int,
             repeats: int) -> dict[str, Any]:
    """`slots` slots stepped from empty to `tokens` at once; pooled handles (create
    excluded), and the first step with create included."""
    with _cache(device, layout, LLAMA3_8B["num_layers"], 32768, slots=slots,
                read_slack=0) as cache:
        first = common.host_times(lambda: _fill_all(cache, tokens), 1, warmup=0)[0]
        mapped = cache.stats().pages_mapped * cache.layout.page_size_bytes
        times = []
        for _ in range(repeats):
            for slot in range(slots):
                cache.free(slot)
            cache.trim(release=False)
            times.append(common.host_times(lambda: _fill_all(cache, tokens), 1, warmup=0)[0])
    t = common.median(times)
    return {"layout": layout, "slots": slots, "tokens": tokens,
            "pages": mapped // cache.layout.page_size_bytes,
            "GiB mapped": round(mapped / GiB, 2), "ms (pooled)": round(t * 1e3, 2),
            "GiB/s (pooled)": round(mapped / GiB / t, 1),
            "GiB/s (create incl.)": round(mapped / GiB / first, 1)}


def _fill_all(cache: VirtualKVCache, tokens: int) -> None:
    slots = [cache.allocate() for _ in range(cache.layout.max_batch_size)]
    cache.step(dict.fromkeys(slots, tokens))


def noop_step(device: str, layout: str, slots: int, tokens: int,
              repeats: int) -> dict[str, Any]:
    """A step over `slots` active slots that needs no page: decode inside mapped pages
    (the lengths cycle through the last quarter below the `tokens` mapped, so no step
    maps anything)."""
    with _cache(device, layout, LLAMA3_8B["num_layers"], 32768, slots=slots) as cache:
        _fill_all(cache, tokens)
        pages = cache.stats().pages_created
        low, span = tokens - tokens // 4, tokens // 4
        lengths = dict.fromkeys(range(slots), low)

        def one() -> None:
            for slot in lengths:
                lengths[slot] = low + (lengths[slot] - low + 1) % span
            cache.step(lengths)

        times = common.host_times(one, repeats, warmup=10)
        assert cache.stats().pages_created == pages, "a no-op step mapped pages"
    return {"layout": layout, "slots": slots,
            "median us": round(common.median(times) * 1e6, 1),
            "p99 us": round(common.percentile(times, 99) * 1e6, 1),
            "max us": round(max(times) * 1e6, 1)}


def fragmentation(device: str, layout: str, lengths: list[int]) -> list[dict[str, Any]]:
    """Physical bytes one request maps against the bytes its tokens need."""
    rows = []
    with _cache(device, layout, LLAMA3_8B["num_layers"], max(lengths), slots=1) as cache:
        need_per_token = 2 * LLAMA3_8B["num_layers"] * cache.layout.num_kv_heads \
            * cache.layout.head_dim * 2
        for n in lengths:
            slot = cache.allocate()
            cache.step({slot: n})
            mapped = cache.stats().pages_mapped * cache.layout.page_size_bytes
            need = n * need_per_token
            rows.append({"layout": layout, "tokens": n, "need MiB": round(need / 2**20, 1),
                         "mapped MiB": round(mapped / 2**20, 1),
                         "waste %": round(100 * (mapped - need) / mapped, 1)})
            cache.free(slot)
            cache.trim()
    return rows


def decode(device: str, layout: str, batch: int, context: int, num_layers: int,
           repeats: int) -> list[dict[str, Any]]:
    """Decode attention over the mapped cache: torch SDPA and torch's FlashAttention-2
    (varlen with ``seqused_k`` on the ``[B*Lmax, Hkv, D]`` view)."""
    hq, hkv, d = LLAMA3_8B["num_q_heads"], LLAMA3_8B["num_kv_heads"], LLAMA3_8B["head_dim"]
    rows = []
    with _cache(device, layout, num_layers, context, slots=batch, read_slack=256) as cache:
        slots = [cache.allocate() for _ in range(batch)]
        cache.step(dict.fromkeys(slots, context))
        lmax = cache.max_context_len
        for layer in range(num_layers):
            for t in cache.kv(layer):
                t[:, :context].copy_(torch.randn(batch, context, hkv, d, device=device))
        q = torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16)
        used = torch.full((batch,), context, dtype=torch.int32, device=device)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
        cu_k = cu_q * lmax

        def sdpa(layer: int) -> torch.Tensor:
            k, v = cache.kv(layer)
            return torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], k[:, :context].transpose(1, 2), v[:, :context].transpose(1, 2),
                enable_gqa=True)

        def fa2(layer: int) -> torch.Tensor:
            k, v = cache.kv(layer)
            return torch.ops.aten._flash_attention_forward(
                q, k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 1, lmax, 0.0, False, False,
                seqused_k=used)[0]

        kv_bytes = 2 * batch * context * hkv * d * 2
        for name, fn in (("sdpa", sdpa), ("torch-fa2", fa2)):
            calls = [lambda layer=layer, fn=fn: fn(layer) for layer in range(num_layers)]
            seconds = common.median(common.cuda_times(calls, repeats))
            rows.append({"layout": layout, "batch": batch, "context": context, "kernel": name,
                         "us": round(seconds * 1e6, 1),
                         "TB/s": round(kv_bytes / seconds / 1e12, 2)})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=common.positive_int, default=20, help="bulk-map repeats")
    parser.add_argument("--decode-layers", type=common.positive_int, default=32,
                        help="layers in the decode cache (rotated for a cold L2; 32 gives "
                        "token_major its real Llama-3-8B token stride)")
    parser.add_argument("--slots", type=common.positive_int, default=None,
                        help="slots of the bulk map and the no-op step (default 32; 8 on "
                        "the host backend)")
    parser.add_argument("--tokens", type=common.positive_int, default=None,
                        help="tokens each slot maps there (default 4096; 1024 on the host)")
    parser.add_argument("--skip-decode", action="store_true", help="no attention timings")
    parser.add_argument("--json", default=None, help="write results here")


def run(args: argparse.Namespace, device: str, emit: Callable[[str], None]) -> int:
    """Run the benchmark; `emit` shows each finished part (the CLI prints it)."""
    from vattn.config import resolve_device

    dev = resolve_device(device)
    header = common.device_environment(dev)
    emit(common.header_line(header))
    layouts = ["per_layer", "token_major"]
    results: dict[str, Any] = {"environment": header}
    host = dev.type != "cuda"
    slots = args.slots or (8 if host else 32)
    tokens = args.tokens or (1024 if host else 4096)
    if tokens < 4:
        raise InvalidArgument(f"--tokens must be >= 4 (the no-op step cycles through the "
                              f"last quarter), got {tokens}")
    results["bulk_map"] = [bulk_map(device, lay, slots, tokens, args.repeats)
                           for lay in layouts]
    results["noop_step"] = [noop_step(device, lay, slots, tokens, 2000) for lay in layouts]
    results["fragmentation"] = [row for lay in layouts for row in fragmentation(
        device, lay, [1000, 1024, 2048, 4096, 5000, 8192, 16384, 32768])]
    if dev.type == "cuda" and not args.skip_decode:
        results["decode"] = [row for lay in layouts for batch in (8, 32) for row in decode(
            device, lay, batch, 16384, args.decode_layers, 50)]
    for name, rows in results.items():
        if name != "environment":
            emit(f"\n### {name}\n\n{common.markdown_table(rows)}")
    if args.json:
        common.write_json(args.json, results)
    return 0
