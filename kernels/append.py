"""Append new tokens' K and V to each request's slot at its position: one fused kernel.

Grid ``(B, token blocks, Hkv)``; each program copies up to BLOCK_T tokens of one KV head
of one request into K and into V. Writes past ``Lmax`` or past a row's count of new
tokens are masked off, and a slot out of range writes nothing, so bad indices cannot
write outside the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vattn.errors import InvalidArgument
from vattn.kernels.decode import check_index, require_runnable


@triton.jit
def _append_kernel(  # type: ignore[no-untyped-def]
    k_ptr, v_ptr, k_new_ptr, v_new_ptr, pos_ptr, slots_ptr, counts_ptr,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_knb, stride_knt, stride_knh,
    stride_vnb, stride_vnt, stride_vnh,
    num_slots, max_len, num_new,
    HEAD_DIM: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_COUNTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(2).to(tl.int64)      # offsets in int64: any strides
    offs_d = tl.arange(0, BLOCK_D)

    first = tl.load(pos_ptr + row).to(tl.int64)
    count = tl.load(counts_ptr + row) if HAS_COUNTS else num_new
    slot = tl.load(slots_ptr + row).to(tl.int64) if HAS_SLOTS else row.to(tl.int64)
    dest = first + t
    mask = (t < count) & (t < num_new) & (dest >= 0) & (dest < max_len)
    mask = mask & (slot >= 0) & (slot < num_slots)
    slot = tl.where((slot >= 0) & (slot < num_slots), slot, 0)
    mask2 = mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    src = t.to(tl.int64)[:, None]
    dst = dest[:, None]

    k = tl.load(k_new_ptr + row.to(tl.int64) * stride_knb + src * stride_knt + head * stride_knh
                + offs_d[None, :], mask=mask2)
    tl.store(k_ptr + slot * stride_kb + dst * stride_kl + head * stride_kh + offs_d[None, :],
             k.to(k_ptr.dtype.element_ty), mask=mask2)
    v = tl.load(v_new_ptr + row.to(tl.int64) * stride_vnb + src * stride_vnt + head * stride_vnh
                + offs_d[None, :], mask=mask2)
    tl.store(v_ptr + slot * stride_vb + dst * stride_vl + head * stride_vh + offs_d[None, :],
             v.to(v_ptr.dtype.element_ty), mask=mask2)


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
              v_new: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None = None,
              counts: torch.Tensor | None = None) -> None:
    """Write ``k_new[b, :counts[b]]`` / ``v_new[b, :counts[b]]`` into slot ``slots[b]`` of
    the caches at tokens ``positions[b]`` onward.

    Args:
        k_cache, v_cache: ``[num_slots, Lmax, Hkv, D]`` views (``VirtualKVCache.kv``),
            last dim contiguous. The written tokens must be mapped (``step`` first).
        k_new, v_new: ``[B, T, Hkv, D]``, last dim contiguous; cast to the cache dtype.
        positions: ``[B]`` int, each request's length before the append.
        slots: ``[B]`` int, the slot of each row; default row ``b`` is slot ``b``.
        counts: ``[B]`` int, how many of the T tokens each row appends (ragged
            appends); default all T.

    Tokens that would land past ``Lmax`` or before token 0 (a negative position: of
    ``T`` new tokens at position ``-2``, the first two are dropped and the rest land at
    tokens 0 onward), and rows whose slot is out of range, are not written. Two rows
    that write the same token of the same slot race: which one lands is undefined.

    Example::

        k, v = cache.kv(layer)
        append_kv(k, v, k_step[:, None], v_step[:, None], lengths)   # one token each
        lengths += 1
    """
    _check(k_cache, v_cache, k_new, v_new, positions, slots, counts)
    require_runnable(k_cache.device)
    batch, num_new, num_kv_heads, head_dim = k_new.shape
    if batch == 0 or num_new == 0:
        return
    block_t = min(64, triton.next_power_of_2(num_new))
    _append_kernel[(batch, triton.cdiv(num_new, block_t), num_kv_heads)](
        k_cache, v_cache, k_new, v_new, positions,
        slots if slots is not None else positions, counts if counts is not None else positions,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k_cache.shape[0], k_cache.shape[1], num_new,
        HEAD_DIM=head_dim, HAS_SLOTS=slots is not None, HAS_COUNTS=counts is not None,
        BLOCK_T=block_t, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), num_warps=4)


def _check(k: torch.Tensor, v: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
           positions: torch.Tensor, slots: torch.Tensor | None,
           counts: torch.Tensor | None) -> None:
    if k.dim() != 4 or v.shape != k.shape:
        raise InvalidArgument(f"k_cache and v_cache must be the same [slots, Lmax, Hkv, D], "
                              f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_new.dim() != 4 or v_new.shape != k_new.shape or k_new.shape[2:] != k.shape[2:]:
        raise InvalidArgument(f"k_new and v_new must be [B, T, {k.shape[2]}, {k.shape[3]}], "
                              f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if any(t.stride(-1) != 1 for t in (k, v, k_new, v_new)):
        raise InvalidArgument("caches and new K/V need a contiguous last dim")
    if (not k.dtype.is_floating_point or v.dtype != k.dtype
            or not k_new.dtype.is_floating_point or not v_new.dtype.is_floating_point):
        raise InvalidArgument(f"the caches must share one floating dtype and the new K/V be "
                              f"floating (cast to it), got k_cache {k.dtype}, v_cache "
                              f"{v.dtype}, k_new {k_new.dtype}, v_new {v_new.dtype}")
    index: list[tuple[str, torch.Tensor | None]] = [
        ("positions", positions), ("slots", slots), ("counts", counts)]
    check_index(index, k_new.shape[0])
    for name, tensor in [("v_cache", v), ("k_new", k_new), ("v_new", v_new), *index]:
        if tensor is not None and tensor.device != k.device:
            raise InvalidArgument(f"{name} is on {tensor.device}, k_cache on {k.device}")
