"""Attention kernels that run on the virtual cache; import as `vattn.kernels`.

- `decode_attention`: split-KV Flash-Decoding in Triton over ``[slots, Lmax, Hkv, D]``
  strided views, per-request lengths, slots and start offsets, GQA.
- `append_kv`: one fused kernel writing new tokens' K and V at each request's position.
- `flash_attention`: prefill chunks and decode through the best FlashAttention present
  (FlashAttention-3, flash-attn, torch's bundled FA2, SDPA); the result names the
  backend that ran.
- `paged_decode_attention`: the same decode kernel behind a block table (the ablation's
  paged baseline, vLLM's block layout).
- `pod_attention`: a prefill chunk and many decodes in one launch, prefill tiles and
  decode splits handed out at run time so both kinds share every SM (POD-Attention);
  `pod_units` counts its programs (for its diagnostic trace), `pod_split` gives its
  decode split.

Never import this folder as a top-level `kernels`: transformers probes for an unrelated
package of that name.

Where torch sees no CUDA device the kernels run through Triton's interpreter
(``TRITON_INTERPRET=1`` is set before they are defined, unless already set): slow, but
the same code, which is how CI and CPU users run them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vattn.kernels.append import append_kv  # noqa: E402
from vattn.kernels.decode import (  # noqa: E402
    Tiling,
    decode_attention,
    default_tiling,
    num_splits_for,
    tiling_for,
)
from vattn.kernels.flash import FlashResult, available_backends, flash_attention  # noqa: E402
from vattn.kernels.paged import paged_decode_attention  # noqa: E402
from vattn.kernels.pod import PodTiling, pod_attention, pod_split, pod_units  # noqa: E402

__all__ = ["FlashResult", "Tiling", "append_kv", "available_backends", "decode_attention",
           "default_tiling", "flash_attention", "num_splits_for", "paged_decode_attention",
           "PodTiling", "pod_attention", "pod_split", "pod_units", "tiling_for"]
