"""GPU scenarios run in a subprocess by tests/test_gpu_background.py, so that an illegal
address (an unmap racing a kernel) kills only the child: ``python -m tests.gpu_scenarios
NAME`` prints ``ok`` on success."""

from __future__ import annotations

import random
import sys

import torch

import vattn


def decode_loop_with_background_mapping() -> None:
    """Every iteration a kernel appends a token to every active slot and reads every
    slot back, while the mapper thread maps (look-ahead) and unmaps (reclaim, trim);
    the cache must always equal a dense copy."""
    rng = random.Random(7)
    hkv, d, lmax, batch = 8, 128, 4096, 6
    for layout in ("per_layer", "token_major"):
        cache = vattn.VirtualKVCache(
            num_layers=2, num_kv_heads=hkv, head_dim=d, dtype=torch.bfloat16,
            max_batch_size=batch, max_context_len=lmax, device="cuda", layout=layout,
            memory_limit=96 << 20, lookahead_tokens=64, lookahead_pages_per_step=4,
            debug_fill_nan=True)
        copies: dict[int, torch.Tensor] = {}      # slot -> [len, 2 layers, 2, hkv, d]
        for iteration in range(600):
            if len(copies) < batch and rng.random() < 0.05:
                slot = cache.allocate()
                try:
                    cache.step({slot: 1})
                except vattn.OutOfPages:
                    cache.free(slot)
                else:
                    copies[slot] = torch.empty(0, 2, 2, hkv, d, device="cuda",
                                               dtype=torch.bfloat16)
            if copies and rng.random() < 0.02:
                slot = rng.choice(sorted(copies))
                cache.free(slot)                  # its pages stay until reclaimed
                del copies[slot]
            if rng.random() < 0.01:
                cache.trim(release=rng.random() < 0.5)
            lens = {s: c.shape[0] for s, c in copies.items() if c.shape[0] < lmax - 300}
            try:   # joins the pages this forward needs, queues the next forward's
                cache.step_async({s: n + 2 for s, n in lens.items()})
            except vattn.OutOfPages:
                try:
                    cache.step({s: n + 1 for s, n in lens.items()})
                except vattn.OutOfPages:           # full: the longest request finishes
                    victim = max(copies, key=lambda s: copies[s].shape[0])
                    cache.free(victim)
                    del copies[victim]
                    continue
            for slot, n in lens.items():          # append one token everywhere
                new = torch.randn(1, 2, 2, hkv, d, device="cuda", dtype=torch.bfloat16)
                for layer in range(2):
                    k, v = cache.kv(layer)
                    k[slot, n] = new[0, layer, 0]
                    v[slot, n] = new[0, layer, 1]
                copies[slot] = torch.cat([copies[slot], new])
            for slot, ref in copies.items():       # read every slot back
                n = ref.shape[0]
                for layer in range(2):
                    k, v = cache.kv(layer)
                    if not (torch.equal(k[slot, :n], ref[:, layer, 0])
                            and torch.equal(v[slot, :n], ref[:, layer, 1])):
                        raise AssertionError(f"{layout}: slot {slot} layer {layer} differs "
                                             f"at iteration {iteration}")
        cache.wait()
        stats = cache.stats()
        assert stats.pages_mapped + stats.pages_pending + stats.pages_free == stats.pages_created
        cache.close()


def unmap_waits_for_a_long_kernel() -> None:
    """free + trim right behind a long kernel: the unmap happens only after it."""
    cache = vattn.VirtualKVCache(num_layers=2, num_kv_heads=8, head_dim=128,
                                 dtype=torch.bfloat16, max_batch_size=2,
                                 max_context_len=8192, device="cuda", layout="per_layer",
                                 lookahead_tokens=0, memory_limit=256 << 20)
    slot = cache.allocate()
    cache.step({slot: 6000})
    k, _ = cache.kv(1)
    data = torch.randn(6000, 8, 128, device="cuda", dtype=torch.bfloat16)
    k[slot, :6000] = data
    copy = torch.empty_like(data)           # allocated now: a cudaMalloc would synchronize
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)          # ~0.2 s of GPU time ahead of the read
    copy.copy_(k[slot, :6000])
    cache.free(slot)
    cache.trim()                            # pages pending behind the free event
    assert cache.stats().pages_pending > 0
    other = cache.allocate()
    cache.step_async({other: 100})          # the mapper reaps only completed fences
    cache.wait()
    torch.cuda.synchronize()
    assert torch.equal(copy, data), "the slot was unmapped under a running kernel"
    cache.trim()
    assert cache.stats().pages_pending == 0
    cache.close()


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    torch.cuda.synchronize()
    print("ok")
