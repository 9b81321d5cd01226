"""One call for prefill chunks and decode on the unmodified cache, through the best
FlashAttention present; the result says which backend ran.

In order of preference:

- ``flash-attn-3`` (Hopper): `flash_attn_interface.flash_attn_with_kvcache`, or the
  FlashAttention-3 build in vLLM's wheel (``torch.ops._vllm_fa3_C.fwd``, from an
  installed vllm or from the library file named by ``VATTN_FA3_LIBRARY``) on the
  dense cache with ``kv_batch_idx`` and ``seqused_k``;
- ``flash-attn``: the flash-attn package's `flash_attn_with_kvcache`;
- ``torch-fa2``: the FlashAttention-2 bundled in torch
  (`torch.ops.aten._flash_attention_forward`) in varlen mode on the ``[slots * Lmax,
  Hkv, D]`` view of the cache, ``cum_seq_k = slot * Lmax``, ``seqused_k`` = lengths;
- ``sdpa``: torch SDPA one request at a time (any device, the CPU included).

The query chunk of each request sits at the end of its cached tokens: with
``cache_seqlens[b] = n`` and ``Lq`` queries, query ``i`` is token ``n - Lq + i`` and, with
`causal`, attends to tokens ``< n - Lq + i + 1``. Decode is ``Lq = 1``.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vattn.errors import InvalidArgument
from vattn.kernels.decode import check_heads

Backend = Literal["flash-attn-3", "flash-attn", "torch-fa2", "sdpa"]
BACKENDS: tuple[Backend, ...] = ("flash-attn-3", "flash-attn", "torch-fa2", "sdpa")


@dataclass(slots=True, frozen=True)
class FlashResult:
    """What `flash_attention` returns."""

    out: torch.Tensor
    """``[B, Lq, Hq, D]``, q's dtype."""
    backend: Backend
    """The backend that ran."""


def available_backends(device: torch.device) -> list[Backend]:
    """The backends usable on `device`, best first."""
    found: list[Backend] = []
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        if major == 9 and (_kvcache_fn("flash_attn_interface") is not None
                           or _vllm_fa3() is not None):
            found.append("flash-attn-3")
        if _kvcache_fn("flash_attn") is not None:
            found.append("flash-attn")
        if major >= 8:
            found.append("torch-fa2")
    found.append("sdpa")
    return found


def flash_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_seqlens: torch.Tensor, slots: torch.Tensor | None = None,
                    causal: bool = True, softmax_scale: float | None = None,
                    backend: Backend | None = None) -> FlashResult:
    """Attention of a chunk of ``Lq`` queries per request over its slot of the cache.

    Args:
        q: ``[B, Lq, Hq, D]`` bf16/fp16 (fp32 too with ``sdpa``), last dim contiguous.
        k_cache, v_cache: ``[num_slots, Lmax, Hkv, D]`` views (``VirtualKVCache.kv``),
            the chunk's own K/V already appended.
        cache_seqlens: ``[B]`` int32, tokens of each request including the chunk, at
            most ``Lmax``.
        slots: ``[B]`` int, the slot of each row (default row ``b`` is slot ``b``), in
            ``[0, num_slots)``. Lengths and slots stay on the device (a CUDA graph can
            capture the call), so the FlashAttention backends take them as given, as
            FlashAttention does; the SDPA backend reads them and refuses bad ones.
        causal: mask future tokens, the chunk aligned to the end of the cache.
        softmax_scale: default ``D ** -0.5``.
        backend: force one of `available_backends` (default: the best one that takes
            the problem: the FlashAttention builds need bf16/fp16 and a head dim that
            is a multiple of 8 up to 256, SDPA takes the rest).

    Example::

        k, v = cache.kv(layer)
        result = flash_attention(q_chunk, k, v, lengths, slots)
        result.out, result.backend      # e.g. "torch-fa2"
    """
    _check(q, k_cache, v_cache, cache_seqlens, slots)
    usable = available_backends(q.device)
    if backend is None:     # the best one that takes this problem; SDPA takes any
        chosen = next(b for b in usable if _refusal(b, q) is None)
    elif backend not in usable:
        raise InvalidArgument(f"backend {backend!r} is not available on {q.device}; "
                              f"available: {usable}")
    else:
        chosen = backend
        reason = _refusal(chosen, q)
        if reason is not None:
            raise InvalidArgument(f"backend {chosen!r} {reason}")
    if q.numel() == 0:      # no rows or no queries: nothing to read
        return FlashResult(torch.empty_like(q), chosen)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if slots is None:
        slots = torch.arange(q.shape[0], device=q.device, dtype=torch.int32)
    run: Callable[..., torch.Tensor] = {
        "flash-attn-3": _flash_attn_package, "flash-attn": _flash_attn_package,
        "torch-fa2": _torch_fa2, "sdpa": _sdpa}[chosen]
    return FlashResult(run(q, k_cache, v_cache, cache_seqlens, slots, causal, scale, chosen),
                       chosen)


