"""Flash-Decoding on the virtual cache: split-KV decode attention in Triton.

One query token per request attends over that request's slot of a ``[slots, Lmax,
Hkv, D]`` strided K/V view (both vattn layouts, any batch/sequence/head strides, last
dim contiguous). One launch, or two::

    _split_kernel   grid (num_splits, Hkv): the batch's KV blocks, laid end to end, are
                    cut into num_splits runs of equal tiles (a request's start may
                    count as tiles, `Tiling.row_cost`); a program takes one run for the
                    query heads of one KV head (GQA group packed into the MMA tile). A
                    request within one run is written to the output at once; for one
                    that spans runs, each run writes a partial output and its
                    log2-sum-exp, and the last of them to finish (an atomic count per
                    request and KV head) rescales and sums them
    _reduce_kernel  grid (Hq, B, head-dim slices), where there are many runs a request
                    (or with ``Tiling(fused_reduction=False)``): a second launch that
                    merges every request's partials instead, up to 128 of them in one
                    load (a program then takes a slice of the head dim)

On Hopper and newer both launches are programmatic (`Tiling.pdl`): each may start
before the kernel ahead of it ends, and waits for it before reading what it writes.

A program attends over the requests of its run one loop each (`_segment`), or, with
``Tiling(flat=True)``, in one loop over all the run's blocks (`_flat_run`).

          request 0          request 1      request 2 (empty)  request 3
    |-----------------|--------------------||---------------------------|  blocks
    |  run 0   |   run 1    |   run 2   |   run 3    |   run 4   | run 5|  programs

The grid depends on the SM count and the KV heads only, and every program gets the
same work whatever the lengths: unequal lengths keep every SM busy. The runs are cut on
the device from the lengths (`_schedule`); programs past the last block exit at once.
Nothing syncs with the host, so a decode step can be captured in a CUDA graph. Loads
are masked to ``[start, length)``: no byte past a request's length is read.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from vattn.errors import InvalidArgument, VattnError

LOG2E = 1.4426950408889634
MAX_SPLITS = 1024
DTYPES = (torch.bfloat16, torch.float16, torch.float32)     # fp32: exact dots, for tests
MAX_BATCH = 4096        # rows a launch schedules (each program reads every row's length)
MAX_HEAD_DIM = 256      # the largest head dim the Triton kernels have tilings for


@triton.jit
def _schedule(  # type: ignore[no-untyped-def]
    lens_ptr, slots_ptr, starts_ptr, batch, num_slots, max_len, num_splits,
    HAS_STARTS: tl.constexpr, CHECK_SLOTS: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, ROW_COST: tl.constexpr,
):
    """The batch laid end to end, in blocks of BLOCK_N tokens. Returns, as vectors over
    the rows, each row's first token, its end and the running count of blocks through
    it, and the blocks of one run (``ceil(total / num_splits)``). Every program
    computes the same schedule.

    ROW_COST > 0: each row that has tokens, but the first, counts that many blocks
    more, placed before its own (`Tiling.row_cost`): no program attends over them, so
    a run that starts a row does fewer of its blocks. A row's own blocks are still the
    `cdiv(end - start, BLOCK_N)` that end at its entry of `through`, and a batch of
    one row is cut as with ROW_COST 0."""
    rows = tl.arange(0, BLOCK_B)
    in_batch = rows < batch
    # Clamped to [0, max_len] before the cast, so that no int64 value wraps.
    end = _clamp(tl.load(lens_ptr + rows, mask=in_batch, other=0), max_len)
    if HAS_STARTS:
        start = _clamp(tl.load(starts_ptr + rows, mask=in_batch, other=0), max_len)
    else:
        start = tl.zeros([BLOCK_B], tl.int32)
    if CHECK_SLOTS:     # a slot out of range reads nothing
        slot = tl.load(slots_ptr + rows, mask=in_batch, other=0)
        end = tl.where((slot >= 0) & (slot < num_slots), end, start)
    blocks = tl.where(in_batch & (end > start), tl.cdiv(end - start, BLOCK_N), 0)
    if ROW_COST > 0:    # the first row with tokens starts run 0: it costs no more
        through = tl.maximum(tl.cumsum(tl.where(blocks > 0, blocks + ROW_COST, 0), 0)
                             - ROW_COST, 0)
    else:
        through = tl.cumsum(blocks, 0)
    run = tl.maximum(tl.cdiv(tl.max(through, 0), num_splits), 1)
    return start, end, through, run


@triton.jit
def _clamp(values, max_len):  # type: ignore[no-untyped-def]
    """Loaded lengths or starts (int32 or int64) clamped to ``[0, max_len]``, as int32."""
    return tl.maximum(tl.minimum(values, max_len), 0).to(tl.int32)


@triton.jit
def _pick(values, rows, row):  # type: ignore[no-untyped-def]
    """``values[row]`` of a vector over the batch, as a scalar."""
    return tl.sum(tl.where(rows == row, values, 0), 0)


@triton.jit
def _kv_offsets(  # type: ignore[no-untyped-def]
    table, pos, n_mask, num_kv_blocks, stride_kb, stride_kl, stride_vb, stride_vl,
    KV_BLOCK: tl.constexpr,
):
    """Offsets of tokens `pos` from a head's K and V base, and the mask of those to
    read (`n_mask` less, for the paged twin, tokens of a block id out of range).

    Contiguous (KV_BLOCK == 0): token `pos` is at ``base + pos * stride_l``. Paged (the
    twin for the ablation): it is at ``base + table[pos // KV_BLOCK] * stride_b +
    (pos % KV_BLOCK) * stride_l``; a block id out of range reads nothing."""
    if KV_BLOCK > 0:
        block_id = tl.load(table + pos // KV_BLOCK, mask=n_mask, other=-1)
        n_mask = n_mask & (block_id >= 0) & (block_id < num_kv_blocks)
        block_id = tl.where(n_mask, block_id, 0).to(tl.int64)[:, None]
        within = (pos % KV_BLOCK).to(tl.int64)[:, None]
        k_off = block_id * stride_kb + within * stride_kl
        v_off = block_id * stride_vb + within * stride_vl
    else:
        pos64 = pos.to(tl.int64)[:, None]
        k_off = pos64 * stride_kl
        v_off = pos64 * stride_vl
    return k_off, v_off, n_mask


@triton.jit
def _attend_block(  # type: ignore[no-untyped-def]
    q, k_base, v_base, table, block, start, end, m_i, l_i, acc, num_kv_blocks,
    stride_kb, stride_kl, stride_vb, stride_vl, qk_scale,
    HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online softmax over one tile of BLOCK_N tokens: returns the new (m, l, acc).
    Tokens are addressed as `_kv_offsets` has it."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = start + block * BLOCK_N + offs_n
    k_off, v_off, n_mask = _kv_offsets(table, pos, pos < end, num_kv_blocks, stride_kb,
                                       stride_kl, stride_vb, stride_vl, KV_BLOCK)
    kv_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_base + k_off + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    qk = tl.where(n_mask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # Paged: a tile of bad block ids only, with none before it, is all -inf.
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0) if KV_BLOCK > 0 else m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    v = tl.load(v_base + v_off + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _split_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, v_ptr, lens_ptr, slots_ptr, starts_ptr, table_ptr, o_ptr, lse_ptr,
    out_ptr, arrive_ptr,
    stride_qb, stride_qh, stride_tb,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_op, stride_oh, stride_lp, stride_outb, stride_outh,
    qk_scale, batch, num_slots, max_len, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_SLOTS: tl.constexpr, HAS_STARTS: tl.constexpr, CHECK_SLOTS: tl.constexpr,
    FUSED: tl.constexpr, FLAT: tl.constexpr, INTERPRETED: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROW_COST: tl.constexpr,
):
    if PDL:     # launched early: the grid before must end before anything is read
        gdc_wait()
        if not FUSED:   # the merge launch may start now; it waits for this grid's end
            gdc_launch_dependents()
    piece = tl.program_id(0)        # the run of blocks this program takes
    kv_head = tl.program_id(1)
    rows = tl.arange(0, BLOCK_B)
    start, end, through, run = _schedule(
        lens_ptr, slots_ptr, starts_ptr, batch, num_slots, max_len, num_splits,
        HAS_STARTS, CHECK_SLOTS, BLOCK_B, BLOCK_N, ROW_COST)
    lo = piece * run
    hi = tl.minimum(lo + run, tl.max(through, 0))       # through[-1]: all the blocks
    # The rows holding blocks lo and hi - 1: the rows that end at or before it, counted.
    first_row = tl.sum((through <= lo).to(tl.int32), 0)
    last_row = tl.sum((through <= hi - 1).to(tl.int32), 0)
    if FLAT:
        _flat_run(q_ptr, k_ptr, v_ptr, slots_ptr, table_ptr, o_ptr, lse_ptr, out_ptr,
                  arrive_ptr, start, end, through, run, rows, first_row, last_row, piece,
                  kv_head, lo, hi, stride_qb, stride_qh, stride_tb, stride_kb, stride_kl,
                  stride_kh, stride_vb, stride_vl, stride_vh, stride_op, stride_oh,
                  stride_lp, stride_outb, stride_outh, qk_scale, num_slots, GROUP,
                  HEAD_DIM, KV_BLOCK, HAS_SLOTS, FUSED, INTERPRETED, UPCAST, PRECISION,
                  BLOCK_G, BLOCK_N, BLOCK_D)
    elif INTERPRETED:   # the interpreter cannot take loaded values as range() bounds
        row = first_row
        while row <= last_row:
            _segment(q_ptr, k_ptr, v_ptr, slots_ptr, table_ptr, o_ptr, lse_ptr, out_ptr,
                     arrive_ptr, start, end, through, run, rows, row, piece, kv_head, lo,
                     hi, stride_qb, stride_qh, stride_tb, stride_kb, stride_kl, stride_kh,
                     stride_vb, stride_vl, stride_vh, stride_op, stride_oh, stride_lp,
                     stride_outb, stride_outh, qk_scale, num_slots, GROUP, HEAD_DIM,
                     KV_BLOCK, HAS_SLOTS, FUSED, INTERPRETED, UPCAST, PRECISION, BLOCK_G,
                     BLOCK_N, BLOCK_D)
            row += 1
    else:
        for row in range(first_row, last_row + 1):
            _segment(q_ptr, k_ptr, v_ptr, slots_ptr, table_ptr, o_ptr, lse_ptr, out_ptr,
                     arrive_ptr, start, end, through, run, rows, row, piece, kv_head, lo,
                     hi, stride_qb, stride_qh, stride_tb, stride_kb, stride_kl, stride_kh,
                     stride_vb, stride_vl, stride_vh, stride_op, stride_oh, stride_lp,
                     stride_outb, stride_outh, qk_scale, num_slots, GROUP, HEAD_DIM,
                     KV_BLOCK, HAS_SLOTS, FUSED, INTERPRETED, UPCAST, PRECISION, BLOCK_G,
                     BLOCK_N, BLOCK_D)
    if FUSED:   # rows with nothing to attend to: zeros, each row by one program
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + offs_g
        zero_mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
        zeros = tl.zeros([BLOCK_G, BLOCK_D], out_ptr.dtype.element_ty)
        empty = (end <= start).to(tl.int32)
        row = piece
        while row < batch:
            if _pick(empty, rows, row) != 0:
                tl.store(out_ptr + row * stride_outb + heads[:, None] * stride_outh
                         + offs_d[None, :], zeros, mask=zero_mask)
            row += num_splits


@triton.jit
def _row_bounds(start, end, through, rows, row, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]
    """A row's first token, end, and the global indexes of its first block and of the
    block after its last."""
    row_start = _pick(start, rows, row)
    row_end = _pick(end, rows, row)
    row_through = _pick(through, rows, row)
    row_first = row_through - tl.cdiv(tl.maximum(row_end - row_start, 0), BLOCK_N)
    return row_start, row_end, row_first, row_through


@triton.jit
def _row_slot(slots_ptr, row, num_slots, KV_BLOCK: tl.constexpr,  # type: ignore[no-untyped-def]
              HAS_SLOTS: tl.constexpr):
    """The slot a row reads (0 for the paged twin, whose table holds the blocks)."""
    if KV_BLOCK > 0:
        slot = 0
    elif HAS_SLOTS:
        slot = tl.load(slots_ptr + row).to(tl.int64)
        slot = tl.where((slot >= 0) & (slot < num_slots), slot, 0)
    else:
        slot = row.to(tl.int64)
    return slot


@triton.jit
def _arrive(o_ptr, lse_ptr, out_ptr, arrive_ptr, row, kv_head, heads,  # type: ignore[no-untyped-def]
            offs_d, g_mask, gd_mask, first_piece, last_piece, stride_op, stride_oh,
            stride_lp, stride_outb, stride_outh, BLOCK_G: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """Count this run's arrival at `row` (its partial is stored); the last of the row's
    runs to arrive merges the partials into the output and resets the count."""
    tl.debug_barrier()
    count = arrive_ptr + row * tl.num_programs(1) + kv_head
    arrived = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
    if arrived == last_piece - first_piece:
        tl.debug_barrier()
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_G], tl.float32)
        total = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        other = first_piece
        while other <= last_piece:
            at = other + row
            lse_s = tl.load(lse_ptr + at * stride_lp + heads, mask=g_mask,
                            other=float("-inf"), cache_modifier=".cg")
            o_s = tl.load(o_ptr + at * stride_op + heads[:, None] * stride_oh
                          + offs_d[None, :], mask=gd_mask, other=0.0, cache_modifier=".cg")
            m, denom, total = fold_partial(m, denom, total, lse_s, o_s)
            other += 1
        tl.store(out_ptr + row * stride_outb + heads[:, None] * stride_outh
                 + offs_d[None, :], (total / tl.where(denom > 0, denom, 1.0)[:, None])
                 .to(out_ptr.dtype.element_ty), mask=gd_mask)
        tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")   # ready for the next


@triton.jit
def _flat_run(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, v_ptr, slots_ptr, table_ptr, o_ptr, lse_ptr, out_ptr, arrive_ptr, start,
    end, through, run, rows, first_row, last_row, piece, kv_head, lo, hi,
    stride_qb, stride_qh, stride_tb, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_op, stride_oh, stride_lp, stride_outb,
    stride_outh, qk_scale, num_slots,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_SLOTS: tl.constexpr, FUSED: tl.constexpr, INTERPRETED: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """`_segment` for every row of the run, in one loop over its blocks ``[lo, hi)``:
    the software pipeline keeps loading across a change of row instead of draining
    and filling again for each row. The row of each block comes from the schedule; at
    a row's last block in the run its output (a row within the run) or its partial is
    stored and the accumulators start afresh. Only the run's first and last rows can
    span runs: they count their arrival after the loop (FUSED)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    gd_mask = g_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    heads = kv_head * GROUP + offs_g
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if INTERPRETED:     # the interpreter cannot take loaded values as range() bounds
        blk = lo
        while blk < hi:
            m_i, l_i, acc = _flat_block(
                q_ptr, k_ptr, v_ptr, slots_ptr, table_ptr, o_ptr, lse_ptr, out_ptr, start,
                end, through, run, rows, piece, kv_head, hi, blk, heads, offs_d, g_mask,
                gd_mask, m_i, l_i, acc, stride_qb, stride_qh, stride_tb, stride_kb,
                stride_kl, stride_kh, stride_vb, stride_vl, stride_vh, stride_op,
                stride_oh, stride_lp, stride_outb, stride_outh, qk_scale, num_slots,
                HEAD_DIM, KV_BLOCK, HAS_SLOTS, FUSED, UPCAST, PRECISION, BLOCK_N, BLOCK_D)
            blk += 1
    else:
        for blk in range(lo, hi):
            m_i, l_i, acc = _flat_block(
                q_ptr, k_ptr, v_ptr, slots_ptr, table_ptr, o_ptr, lse_ptr, out_ptr, start,
                end, through, run, rows, piece, kv_head, hi, blk, heads, offs_d, g_mask,
                gd_mask, m_i, l_i, acc, stride_qb, stride_qh, stride_tb, stride_kb,
                stride_kl, stride_kh, stride_vb, stride_vl, stride_vh, stride_op,
                stride_oh, stride_lp, stride_outb, stride_outh, qk_scale, num_slots,
                HEAD_DIM, KV_BLOCK, HAS_SLOTS, FUSED, UPCAST, PRECISION, BLOCK_N, BLOCK_D)
    if FUSED and lo < hi:
        _arrive_if_split(o_ptr, lse_ptr, out_ptr, arrive_ptr, start, end, through, run,
                         rows, first_row, kv_head, heads, offs_d, g_mask, gd_mask,
                         stride_op, stride_oh, stride_lp, stride_outb, stride_outh,
                         BLOCK_G, BLOCK_N, BLOCK_D)
        if last_row != first_row:
            _arrive_if_split(o_ptr, lse_ptr, out_ptr, arrive_ptr, start, end, through,
                             run, rows, last_row, kv_head, heads, offs_d, g_mask, gd_mask,
                             stride_op, stride_oh, stride_lp, stride_outb, stride_outh,
                             BLOCK_G, BLOCK_N, BLOCK_D)


@triton.jit
def _arrive_if_split(  # type: ignore[no-untyped-def]
    o_ptr, lse_ptr, out_ptr, arrive_ptr, start, end, through, run, rows, row, kv_head,
    heads, offs_d, g_mask, gd_mask, stride_op, stride_oh, stride_lp, stride_outb,
    stride_outh, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """`_arrive` for `row` if its blocks lie in more than one run."""
    _, _, row_first, row_through = _row_bounds(start, end, through, rows, row, BLOCK_N)
    first_piece = row_first // run
    last_piece = (row_through - 1) // run
    if first_piece != last_piece:
        _arrive(o_ptr, lse_ptr, out_ptr, arrive_ptr, row, kv_head, heads, offs_d, g_mask,
                gd_mask, first_piece, last_piece, stride_op, stride_oh, stride_lp,
                stride_outb, stride_outh, BLOCK_G, BLOCK_D)


@triton.jit
def _flat_block(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, v_ptr, slots_ptr, table_ptr, o_ptr, lse_ptr, out_ptr, start, end,
    through, run, rows, piece, kv_head, hi, blk, heads, offs_d, g_mask, gd_mask, m_i, l_i,
    acc, stride_qb, stride_qh, stride_tb, stride_kb, stride_kl, stride_kh, stride_vb,
    stride_vl, stride_vh, stride_op, stride_oh, stride_lp, stride_outb, stride_outh,
    qk_scale, num_slots,
    HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr, HAS_SLOTS: tl.constexpr,
    FUSED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One block of `_flat_run`: attend, and at the row's last block in the run store
    its output or partial and return fresh accumulators."""
    row = tl.sum((through <= blk).to(tl.int32), 0)
    row_start, row_end, row_first, row_through = _row_bounds(start, end, through, rows,
                                                             row, BLOCK_N)
    slot = _row_slot(slots_ptr, row, num_slots, KV_BLOCK, HAS_SLOTS)
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i, l_i, acc = _attend_block(
        q, k_ptr + slot * stride_kb + kv_head.to(tl.int64) * stride_kh,
        v_ptr + slot * stride_vb + kv_head.to(tl.int64) * stride_vh,
        table_ptr + row * stride_tb,
        blk - row_first, row_start, row_end, m_i, l_i, acc, num_slots, stride_kb,
        stride_kl, stride_vb, stride_vl, qk_scale, HEAD_DIM, KV_BLOCK, UPCAST, PRECISION,
        BLOCK_N, BLOCK_D)
    if blk == tl.minimum(hi, row_through) - 1:      # the row's last block in this run
        has = l_i > 0
        safe_l = tl.where(has, l_i, 1.0)
        if FUSED and row_first // run == (row_through - 1) // run:
            tl.store(out_ptr + row * stride_outb + heads[:, None] * stride_outh
                     + offs_d[None, :], (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty),
                     mask=gd_mask)
        else:
            index = piece + row
            tl.store(o_ptr + index * stride_op + heads[:, None] * stride_oh
                     + offs_d[None, :], acc / safe_l[:, None], mask=gd_mask)
            tl.store(lse_ptr + index * stride_lp + heads,
                     tl.where(has, m_i + tl.log2(safe_l), float("-inf")), mask=g_mask)
        m_i = tl.full(m_i.shape, float("-inf"), tl.float32)
        l_i = tl.zeros(l_i.shape, tl.float32)
        acc = tl.zeros(acc.shape, tl.float32)
    return m_i, l_i, acc


@triton.jit
def _segment(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, v_ptr, slots_ptr, table_ptr, o_ptr, lse_ptr, out_ptr, arrive_ptr, start,
    end, through, run, rows, row, piece, kv_head, lo, hi,
    stride_qb, stride_qh, stride_tb, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_op, stride_oh, stride_lp, stride_outb,
    stride_outh, qk_scale, num_slots,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_SLOTS: tl.constexpr, FUSED: tl.constexpr, INTERPRETED: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Attend over the blocks of run `piece` (global blocks ``[lo, hi)``) that belong to
    `row`, and store the partial as number ``piece + row`` (unique: the runs after this
    one start at this row or later).

    FUSED: a row within one run is written to the output at once; otherwise the last
    of the row's runs to arrive (an atomic count per row and KV head) merges the
    partials and resets its count to zero for the next launch."""
    row_start, row_end, row_first, row_through = _row_bounds(start, end, through, rows,
                                                             row, BLOCK_N)
    first_block = tl.maximum(lo, row_first) - row_first
    last_block = tl.minimum(hi, row_through) - row_first
    slot = _row_slot(slots_ptr, row, num_slots, KV_BLOCK, HAS_SLOTS)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:          # the interpreter's bf16 tl.dot is wrong (triton 3.6): use fp32
        q = q.to(tl.float32)
    k_base = k_ptr + slot * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + slot * stride_vb + kv_head.to(tl.int64) * stride_vh
    table = table_ptr + row * stride_tb

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if INTERPRETED:
        block = first_block
        while block < last_block:
            m_i, l_i, acc = _attend_block(
                q, k_base, v_base, table, block, row_start, row_end, m_i, l_i, acc,
                num_slots, stride_kb, stride_kl, stride_vb, stride_vl, qk_scale,
                HEAD_DIM, KV_BLOCK, UPCAST, PRECISION, BLOCK_N, BLOCK_D)
            block += 1
    else:
        for block in range(first_block, last_block):
            m_i, l_i, acc = _attend_block(
                q, k_base, v_base, table, block, row_start, row_end, m_i, l_i, acc,
                num_slots, stride_kb, stride_kl, stride_vb, stride_vl, qk_scale,
                HEAD_DIM, KV_BLOCK, UPCAST, PRECISION, BLOCK_N, BLOCK_D)

    has = l_i > 0
    safe_l = tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(safe_l), float("-inf"))
    gd_mask = g_mask[:, None] & d_mask[None, :]
    out_ptrs = out_ptr + row * stride_outb + heads[:, None] * stride_outh + offs_d[None, :]
    # The runs holding the row's first and last blocks (as `_reduce_kernel` finds them).
    first_piece = row_first // run
    last_piece = (row_through - 1) // run
    if FUSED and first_piece == last_piece:
        if last_block > first_block:
            tl.store(out_ptrs, (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty),
                     mask=gd_mask)
    elif last_block > first_block:
        index = piece + row
        tl.store(o_ptr + index * stride_op + heads[:, None] * stride_oh + offs_d[None, :],
                 acc / safe_l[:, None], mask=gd_mask)
        tl.store(lse_ptr + index * stride_lp + heads, lse, mask=g_mask)
        if FUSED:   # release the partial, count the arrival; the last one merges
            _arrive(o_ptr, lse_ptr, out_ptr, arrive_ptr, row, kv_head, heads, offs_d,
                    g_mask, gd_mask, first_piece, last_piece, stride_op, stride_oh,
                    stride_lp, stride_outb, stride_outh, BLOCK_G, BLOCK_D)


@triton.jit
def fold_partial(m, denom, total, lse, o):  # type: ignore[no-untyped-def]
    """Fold one partial per row (its output `o` ``[G, D]`` and log2-sum-exp `lse`
    ``[G]``; -inf: empty) into the running max `m`, weight sum `denom` and weighted sum
    `total`; the merged output is ``total / denom``."""
    m_new = tl.maximum(m, lse)
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    scale = tl.where(m > float("-inf"), tl.exp2(m - m_safe), 0.0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m_safe), 0.0)
    return m_new, denom * scale + w, total * scale[:, None] + o * w[:, None]


@triton.jit
def _reduce_kernel(  # type: ignore[no-untyped-def]
    lens_ptr, slots_ptr, starts_ptr, o_ptr, lse_ptr, out_ptr,
    stride_op, stride_oh, stride_lp, stride_outb, stride_outh,
    batch, num_slots, max_len, num_splits,
    HEAD_DIM: tl.constexpr, HAS_STARTS: tl.constexpr, CHECK_SLOTS: tl.constexpr,
    INTERPRETED: tl.constexpr, PDL: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DM: tl.constexpr, ROW_COST: tl.constexpr,
):
    head = tl.program_id(0)
    row = tl.program_id(1)
    rows = tl.arange(0, BLOCK_B)
    # The lengths were final before any split program passed its wait, and this launch
    # starts only once every split program has passed it (PDL).
    start, end, through, run = _schedule(
        lens_ptr, slots_ptr, starts_ptr, batch, num_slots, max_len, num_splits,
        HAS_STARTS, CHECK_SLOTS, BLOCK_B, BLOCK_N, ROW_COST)
    if PDL:     # the partials: written by the split launch, visible once it completes
        gdc_wait()
    row_through = _pick(through, rows, row)
    row_first = row_through - tl.cdiv(tl.maximum(_pick(end - start, rows, row), 0), BLOCK_N)
    # The runs holding the row's first and last blocks wrote partials piece + row.
    first = row_first // run + row
    last = tl.where(row_through > row_first, (row_through - 1) // run + 1 + row, first)
    offs_d = tl.program_id(2) * BLOCK_DM + tl.arange(0, BLOCK_DM)   # a slice of the head
    d_mask = offs_d < HEAD_DIM
    m = tl.full([1], float("-inf"), tl.float32)
    denom = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_DM], tl.float32)
    if INTERPRETED:
        chunk = first
        while chunk < last:
            m, denom, acc = _merge(o_ptr, lse_ptr, chunk, last, head, m, denom, acc,
                                   stride_op, stride_oh, stride_lp, offs_d, d_mask, BLOCK_S)
            chunk += BLOCK_S
    else:
        for chunk in range(first, last, BLOCK_S):
            m, denom, acc = _merge(o_ptr, lse_ptr, chunk, last, head, m, denom, acc,
                                   stride_op, stride_oh, stride_lp, offs_d, d_mask, BLOCK_S)
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + row * stride_outb + head * stride_outh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _merge(  # type: ignore[no-untyped-def]
    o_ptr, lse_ptr, chunk, last, head, m, denom, acc, stride_op, stride_oh, stride_lp,
    offs_d, d_mask, BLOCK_S: tl.constexpr,
):
    """Fold partials ``[chunk, min(chunk + BLOCK_S, last))`` into (m, denom, acc).

    Both loads depend on the chunk alone, so they go out together and the loop's
    pipeline can prefetch the next chunks: an empty partial's output (never written)
    is dropped by a select, not by a load mask that would wait for its lse."""
    offs_s = chunk + tl.arange(0, BLOCK_S)
    in_range = offs_s < last
    lse = tl.load(lse_ptr + offs_s * stride_lp + head, mask=in_range, other=float("-inf"))
    o = tl.load(o_ptr + offs_s[:, None] * stride_op + head * stride_oh + offs_d[None, :],
                mask=in_range[:, None] & d_mask[None, :], other=0.0)
    live = lse > float("-inf")
    m_new = tl.maximum(m, tl.max(lse, 0))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    scale = tl.where(m > float("-inf"), tl.exp2(m - m_safe), 0.0)
    w = tl.where(live, tl.exp2(lse - m_safe), 0.0)
    weighted = tl.where(live[:, None], o * w[:, None], 0.0)
    return m_new, denom * scale + tl.sum(w, 0), acc * scale + tl.sum(weighted, 0)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_on_cpu_tensors() -> bool:
    """Whether the Triton kernels can take CPU tensors in this process: only through
    Triton's interpreter, and only if it was on when triton was first imported (its own
    library functions are defined then). `vattn.kernels` turns it on where torch sees
    no CUDA device; with one, set ``TRITON_INTERPRET=1`` before importing triton."""
    return type(tl.cumsum).__name__ == "InterpretedFunction"


