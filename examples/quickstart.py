"""Map a request's KV on demand, write it through the views, free it.

    python examples/quickstart.py            # CUDA if present, else the host backend
"""

import torch

import vattn

device = "cuda" if torch.cuda.is_available() else "cpu"
cache = vattn.VirtualKVCache(
    num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
    max_batch_size=8, max_context_len=32768, device=device, memory_limit=2 << 30)

slot = cache.allocate()
cache.step({slot: 3000})                      # pages for 3000 tokens (+ read slack)
for layer in range(cache.config.num_layers):
    k, v = cache.kv(layer)                    # [8, 32768, 8, 128] views, mostly unmapped
    k[slot, :3000] = torch.randn(3000, 8, 128, dtype=torch.bfloat16, device=device)
    v[slot, :3000] = k[slot, :3000] * 2

k, v = cache.kv(31)
assert torch.equal(v[slot, :3000], k[slot, :3000] * 2)
stats = cache.stats()
print(f"{cache}\nslot {slot} holds {cache.capacity(slot)} tokens; "
      f"{stats.physical_bytes / 2**20:.0f} MiB of physical memory mapped")
cache.free(slot)                              # pages stay for the next request
cache.close()