def _refusal(backend: Backend, q: torch.Tensor) -> str | None:
    """Why `backend` cannot take `q`, or None: the FlashAttention builds take bf16/fp16
    and head dims that are multiples of 8 up to 256."""
    if backend == "sdpa":
        return None
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs bf16 or fp16, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim > 256 or head_dim % 8:
        return f"needs a head dim that is a multiple of 8 up to 256, got {head_dim}"
    return None


def _kvcache_fn(module: str) -> Callable[..., Any] | None:
    try:
        return getattr(importlib.import_module(module), "flash_attn_with_kvcache", None)
    except Exception:       # absent, or built for another torch/CUDA: not usable
        return None


@functools.cache
def _vllm_fa3() -> Callable[..., Any] | None:
    """vLLM's FlashAttention-3 forward op, or None where it cannot be loaded."""
    try:
        path = os.environ.get("VATTN_FA3_LIBRARY")
        if path:
            torch.ops.load_library(path)
        else:
            importlib.import_module("vllm.vllm_flash_attn._vllm_fa3_C")
        return torch.ops._vllm_fa3_C.fwd
    except Exception:       # absent, or built for another torch/CUDA: not usable
        return None


def _vllm_fa3_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
                    slots: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """The op's 37 arguments: batched q, the dense cache read through ``kv_batch_idx``
    (slots) and ``seqused_k`` (lengths); no paging, window, softcap, rotary or fp8."""
    fwd = _vllm_fa3()
    assert fwd is not None
    out = fwd(q, k, v, None, None, None, None,        # k_new, v_new, q_v, out
              None, None, None, None, lens.int(),       # cu_seqlens_q/k/k_new, seqused_q/k
              None, None, None, slots.int(), None,       # max_seqlen_q/k, page_table, batch idx
              None, None, None, None, None, None,        # leftpad, rotary x3, descale x3
              scale, causal, -1, -1, 0.0, True,          # window, softcap, rotary interleave
              None, 0, None, 0, None, 1, 0, None)        # scheduler, splits, pack_gqa, cp
    return out[0]