def require_runnable(device: torch.device) -> None:
    """CPU tensors need Triton's interpreter (`runs_on_cpu_tensors`)."""
    if device.type == "cpu" and not runs_on_cpu_tensors():
        raise VattnError("vattn's Triton kernels run on CPU tensors only through Triton's "
                         "interpreter, which was off when triton was imported: set "
                         "TRITON_INTERPRET=1 before importing torch/triton/transformers "
                         "(or import vattn.kernels first)")


@functools.cache
def _has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled CUDA kernels on compute capability 9.0+."""
    return (device.type == "cuda" and not _interpreted()
            and torch.cuda.get_device_capability(device)[0] >= 9)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4                 # the interpreter: a few splits, to exercise the reduction
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclasses.dataclass(slots=True, frozen=True)
class Tiling:
    """How `decode_attention` cuts its work; `tiling_for` picks one per launch shape."""

    block_n: int
    """Tokens per tile of K/V (a power of two, >= 16)."""
    num_warps: int
    """Warps per split program."""
    num_stages: int
    """Software-pipelining depth of the tile loop."""
    programs_per_sm: int
    """Split programs in all per SM (the runs of one wave): sets the run count."""
    min_blocks_per_run: int = 1
    """Fewer runs where a run would get fewer tiles than this with every request at
    ``Lmax`` (a program's fixed cost dominates short runs)."""
    fused_reduction: bool | None = None
    """True: one launch, the last run of a request to finish merges its partials (an
    atomic count per request and KV head). False: a second launch merges them all.
    None: `merges_in_launch` decides from the run count and the batch."""
    pdl: bool = True
    """Programmatic dependent launch where the GPU has it (compute capability 9.0 and
    up), which hides the start of a launch behind the end of the one before it. The
    split launch may start before the kernel ahead of it in the stream ends, and waits
    for it (``griddepcontrol.wait``) before it reads anything. A merge launch (where
    the split launch does not merge, `merges_in_launch`) may start once every split
    program has passed that wait, and waits for the split launch to end before it
    reads the partials. On an H200 this took 0.6-1.4 us (5-8%) off batch-1 decodes
    (docs/benchmarks.md)."""
    merge_block: int = 128
    """Partials a program of the merge launch loads at once (a power of two); with
    more than 32, each program merges a slice of the head dim (4096 floats a load).
    128 against 32 (one head a program): 3-19% faster at batch 1 with 2 KV heads and
    8K-64K tokens on an H200, the same at batch 8-32 (docs/benchmarks.md)."""
    flat: bool = False
    """True: a program walks all the blocks of its run in one pipelined loop, the
    request changing inside it (`_flat_run`); each block finds its request from the
    schedule (reductions over the batch, so that its loads depend on the loop index
    alone and can be prefetched). False: one loop per request of the run, each filling
    the software pipeline afresh (`_segment`), the default: on an H200 the flat loop
    was 0-6% slower (docs/benchmarks.md)."""
    row_cost: int = 0
    """Tiles that a request's start counts for when the batch's blocks are cut into runs
    (`_schedule`; the batch's first request excepted): a run that starts a request,
    and so fills the software pipeline again and stores (and may merge) one more
    output, takes that many fewer tiles. 0: runs of equal tiles. Not with `flat`,
    whose loop walks the cut's blocks themselves. The default tiling of head dim <= 128
    takes 2 (docs/benchmarks.md, "A request's start counted in the cut")."""

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.merge_block < 1 or self.merge_block & (self.merge_block - 1):
            raise ValueError(f"merge_block must be a power of two, got {self.merge_block}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.row_cost < 0 or (self.row_cost and self.flat):
            raise ValueError(f"row_cost must be >= 0, and 0 with flat=True, got "
                             f"{self.row_cost} (flat={self.flat})")
        if min(self.num_stages, self.programs_per_sm, self.min_blocks_per_run) < 1:
            raise ValueError(f"num_stages, programs_per_sm and min_blocks_per_run must be "
                             f">= 1, got {self.num_stages}, {self.programs_per_sm} and "
                             f"{self.min_blocks_per_run}")


def default_tiling(head_dim: int) -> Tiling:
    """Measured on an H200 (docs/benchmarks.md, the tiling sweeps) for head dim 128: one
    program per SM with tiles of 128 tokens is within 0-5% of the best tiling on every
    shape swept, on plain tensors, and within 0-7% on a `token_major` cache, where
    64-token tiles at two programs per SM gain 2-6% on some shapes of batch 1-16 and
    lose 12-29% at batch 32 and at batch 1 with 2 KV heads. Head dim 256: 32-token
    tiles, 4 warps, 3 stages, two programs an SM: of five tilings timed on an H100
    (`tune_decode.py --grid d256`, docs/benchmarks.md) the fastest or within 0.3% of
    it, and 1.32x / 1.42x / 1.39x faster than the 8-warp tiling at one program an SM
    it replaces (batch 1 with 16 / 2 heads; batch 8 with 32 / 8 heads, equal and
    unequal lengths; 16K tokens). Launches with few tiles take shorter ones
    (`tiling_for`)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 128:
        return Tiling(block_n=128, num_warps=4, num_stages=3, programs_per_sm=1, row_cost=2)
    return Tiling(block_n=32, num_warps=4, num_stages=3, programs_per_sm=2)


@functools.cache     # on every launch's host path: built once per shape
def tiling_for(head_dim: int, batch: int, num_kv_heads: int, max_len: int,
               sm_count: int) -> Tiling:
    """The tiling `decode_attention` launches with: `default_tiling`, with shorter tiles
    where the batch has few tiles of 128 tokens at ``Lmax`` for the SMs
    (`shorter_where_few`)."""
    return shorter_where_few(default_tiling(head_dim), batch, num_kv_heads, max_len,
                             sm_count)


def shorter_where_few(tiling: Tiling, batch: int, num_kv_heads: int, max_len: int,
                      sm_count: int) -> Tiling:
    """`tiling` (of 128-token tiles; others are returned as they are), with shorter
    tiles where the batch has few tiles of 128 tokens at ``Lmax`` for the SMs: from the
    shape only, never the lengths, so the grid stays fixed. Those launches are bound by
    latency, not bytes, and more programs reading fewer tokens each finish sooner. On
    an H200 (132 SMs, 2 or 8 KV heads, docs/benchmarks.md) 32-token tiles took 16-28%
    off where the lengths filled at most SMs / 8 tiles of 128 (batch 1-2, 512-1K
    tokens), 64-token tiles 5-10% where they filled at most 2 x SMs (2K-16K tokens,
    batch 1-4); with more, 64 was level with 128 or up to 14% slower. The shorter
    tiles cut runs of equal tiles (``row_cost=0``), as they were measured. The paged
    twin takes the same rule (`paged_tiling_for`, where its figures are)."""
    if tiling.block_n != 128:       # head dim 256: not measured
        return tiling
    tiles = batch * num_kv_heads * triton.cdiv(max_len, 128)
    if tiles * 8 <= sm_count:
        return dataclasses.replace(tiling, block_n=32, row_cost=0)
    if tiles <= 2 * sm_count:
        return dataclasses.replace(tiling, block_n=64, row_cost=0)
    return tiling


FUSED_RUNS_PER_REQUEST = 4
"""The most runs per request (on average) for which the split launch merges too."""


def merges_in_launch(tiling: Tiling, num_splits: int, batch: int) -> bool:
    """Whether the split launch merges the partials itself. By default only when the runs
    are at most `FUSED_RUNS_PER_REQUEST` a request: the merging program reads a
    request's partials one after the other, so with many runs a request (batch 1 at
    64 runs: 16.5 against 8.7 us on an H200) the parallel second launch is faster, and
    with few it saves a launch (1-2% at batch 4-32, docs/benchmarks.md)."""
    if tiling.fused_reduction is not None:
        return tiling.fused_reduction
    return num_splits <= FUSED_RUNS_PER_REQUEST * batch


def num_splits_for(device: torch.device, batch: int, num_kv_heads: int, max_len: int,
                   tiling: Tiling) -> int:
    """Runs the batch's KV is cut into, per KV head: `tiling.programs_per_sm` programs
    per SM in all (rounded down: one wave), fewer where runs of every request at
    ``Lmax`` would be shorter than `tiling.min_blocks_per_run` tiles; from the SM count,
    the batch, the KV heads and ``Lmax`` only (never the lengths: the grid is fixed)."""
    want = tiling.programs_per_sm * _sm_count(device) // num_kv_heads
    most = triton.cdiv(batch * triton.cdiv(max_len, tiling.block_n), tiling.min_blocks_per_run)
    return max(1, min(want, most, MAX_SPLITS))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, slots: torch.Tensor | None = None,
                     starts: torch.Tensor | None = None, softmax_scale: float | None = None,
                     out: torch.Tensor | None = None,
                     num_splits: int | None = None,
                     workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one query token per request over its slot of the cache.

    Args:
        q: ``[B, Hq, D]`` bf16/fp16 (fp32 too, with exact fp32 dots: slower, for
            checks against float32 references), last dim contiguous; ``D`` at most
            `MAX_HEAD_DIM` (256), any size up to it (tiles are padded to a power of two).
        k_cache, v_cache: ``[num_slots, Lmax, Hkv, D]`` of q's dtype, any strides with the
            last dim contiguous (``VirtualKVCache.kv(layer)`` in either layout).
        cache_seqlens: ``[B]`` int32/int64, tokens of each request (the new token's K/V
            already appended); values past ``Lmax`` are clamped.
        slots: ``[B]`` int, the slot each query row reads (like FlashAttention's
            ``cache_batch_idx``); default row ``b`` reads slot ``b``. A slot out of
            range reads nothing (its output is zero).
        starts: ``[B]`` int, the first token each row attends to (left padding, like
            ``cache_leftpad``); default 0.
        softmax_scale: default ``D ** -0.5``.
        out: ``[B, Hq, D]`` of q's dtype to write into (for CUDA graphs); allocated if
            None.
        num_splits: cut the batch's KV, laid end to end, into this many runs per
            KV head, at most `MAX_SPLITS` (tests); default `num_splits_for`.
        workspace: int32, at least ``B * Hkv`` elements, all zero: the arrival counts
            of the merge, which the call leaves at zero again. Reuse one across calls
            (or a CUDA graph's replays) to save the memset of a fresh one; never share
            it between launches that may run at the same time (other streams).

    Returns ``[B, Hq, D]``: rows with nothing to attend to are zero.

    Example::

        k, v = cache.kv(layer)
        o = decode_attention(q, k, v, lengths_int32, slots=slot_ids)
    """
    check_inputs(q, k_cache, v_cache, cache_seqlens, slots, starts, workspace)
    if slots is None and q.shape[0] > k_cache.shape[0]:
        raise InvalidArgument(f"{q.shape[0]} query rows read slots 0..{q.shape[0] - 1} "
                              f"(no slots given), but the cache has {k_cache.shape[0]}")
    return launch(q, k_cache, v_cache, cache_seqlens, slots, starts, None, 0,
                  k_cache.shape[0], k_cache.shape[1], softmax_scale, out, num_splits,
                  workspace=workspace)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
           slots: torch.Tensor | None, starts: torch.Tensor | None,
           table: torch.Tensor | None, kv_block: int, num_slots: int, max_len: int,
           softmax_scale: float | None, out: torch.Tensor | None,
           num_splits: int | None, tiling: Tiling | None = None,
           workspace: torch.Tensor | None = None) -> torch.Tensor:
    """The launch (or two), on checked arguments. Contiguous (``kv_block == 0``): `k`,
    `v` are ``[num_slots, max_len, Hkv, D]``. Paged: ``[num_slots blocks, kv_block, Hkv,
    D]`` and `table` ``[B, max_len // kv_block]`` holds each row's block ids. `tiling`
    overrides `tiling_for` (the tuning sweep); `workspace` as in
    `decode_attention`."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    out = check_output(out, q, "out")
    if num_splits is not None and (not isinstance(num_splits, int)
                                   or isinstance(num_splits, bool)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise InvalidArgument(f"num_splits must be an int in [1, {MAX_SPLITS}], got "
                              f"{num_splits!r}")
    if batch == 0:
        return out
    require_runnable(q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    tiling = tiling or tiling_for(head_dim, batch, num_kv_heads, max_len, _sm_count(q.device))
    splits = num_splits or num_splits_for(q.device, batch, num_kv_heads, max_len, tiling)
    part = torch.empty(splits + batch, num_heads, head_dim, device=q.device,
                       dtype=torch.float32)     # partial piece + row, for every run
    lse = torch.empty(splits + batch, num_heads, device=q.device, dtype=torch.float32)
    scale = (softmax_scale if softmax_scale is not None else head_dim ** -0.5) * LOG2E
    dummy = lens                        # stands for absent pointers (never read)
    fused = merges_in_launch(tiling, splits, batch)
    # Arrivals per (request, KV head); the merging program sets its count back to 0.
    if not fused:
        arrive = dummy                  # never read
    elif workspace is not None:
        arrive = workspace
    else:
        arrive = torch.zeros(batch * num_kv_heads, device=q.device, dtype=torch.int32)
    pdl = tiling.pdl and _has_pdl(q.device)
    shared = dict(HAS_STARTS=starts is not None, CHECK_SLOTS=slots is not None and kv_block == 0,
                  INTERPRETED=_interpreted(), PDL=pdl,
                  BLOCK_B=max(2, triton.next_power_of_2(batch)), BLOCK_N=tiling.block_n,
                  BLOCK_D=block_d, ROW_COST=tiling.row_cost)
    launch_options = {"launch_pdl": True} if pdl else {}
    _split_kernel[(splits, num_kv_heads)](
        q, k, v, lens, slots if slots is not None else dummy,
        starts if starts is not None else dummy, table if table is not None else dummy,
        part, lse, out, arrive,
        q.stride(0), q.stride(1), table.stride(0) if table is not None else 0,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        part.stride(0), part.stride(1), lse.stride(0), out.stride(0), out.stride(1),
        scale, batch, num_slots, max_len, splits,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, KV_BLOCK=kv_block,
        HAS_SLOTS=slots is not None, FUSED=fused, FLAT=tiling.flat,
        UPCAST=_interpreted() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else None,   # fp32 exact, not tf32
        BLOCK_G=max(16, triton.next_power_of_2(num_heads // num_kv_heads)),
        **shared,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages, **launch_options)
    if fused:
        return out
    # A row has at most `splits` partials; a program holds at most 4096 of their floats,
    # in a slice of the head dim where the partials it loads at once are many.
    merge_block = min(tiling.merge_block, max(2, triton.next_power_of_2(splits)))
    merge_d = min(block_d, max(16, 4096 // merge_block))
    _reduce_kernel[(num_heads, batch, block_d // merge_d)](
        lens, slots if slots is not None else dummy, starts if starts is not None else dummy,
        part, lse, out,
        part.stride(0), part.stride(1), lse.stride(0), out.stride(0), out.stride(1),
        batch, num_slots, max_len, splits,
        HEAD_DIM=head_dim, BLOCK_S=merge_block, BLOCK_DM=merge_d, **shared, num_warps=4,
        **launch_options)
    return out


def check_index(index: list[tuple[str, torch.Tensor | None]], batch: int) -> None:
    """Each named per-row tensor (None: absent) is a contiguous ``[batch]`` int32/int64
    tensor: the kernels read row ``b``'s value at ``ptr + b``."""
    for name, ints in index:
        if ints is not None and (ints.shape != (batch,) or not ints.is_contiguous()
                                 or ints.dtype not in (torch.int32, torch.int64)):
            raise InvalidArgument(f"{name} must be a contiguous [{batch}] int32/int64 "
                                  f"tensor, got {tuple(ints.shape)} {ints.dtype} with "
                                  f"strides {ints.stride()}")


