"""Attention kernels that run on the virtual cache; import as `vattn.kernels`.

- `decode_attention`: split-KV Flash-Decoding in Triton over ``[slots, Lmax, Hkv, D]``
  strided views, per-request lengths, slots and start offsets, GQA.
- `append_kv`: one fused kernel writing new tokens' K and V at each request's position.
- `paged_decode_attention`: the same decode kernel behind a block table (the ablation's
  paged baseline, vLLM's block layout).

Never import this folder as a top-level `kernels`: transformers probes for an unrelated
package of that name.
"""

from vattn.kernels.append import append_kv
from vattn.kernels.decode import decode_attention, num_splits_for
from vattn.kernels.paged import paged_decode_attention

__all__ = ["append_kv", "decode_attention", "num_splits_for", "paged_decode_attention"]