def _flash_attn_package(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        lens: torch.Tensor, slots: torch.Tensor, causal: bool, scale: float,
                        backend: Backend) -> torch.Tensor:
    fn = _kvcache_fn("flash_attn_interface" if backend == "flash-attn-3" else "flash_attn")
    if fn is None and backend == "flash-attn-3":        # vLLM's build
        return _vllm_fa3_dense(q, k, v, lens, slots, causal, scale)
    assert fn is not None, "available_backends listed a backend that is absent"
    out = fn(q, k, v, cache_seqlens=lens.int(), cache_batch_idx=slots.int(), causal=causal,
             softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


def _torch_fa2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
               slots: torch.Tensor, causal: bool, scale: float,
               backend: Backend) -> torch.Tensor:
    batch, num_q, num_heads, head_dim = q.shape
    lmax = k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * num_q, num_q, device=q.device, dtype=torch.int32)
    # Each row's keys start at its slot; cum_seq_k needs one more entry, never read past
    # seqused_k: the end of the last row's slot.
    cu_k = torch.cat([slots.int() * lmax, (slots[-1:].int() + 1) * lmax])
    out = torch.ops.aten._flash_attention_forward(
        q.reshape(batch * num_q, num_heads, head_dim), k.flatten(0, 1), v.flatten(0, 1),
        cu_q, cu_k, num_q, lmax, 0.0, causal, False, scale=scale, seqused_k=lens.int())[0]
    return out.view(batch, num_q, num_heads, head_dim)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
          slots: torch.Tensor, causal: bool, scale: float,
          backend: Backend) -> torch.Tensor:
    """One request at a time (the lengths are read on the host)."""
    num_q = q.shape[1]
    out = torch.empty_like(q)
    num_slots, lmax = k.shape[:2]
    for row, (slot, n) in enumerate(zip(slots.tolist(), lens.tolist(), strict=True)):
        if not 0 <= slot < num_slots or n > lmax:
            raise InvalidArgument(f"row {row}: slot {slot} and cache_seqlens {n} must be in "
                                  f"[0, {num_slots}) and at most Lmax {lmax}")
        if n < num_q:
            raise InvalidArgument(f"row {row}: cache_seqlens {n} < the chunk's {num_q} "
                                  f"queries")
        keys, values = k[slot, :n].transpose(0, 1), v[slot, :n].transpose(0, 1)
        mask = None
        if causal:       # query i sees tokens <= n - num_q + i
            rows = torch.arange(num_q, device=q.device)[:, None] + (n - num_q)
            mask = torch.arange(n, device=q.device)[None, :] <= rows
        out[row] = torch.nn.functional.scaled_dot_product_attention(
            q[row].transpose(0, 1), keys, values, attn_mask=mask, scale=scale,
            enable_gqa=True).transpose(0, 1)
    return out


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
           slots: torch.Tensor | None) -> None:
    if q.dim() != 4:
        raise InvalidArgument(f"q must be [B, Lq, Hq, D], got shape {tuple(q.shape)}")
    batch, num_queries, num_heads, head_dim = q.shape
    if k.dim() != 4 or v.shape != k.shape or k.shape[3] != head_dim:
        raise InvalidArgument(f"k_cache and v_cache must be [slots, Lmax, Hkv, {head_dim}], "
                              f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InvalidArgument(f"q, k_cache, v_cache must share one floating dtype, got "
                              f"{q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k_cache", k), ("v_cache", v)):
        if t.device != q.device:
            raise InvalidArgument(f"{name} is on {t.device}, q on {q.device}")
    check_heads(num_heads, k.shape[2], head_dim, max_head_dim=None)
    num_slots, max_len = k.shape[:2]
    if num_queries > max_len:
        raise InvalidArgument(f"a chunk of {num_queries} queries cannot end inside the "
                              f"cache's Lmax of {max_len}")
    if slots is None and batch > num_slots:
        raise InvalidArgument(f"{batch} rows read slots 0..{batch - 1} (no slots given), but "
                              f"the cache has {num_slots}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise InvalidArgument("q, k_cache and v_cache need a contiguous last dim")
    if k.stride(0) != k.shape[1] * k.stride(1) or v.stride(0) != v.shape[1] * v.stride(1):
        raise InvalidArgument("the caches' slot stride must be Lmax * token stride (as "
                              "VirtualKVCache views are), so that [slots * Lmax] views exist")
    index: list[tuple[str, torch.Tensor | None]] = [("cache_seqlens", lens), ("slots", slots)]
    for name, ints in index:
        if ints is not None and (ints.shape != (batch,) or ints.dtype not in (
                torch.int32, torch.int64) or ints.device != q.device):
            raise InvalidArgument(f"{name} must be [{batch}] int32/int64 on {q.device}, got "
                                  f"{tuple(ints.shape)} {ints.dtype} on {ints.device}")