def check_heads(num_heads: int, num_kv_heads: int, head_dim: int,
                max_head_dim: int | None = MAX_HEAD_DIM) -> None:
    """At least one KV head, query heads a multiple of them, a head dim of at least 1
    (and at most `max_head_dim`, None: no bound)."""
    if num_kv_heads < 1 or head_dim < 1:
        raise InvalidArgument(f"KV heads and head dim must be >= 1, got {num_kv_heads} and "
                              f"{head_dim}")
    if max_head_dim is not None and head_dim > max_head_dim:
        raise InvalidArgument(f"head dim must be at most {max_head_dim}, got {head_dim}")
    if num_heads % num_kv_heads:
        raise InvalidArgument(f"query heads ({num_heads}) must be a multiple of KV heads "
                              f"({num_kv_heads})")


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of `t` may share memory (an expanded view, say): taken in
    the order of their strides, each dim of more than one element must step past the
    whole extent of the dims before it. Some exotic layouts without overlap are
    refused too."""
    extent = 1
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1)
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def check_output(out: torch.Tensor | None, q: torch.Tensor, name: str) -> torch.Tensor:
    """`out` (allocated like `q` if None), checked to be like `q`: shape, dtype, device,
    a contiguous last dim, and no two elements in the same memory (the kernels would
    race on them)."""
    if out is None:
        return torch.empty_like(q)
    if (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1
            or out.device != q.device):
        raise InvalidArgument(f"{name} must be {tuple(q.shape)} {q.dtype} on {q.device} "
                              f"with a contiguous last dim, got {tuple(out.shape)} "
                              f"{out.dtype} on {out.device}")
    if overlaps_itself(out):
        raise InvalidArgument(f"{name} has elements that share memory (strides "
                              f"{out.stride()} for shape {tuple(out.shape)})")
    return out


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
                 slots: torch.Tensor | None, starts: torch.Tensor | None,
                 workspace: torch.Tensor | None = None) -> None:
    """Shapes, dtypes, strides and devices (K/V as ``[N, L, Hkv, D]``). The paged
    twin passes its blocks as K/V and no `slots`."""
    if q.dim() != 3:
        raise InvalidArgument(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    if batch > MAX_BATCH:
        raise InvalidArgument(f"at most {MAX_BATCH} query rows a launch, got {batch}")
    for name, t in (("k_cache", k), ("v_cache", v)):
        if t.dim() != 4 or t.shape[3] != head_dim or t.shape != k.shape:
            raise InvalidArgument(f"{name} must be [slots, Lmax, Hkv, {head_dim}] like "
                                  f"k_cache, got {tuple(t.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InvalidArgument(f"q, k_cache, v_cache must all be bf16, fp16 or fp32, got "
                              f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise InvalidArgument("q, k_cache and v_cache need a contiguous last dim")
    check_heads(num_heads, k.shape[2], head_dim)
    index: list[tuple[str, torch.Tensor | None]] = [
        ("cache_seqlens", lens), ("slots", slots), ("starts", starts)]
    check_index(index, batch)
    for name, tensor in [("k_cache", k), ("v_cache", v), *index, ("workspace", workspace)]:
        if tensor is not None and tensor.device != q.device:
            raise InvalidArgument(f"{name} is on {tensor.device}, q on {q.device}")
    if workspace is not None and (workspace.dtype != torch.int32 or workspace.dim() != 1
                                  or not workspace.is_contiguous()
                                  or workspace.numel() < batch * k.shape[2]):
        raise InvalidArgument(f"workspace must be a contiguous 1-D int32 tensor of at least "
                              f"{batch * k.shape[2]} (B * Hkv) elements, got "
                              f"{tuple(workspace.shape)} {workspace.dtype}")
