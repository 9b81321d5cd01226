"""The paged twin of `decode_attention`, for the ablation: the same kernel with a
block-table indirection (vLLM's ``[num_blocks, block_size, Hkv, D]`` layout).

Only the address of a token differs: ``table[pos // block_size]`` picks the block, so any
difference in speed against the contiguous kernel is the cost of paging. The twin has a
tiling of its own (`paged_tiling`), tuned separately so that the comparison is fair, and
takes shorter tiles where a launch has few, by the contiguous kernel's rule
(`paged_tiling_for`).
"""

from __future__ import annotations

import torch

from vattn.errors import InvalidArgument
from vattn.kernels.decode import (
    Tiling,
    _sm_count,
    check_inputs,
    default_tiling,
    launch,
    shorter_where_few,
)


def paged_tiling(head_dim: int) -> Tiling:
    """Measured on an H200 (docs/benchmarks.md, `tune_decode.py --grid paged`) at block
    16 and 128, head dim 128: two programs per SM and two stages, 9-24% faster than the
    contiguous kernel's tiling at batch 8-32 (the block-id loads need more programs in
    flight). Other head dims use the contiguous kernel's."""
    if head_dim <= 128:
        return Tiling(block_n=128, num_warps=4, num_stages=2, programs_per_sm=2)
    return default_tiling(head_dim)


def paged_tiling_for(head_dim: int, batch: int, num_kv_heads: int, max_len: int,
                     sm_count: int) -> Tiling:
    """The tiling `paged_decode_attention` launches with: `paged_tiling`, with the
    contiguous kernel's shorter tiles where the batch has few tiles of 128 tokens at
    ``max_blocks * block_size`` for the SMs (`shorter_where_few`). Measured on an H100
    (`tune_decode.py --grid paged`, batch 1, 2 KV heads, docs/benchmarks.md), at block
    16 and 128 alike: 5.2 against 9.1 us at 512 tokens, 6.8 against 7.1 at 2K, 9.4
    against 9.7 at 8K, 12.7-13.1 against 14.4 at 16K."""
    return shorter_where_few(paged_tiling(head_dim), batch, num_kv_heads, max_len,
                             sm_count)


def paged_decode_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                           block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                           starts: torch.Tensor | None = None,
                           softmax_scale: float | None = None,
                           out: torch.Tensor | None = None,
                           num_splits: int | None = None,
                           workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one query token per request over paged K/V.

    Args:
        q: ``[B, Hq, D]`` bf16/fp16.
        k_blocks, v_blocks: ``[num_blocks, block_size, Hkv, D]`` of q's dtype, last dim
            contiguous.
        block_table: ``[B, max_blocks]`` int32/int64, the blocks of each request in
            order; ids out of ``[0, num_blocks)`` read nothing.
        cache_seqlens: ``[B]`` int, tokens of each request (at most
            ``max_blocks * block_size``; more are clamped).
        starts, softmax_scale, out, num_splits, workspace: as in `decode_attention`.

    Returns ``[B, Hq, D]``.

    Example::

        o = paged_decode_attention(q, k_blocks, v_blocks, block_table, lengths)
    """
    check_inputs(q, k_blocks, v_blocks, cache_seqlens, None, starts, workspace)
    batch = q.shape[0]
    if (block_table.dim() != 2 or block_table.shape[0] != batch
            or block_table.dtype not in (torch.int32, torch.int64)
            or block_table.stride(1) != 1 or block_table.device != q.device):
        raise InvalidArgument(f"block_table must be [{batch}, max_blocks] int32/int64 on "
                              f"{q.device} with a contiguous last dim, got "
                              f"{tuple(block_table.shape)} {block_table.dtype} on "
                              f"{block_table.device}")
    block_size = k_blocks.shape[1]
    max_len = block_table.shape[1] * block_size
    tiling = paged_tiling_for(q.shape[-1], batch, k_blocks.shape[2], max_len,
                              _sm_count(q.device))
    return launch(q, k_blocks, v_blocks, cache_seqlens, None, starts, block_table,
                  block_size, k_blocks.shape[0], max_len, softmax_scale, out, num_splits,
                  tiling, workspace)
