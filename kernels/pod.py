"""POD-style fused prefill + decode attention on the virtual cache, in one launch.

A hybrid batch (chunked prefill) holds one prefill chunk, compute-bound, and many
decodes, memory-bound. Run back to back, each kernel leaves the other's resource idle.
Here both kinds of work are cut into units and handed out at run time, so that prefill
tiles and decode splits run on every SM at once::

    prefill tiles   (query block of BLOCK_M chunk tokens, query head): causal attention
                    over the slot's cached prefix and the chunk
    decode splits   (request, KV head, split of SPLIT tokens): the GQA group's query
                    heads packed into a 16-row tile; the split that arrives last at its
                    (request, KV head) merges the partials (no second launch)

The launch has one program per unit ("virtual" programs, as POD does): a program's
kind is not fixed by its id but picked when it starts. It reads the SM it runs on
(``%smid``), takes a ticket from that SM's counter, and the ticket's kind follows the
policy (``"proportional"``: prefill tickets in the ratio of prefill to all units, spread
evenly; ``"50:50"``: alternate), so the programs resident on one SM at once take both
kinds. ``"partitioned"`` instead gives each SM one kind: a share of the SMs
(`PodTiling.decode_sms`) take decode splits, the others prefill tiles. ``"paired"``
keeps one prefill tile on each SM while they last: the SM's counter holds the prefill
programs running on it, a program takes a prefill tile when none is (and gives its
count back when the tile ends), a decode split otherwise; with two programs resident
on an SM, the other one decodes. The tickets of the first two policies alternate by
count, not by time, and a prefill tile lasts as long as many decode splits: in a
traced balanced batch under ``"50:50"`` about half the prefill tiles and three
quarters of the decode splits ran beside their own kind. A program then
claims the next unit of its kind from the kind's global counter, or of the other kind
when that is exhausted (there is always one left: one unit per program). Counters and
partials live in a workspace zeroed by the caller (one memset); nothing syncs with the
host, so a step can be captured in a CUDA graph.

The prefill chunk's K/V must already be in the cache (`append_kv`), at tokens
``[prefix_len, prefix_len + chunk)`` of its slot, as for `flash_attention`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from vattn.errors import InvalidArgument
from vattn.kernels.decode import (
    DTYPES,
    LOG2E,
    _attend_block,
    _clamp,
    _interpreted,
    _sm_count,
    check_heads,
    check_index,
    check_output,
    fold_partial,
    require_runnable,
)

SPLIT_BASE, SPLIT_MAX, SPLIT_SMS_PER_UNIT = 2048, 8192, 2
"""`PodTiling.split_for`'s rule: decode splits of SPLIT_BASE tokens, doubled up to
SPLIT_MAX while there is still a split for every SPLIT_SMS_PER_UNIT SMs."""

Policy = Literal["proportional", "50:50", "partitioned", "paired"]
POLICIES: tuple[Policy, ...] = ("proportional", "50:50", "partitioned", "paired")
_POLICY_CODE = {"proportional": 0, "50:50": 1, "partitioned": 2, "paired": 3}


@dataclass(slots=True, frozen=True)
class PodTiling:
    """How `pod_attention` cuts its work."""

    block_m: int = 64
    """Chunk tokens per prefill tile."""
    block_n: int = 64
    """K/V tokens per inner tile of a prefill tile."""
    decode_block_n: int = 64
    """K/V tokens per inner tile of a decode split."""
    split: int | None = None
    """Tokens per decode split (a multiple of `decode_block_n`). None (default): chosen
    from the decode batch, KV heads, the launch's `max_decode_len` and the SM count
    (`split_for`), never from the lengths, so a step can still be captured in a CUDA
    graph. On an H100 it made the fused launch 3-20% faster than a fixed 2048 in 20
    cells of `vattn bench pod`'s grid (18 with 32-64 decodes at 16K), and 1.14x against
    1.11x over back to back on the geomean of the other 36 (`tune_pod.py --grid split`,
    docs/benchmarks.md)."""
    num_warps: int = 4
    num_stages: int = 3
    decode_stages: int | None = None
    """Software-pipelining depth of a decode split's tile loop (default `num_stages`);
    1 loads its K/V tiles without staging buffers. On an H200, 1 and 2 made the
    decodes 9-88% slower and the fused launch no better (docs/benchmarks.md)."""
    decode_sms: float = 0.5
    """The ``"partitioned"`` policy: the share of SMs whose programs take decode
    splits first (the others take prefill tiles first), spread evenly over SM ids."""
    tma: bool | None = None
    """Load the K/V tiles of both kinds with the tensor memory accelerator (bulk
    copies through tensor descriptors, compute capability 9.0+) instead of one load
    per thread; it needs a power-of-two head dim and 16-byte aligned cache strides.
    A tile that crosses a length is copied as the box that ends at the length
    (`tma_shift`), so nothing past a length is read.
    None (default): wherever the GPU and the cache allow (on an H200 the fused launch
    was 0.3-6% faster with it, docs/benchmarks.md); True: required; False: never."""
    tma_shift: bool = True
    """With `tma`: copy a tile that would cross a length as the box that ends at the
    length (the tokens before the tile's start are masked, and the TMA fills tokens
    before 0 with zeros), so that nothing past a length is read and no read slack is
    needed. False: copy it whole and mask it, reading up to ``max(block_n,
    decode_block_n) - 1`` tokens past a length, which the cache's `read_slack` must
    cover (the default, 256 tokens, does). On an H100 the two were level within the
    run's noise (`tune_pod.py --grid shift`, docs/benchmarks.md)."""
    max_registers: int | None = None
    """A cap on registers per thread (Triton's ``maxnreg``), so that more programs fit
    on an SM; None: the compiler's choice. Ignored by the interpreter."""

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "decode_block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.split is not None and (self.split < self.decode_block_n
                                       or self.split % self.decode_block_n):
            raise ValueError(f"split must be a positive multiple of decode_block_n "
                             f"({self.decode_block_n}), got {self.split}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1 or (self.decode_stages is not None and self.decode_stages < 1):
            raise ValueError(f"num_stages and decode_stages must be >= 1, got "
                             f"{self.num_stages} and {self.decode_stages}")
        if not 0.0 <= self.decode_sms <= 1.0:
            raise ValueError(f"decode_sms must be in [0, 1], got {self.decode_sms}")
        if self.max_registers is not None and not 24 <= self.max_registers <= 255:
            raise ValueError(f"max_registers must be in [24, 255], got {self.max_registers}")

    def split_for(self, batch: int, num_kv_heads: int, max_decode_len: int,
                  num_sms: int) -> int:
        """The decode split of a launch: `split` where set; otherwise SPLIT_BASE tokens
        (at least `decode_block_n`), doubled up to SPLIT_MAX while the split is shorter
        than `max_decode_len` and the doubled one still leaves a split for every
        SPLIT_SMS_PER_UNIT SMs. Longer splits cost fewer partials, queries, pipeline
        fills and merges; the SMs a decode split leaves idle take prefill tiles.
        docs/benchmarks.md has the sweep behind the constants."""
        if self.split is not None:
            return self.split
        split = max(SPLIT_BASE, self.decode_block_n)
        while (split < min(SPLIT_MAX, max_decode_len) and SPLIT_SMS_PER_UNIT * batch
               * num_kv_heads * triton.cdiv(max_decode_len, 2 * split) >= num_sms):
            split *= 2
        return split


@triton.jit
def _smid(INTERPRETED: tl.constexpr, NUM_SM: tl.constexpr):  # type: ignore[no-untyped-def]
    """The SM this program runs on (the interpreter has none: the program id)."""
    if INTERPRETED:
        return tl.program_id(0) % NUM_SM
    else:
        return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32,
                                         is_pure=False, pack=1) % NUM_SM


@triton.jit
def _now(INTERPRETED: tl.constexpr):  # type: ignore[no-untyped-def]
    """The GPU's nanosecond clock (``%globaltimer``); 0 in the interpreter."""
    if INTERPRETED:
        return tl.program_id(0).to(tl.int64) * 0
    else:
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [],
                                         dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _prefill_tile(  # type: ignore[no-untyped-def]
    tile, qp_ptr, op_ptr, k_ptr, v_ptr, k_desc, v_desc, prefix, chunk, slot,
    stride_qm, stride_qh, stride_om, stride_oh,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh, qk_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """Causal attention of chunk tokens ``[m * BLOCK_M, (m + 1) * BLOCK_M)`` of one
    query head over the slot's tokens up to each one. Tiles are handed out longest
    first (tile = (M - 1 - m) * NUM_HEADS + head, M blocks in the chunk), so the last
    ones to start are the shortest. K/V blocks wholly before the tile's first query
    need no mask; only the last few (the diagonal) do."""
    m = tl.cdiv(chunk, BLOCK_M) - 1 - tile // NUM_HEADS
    head = tile % NUM_HEADS
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < chunk
    d_mask = offs_d < HEAD_DIM
    q = tl.load(qp_ptr + offs_m[:, None] * stride_qm + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kv_head = head // GROUP
    slot32 = slot.to(tl.int32)
    k_base = k_ptr + slot * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + slot * stride_vb + kv_head.to(tl.int64) * stride_vh
    # Offsets within a block fit in int32 (the wrapper checks); blocks move the base.
    k_offs = offs_n[:, None] * stride_kl + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vl + offs_d[None, :]
    last = prefix + offs_m            # each query's own position: it sees tokens <= last
    end = tl.minimum(prefix + (m + 1) * BLOCK_M, prefix + chunk)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    unmasked = (prefix + m * BLOCK_M) // BLOCK_N
    num_blocks = tl.cdiv(end, BLOCK_N)
    if INTERPRETED:
        block = 0
        while block < num_blocks:
            m_i, l_i, acc = _prefill_block(
                q, k_base, v_base, k_offs, v_offs, k_desc, v_desc, slot32, kv_head, block,
                last, end, prefix + chunk, m_i, l_i, acc, stride_kl, stride_vl, qk_scale,
                offs_n, d_mask, block >= unmasked, UPCAST, PRECISION, BLOCK_N, BLOCK_D, TMA,
                SHIFT)
            block += 1
    else:
        for block in range(0, unmasked):
            m_i, l_i, acc = _prefill_block(
                q, k_base, v_base, k_offs, v_offs, k_desc, v_desc, slot32, kv_head, block,
                last, end, prefix + chunk, m_i, l_i, acc, stride_kl, stride_vl, qk_scale,
                offs_n, d_mask, False, UPCAST, PRECISION, BLOCK_N, BLOCK_D, TMA, SHIFT)
        for block in range(unmasked, num_blocks):
            m_i, l_i, acc = _prefill_block(
                q, k_base, v_base, k_offs, v_offs, k_desc, v_desc, slot32, kv_head, block,
                last, end, prefix + chunk, m_i, l_i, acc, stride_kl, stride_vl, qk_scale,
                offs_n, d_mask, True, UPCAST, PRECISION, BLOCK_N, BLOCK_D, TMA, SHIFT)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(op_ptr + offs_m[:, None] * stride_om + head * stride_oh + offs_d[None, :],
             out.to(op_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _kv_tile(desc, ptrs, mask, slot, box, kv_head, MASKED, TMA: tl.constexpr,  # type: ignore[no-untyped-def]
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A ``[BLOCK_N, BLOCK_D]`` K or V tile: one bulk copy of tokens ``[box, box +
    BLOCK_N)`` of `slot` (TMA; tokens outside the mask are zeroed, so that no NaN of a
    page past the length, or of tokens an earlier tile took, reaches the sums) or a
    masked load per thread at `ptrs`."""
    if TMA:
        tile = desc.load([slot, box, kv_head, 0]).reshape(BLOCK_N, BLOCK_D)
        if MASKED:
            tile = tl.where(mask, tile, 0.0)
        return tile
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _decode_block_tma(  # type: ignore[no-untyped-def]
    q, k_desc, v_desc, slot, kv_head, box, start, end, m_i, l_i, acc, qk_scale, MASKED,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SHIFT: tl.constexpr,
):
    """`_attend_block` with its K/V tile copied by the TMA: tokens ``[box, box +
    BLOCK_N)``, of which ``[start, end)`` count. `MASKED` (a split's last, partial
    tile) drops the others: those at or past `end` (``box == start``) or, `SHIFT`, the
    box ending at `end`, those before `start`."""
    pos = box + tl.arange(0, BLOCK_N)
    n_mask = pos >= start if SHIFT else pos < end
    k = _kv_tile(k_desc, k_desc, n_mask[:, None], slot, box, kv_head, MASKED, True,
                 BLOCK_N, BLOCK_D)
    if UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    v = _kv_tile(v_desc, v_desc, n_mask[:, None], slot, box, kv_head, MASKED, True,
                 BLOCK_N, BLOCK_D)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _prefill_block(  # type: ignore[no-untyped-def]
    q, k_base, v_base, k_offs, v_offs, k_desc, v_desc, slot, kv_head, block, last, end,
    limit, m_i, l_i, acc, stride_kl, stride_vl, qk_scale, offs_n, d_mask, MASKED,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, TMA: tl.constexpr, SHIFT: tl.constexpr,
):
    """One block of BLOCK_N K/V tokens of a prefill tile: the online-softmax step.
    `MASKED` (the diagonal) masks tokens past each query and past the chunk; the
    blocks before need no mask, and rows past the chunk are dropped at the store.
    TMA and `SHIFT`: a block that would cross the slot's `limit` (its prefix and
    chunk) is copied as the box ending there, its tokens before the block masked."""
    start = block * BLOCK_N
    box = tl.minimum(start, limit - BLOCK_N) if TMA and SHIFT else start
    pos = box + offs_n
    k_ptrs = k_base + start.to(tl.int64) * stride_kl + k_offs
    v_ptrs = v_base + start.to(tl.int64) * stride_vl + v_offs
    n_mask = (pos >= start) & (pos < end) if TMA and SHIFT else pos < end
    kv_mask = n_mask[:, None] & d_mask[None, :] if MASKED else d_mask[None, :]
    k = _kv_tile(k_desc, k_ptrs, kv_mask, slot, box, kv_head, MASKED, TMA, BLOCK_N,
                 BLOCK_D)
    if UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(n_mask[None, :] & (pos[None, :] <= last[:, None]), qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)      # rows past the chunk
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    v = _kv_tile(v_desc, v_ptrs, kv_mask, slot, box, kv_head, MASKED, TMA, BLOCK_N,
                 BLOCK_D)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_split(  # type: ignore[no-untyped-def]
    unit, qd_ptr, od_ptr, k_ptr, v_ptr, k_desc, v_desc, lens_ptr, slots_ptr, part_ptr, lse_ptr,
    arrive_ptr, num_slots, max_len,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh, qk_scale,
    NUM_KV_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_SLOTS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr, TMA: tl.constexpr, SHIFT: tl.constexpr,
):
    """Split s of request b, KV head h (unit = (b * NUM_KV_HEADS + h) * NUM_SPLITS + s):
    a partial over its tokens; the last of the request's live splits (those holding
    tokens, and split 0) to arrive merges them. Splits past the request's length exit
    at once."""
    pair = unit // NUM_SPLITS
    split = unit % NUM_SPLITS
    row = pair // NUM_KV_HEADS
    kv_head = pair % NUM_KV_HEADS
    end = _clamp(tl.load(lens_ptr + row), max_len)
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + row).to(tl.int64)
        end = tl.where((slot >= 0) & (slot < num_slots), end, 0)
        slot = tl.where((slot >= 0) & (slot < num_slots), slot, 0)
    else:
        slot = row.to(tl.int64)
    live = tl.maximum(tl.cdiv(end, SPLIT), 1)   # splits with tokens (split 0 always)
    if split < live:
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kv_head * GROUP + offs_g
        q = tl.load(qd_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = k_ptr + slot * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = v_ptr + slot * stride_vb + kv_head.to(tl.int64) * stride_vh
        lo = split * SPLIT
        span = tl.maximum(tl.minimum(end, lo + SPLIT) - lo, 0)    # the split's tokens
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        if TMA:     # whole tiles unmasked, then the partial one
            whole = span // BLOCK_N
            slot32 = slot.to(tl.int32)
            if INTERPRETED:
                block = 0
                while block < whole:
                    m_i, l_i, acc = _decode_block_tma(
                        q, k_desc, v_desc, slot32, kv_head, lo + block * BLOCK_N,
                        lo + block * BLOCK_N, end, m_i, l_i, acc, qk_scale, False,
                        UPCAST, PRECISION, BLOCK_N, BLOCK_D, SHIFT)
                    block += 1
            else:
                for block in tl.range(0, whole, num_stages=STAGES):
                    m_i, l_i, acc = _decode_block_tma(
                        q, k_desc, v_desc, slot32, kv_head, lo + block * BLOCK_N,
                        lo + block * BLOCK_N, end, m_i, l_i, acc, qk_scale, False,
                        UPCAST, PRECISION, BLOCK_N, BLOCK_D, SHIFT)
            if span % BLOCK_N:      # SHIFT: the box ending at the split's last token
                m_i, l_i, acc = _decode_block_tma(
                    q, k_desc, v_desc, slot32, kv_head,
                    lo + span - BLOCK_N if SHIFT else lo + whole * BLOCK_N,
                    lo + whole * BLOCK_N, end, m_i, l_i, acc, qk_scale, True, UPCAST,
                    PRECISION, BLOCK_N, BLOCK_D, SHIFT)
        else:
            last_block = tl.cdiv(span, BLOCK_N)
            if INTERPRETED:
                block = 0
                while block < last_block:
                    m_i, l_i, acc = _attend_block(
                        q, k_base, v_base, k_base, block, lo, end, m_i, l_i, acc,
                        num_slots, stride_kb, stride_kl, stride_vb, stride_vl, qk_scale,
                        HEAD_DIM, 0, UPCAST, PRECISION, BLOCK_N, BLOCK_D)
                    block += 1
            else:
                for block in tl.range(0, last_block, num_stages=STAGES):
                    m_i, l_i, acc = _attend_block(
                        q, k_base, v_base, k_base, block, lo, end, m_i, l_i, acc,
                        num_slots, stride_kb, stride_kl, stride_vb, stride_vl, qk_scale,
                        HEAD_DIM, 0, UPCAST, PRECISION, BLOCK_N, BLOCK_D)
        has = l_i > 0
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        part = part_ptr + (unit * BLOCK_G + offs_g[:, None]) * BLOCK_D + offs_d[None, :]
        tl.store(part, acc / tl.where(has, l_i, 1.0)[:, None])
        tl.store(lse_ptr + unit * BLOCK_G + offs_g, lse)
        # Release this CTA's partial, then count the arrival; the last one merges.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrive_ptr + pair, 1, sem="acq_rel", scope="gpu")
        if arrived == live - 1:
            tl.debug_barrier()
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            denom = tl.zeros([BLOCK_G], tl.float32)
            total = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            s = 0
            while s < live:
                other = pair * NUM_SPLITS + s
                lse_s = tl.load(lse_ptr + other * BLOCK_G + offs_g, cache_modifier=".cg")
                o_s = tl.load(part_ptr + (other * BLOCK_G + offs_g[:, None]) * BLOCK_D
                              + offs_d[None, :], cache_modifier=".cg")
                m, denom, total = fold_partial(m, denom, total, lse_s, o_s)
                s += 1
            out = total / tl.where(denom > 0, denom, 1.0)[:, None]
            tl.store(od_ptr + row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(od_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _pod_kernel(  # type: ignore[no-untyped-def]
    qp_ptr, op_ptr, qd_ptr, od_ptr, k_ptr, v_ptr, kp_desc, vp_desc, kd_desc, vd_desc,
    lens_ptr, slots_ptr,
    part_ptr, lse_ptr, counters_ptr, arrive_ptr, trace_ptr,
    prefix, chunk, prefill_slot, num_prefill, num_decode, num_slots, max_len, decode_sms,
    stride_qpm, stride_qph, stride_opm, stride_oph,
    stride_qdb, stride_qdh, stride_odb, stride_odh,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh, qk_scale,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_SLOTS: tl.constexpr, POLICY: tl.constexpr,
    NUM_SM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ND: tl.constexpr,
    BLOCK_D: tl.constexpr, DECODE_STAGES: tl.constexpr, TRACE: tl.constexpr,
    TMA: tl.constexpr, SHIFT: tl.constexpr,
):
    # counters: [0] prefill units claimed, [1] decode units claimed, [2 + sm] tickets
    # (paired: prefill programs running on the SM).
    if TRACE:
        started = _now(INTERPRETED)
    sm = _smid(INTERPRETED, NUM_SM)
    total = num_prefill + num_decode
    if POLICY == 2:     # partitioned: decode_sms of the NUM_SM SMs, spread, decode first
        want_prefill = ((sm + 1) * decode_sms) // NUM_SM == (sm * decode_sms) // NUM_SM
    elif POLICY == 3:   # paired: a prefill tile when none runs on this SM
        want_prefill = tl.atomic_add(counters_ptr + 2 + sm, 1) == 0
        tl.atomic_add(counters_ptr + 2 + sm, -1, mask=want_prefill == 0)
    else:
        local = tl.atomic_add(counters_ptr + 2 + sm, 1)
        if POLICY == 1:     # 50:50
            want_prefill = local % 2 == 0
        else:   # proportional: ticket i is prefill when floor(i * P / T) steps (P of T)
            want_prefill = ((local + 1) * num_prefill) // total > (local * num_prefill) // total
    kind = tl.where(want_prefill, 0, 1)
    unit = tl.atomic_add(counters_ptr + kind, 1)
    if unit >= tl.where(kind == 0, num_prefill, num_decode):
        kind = 1 - kind             # that kind is exhausted: the other one
        unit = tl.atomic_add(counters_ptr + kind, 1)
    if POLICY == 3:     # a paired prefill count not spent on a prefill tile
        tl.atomic_add(counters_ptr + 2 + sm, -1, mask=want_prefill & (kind == 1))
    if kind == 0:
        _prefill_tile(unit, qp_ptr, op_ptr, k_ptr, v_ptr, kp_desc, vp_desc, prefix, chunk,
                      tl.cast(prefill_slot, tl.int64), stride_qpm, stride_qph, stride_opm,
                      stride_oph, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl,
                      stride_vh, qk_scale, NUM_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM,
                      UPCAST, PRECISION, INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_D, TMA,
                      SHIFT)
        if POLICY == 3:     # the tile ends: its count back (a decode program's
            # fallback onto a prefill tile took none)
            tl.atomic_add(counters_ptr + 2 + sm, -1, mask=want_prefill)
    else:
        _decode_split(unit, qd_ptr, od_ptr, k_ptr, v_ptr, kd_desc, vd_desc, lens_ptr,
                      slots_ptr, part_ptr,
                      lse_ptr, arrive_ptr, num_slots, max_len, stride_qdb, stride_qdh,
                      stride_odb, stride_odh, stride_kb, stride_kl, stride_kh, stride_vb,
                      stride_vl, stride_vh, qk_scale, NUM_KV_HEADS, NUM_SPLITS,
                      NUM_HEADS // NUM_KV_HEADS, HEAD_DIM, HAS_SLOTS, UPCAST, PRECISION,
                      INTERPRETED, SPLIT, BLOCK_G, BLOCK_ND, BLOCK_D, DECODE_STAGES, TMA,
                      SHIFT)
    if TRACE:
        row = trace_ptr + tl.program_id(0).to(tl.int64) * 5
        tl.store(row, started)
        tl.store(row + 1, _now(INTERPRETED))
        tl.store(row + 2, sm.to(tl.int64))
        tl.store(row + 3, kind.to(tl.int64))
        tl.store(row + 4, unit.to(tl.int64))


def _num_sms(device: torch.device) -> int:
    """SMs whose tickets the programs take; the interpreter pretends 2 (programs
    alternate between them), so that both kinds and the hand-over are exercised."""
    return _sm_count(device) if device.type == "cuda" else 2


def pod_attention(q_prefill: torch.Tensor, q_decode: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, prefill_slot: int, prefix_len: int,
                  decode_seqlens: torch.Tensor, decode_slots: torch.Tensor | None = None,
                  softmax_scale: float | None = None, policy: Policy = "50:50",
                  tiling: PodTiling | None = None, max_decode_len: int | None = None,
                  out_prefill: torch.Tensor | None = None,
                  out_decode: torch.Tensor | None = None,
                  trace: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill chunk's causal attention and many decodes' attention, in one launch.

    Args:
        q_prefill: ``[chunk, Hq, D]``, the chunk's queries: token ``prefix_len + i`` of
            slot `prefill_slot` for row ``i``; their K/V already appended.
        q_decode: ``[B, Hq, D]``, one query token per decoding request.
        k_cache, v_cache: ``[num_slots, Lmax, Hkv, D]`` strided views
            (``VirtualKVCache.kv(layer)``, either layout), last dim contiguous.
        prefill_slot, prefix_len: the chunk's slot and its cached tokens before it
            (launch arguments: a CUDA graph replays the values it was captured with).
        decode_seqlens: ``[B]`` int32/int64, each decode's tokens (its new K/V
            appended); values past ``Lmax`` are clamped.
        decode_slots: ``[B]``, the slot each decode reads (default row ``b``: slot
            ``b``); a slot out of range reads nothing (zero output).
        softmax_scale: default ``D ** -0.5``.
        policy: ``"50:50"`` (default: the best of the four on an H200, `vattn bench
            pod` and `tune_pod.py`) or ``"proportional"``, how each SM's programs
            alternate between prefill and decode units; ``"partitioned"``, each SM
            taking one kind first (`PodTiling.decode_sms` of them decode); or
            ``"paired"``, one prefill tile running on each SM at a time while they
            last, its other program decoding.
        tiling: default `PodTiling()`.
        max_decode_len: an upper bound on `decode_seqlens` (default ``Lmax``), as
            FlashAttention's ``max_seqlen_k``: the decodes are cut into
            ``ceil(max_decode_len / split)`` splits each, and longer lengths are
            clamped to it. A host int: a CUDA graph replays the captured value.
        out_prefill, out_decode: outputs to write into (CUDA graphs).
        trace: a diagnostic, int64 ``[units, 5]`` on the queries' device (`pod_units`
            gives the units): one row per program, its start and end on the GPU's
            nanosecond clock (``%globaltimer``; 0 in the interpreter), its SM, its kind
            (0 a prefill tile, 1 a decode split) and which tile or split of that kind.
            Compiled separately: a launch without it carries no clock reads.

    Returns ``(out_prefill [chunk, Hq, D], out_decode [B, Hq, D])``, q's dtype; equal
    within rounding to `flash_attention` on the chunk and `decode_attention` on the
    decodes.
    """
    tiling = tiling or PodTiling()
    chunk, num_heads, head_dim = _check(q_prefill, q_decode, k_cache, v_cache, prefill_slot,
                                        prefix_len, decode_seqlens, decode_slots, policy)
    batch, num_slots, max_len, num_kv_heads = (q_decode.shape[0], k_cache.shape[0],
                                               k_cache.shape[1], k_cache.shape[2])
    if max_decode_len is not None:
        if (not isinstance(max_decode_len, int) or isinstance(max_decode_len, bool)
                or max_decode_len < 1):
            raise InvalidArgument(f"max_decode_len must be an int >= 1, got "
                                  f"{max_decode_len!r}")
        max_len = min(max_len, max_decode_len)
    sms = _num_sms(q_decode.device)
    split = tiling.split_for(batch, num_kv_heads, max_len, sms)
    num_prefill, num_decode = _units(chunk, num_heads, batch, num_kv_heads, max_len,
                                     tiling.block_m, split)
    if trace is not None and (trace.dtype != torch.int64 or trace.device != q_decode.device
                              or trace.shape != (num_prefill + num_decode, 5)
                              or not trace.is_contiguous()):
        raise InvalidArgument(f"trace must be a contiguous int64 [{num_prefill + num_decode},"
                              f" 5] tensor on {q_decode.device}, got {tuple(trace.shape)} "
                              f"{trace.dtype} on {trace.device}")
    out_prefill = check_output(out_prefill, q_prefill, "out_prefill")
    out_decode = check_output(out_decode, q_decode, "out_decode")
    if chunk == 0 and batch == 0:
        return out_prefill, out_decode
    if max(k_cache.stride(1), v_cache.stride(1)) * tiling.block_n >= 2**31:
        raise InvalidArgument(f"a token stride of {max(k_cache.stride(1), v_cache.stride(1))}"
                              f" elements is too large for block_n={tiling.block_n} "
                              "(offsets within a block must fit in int32)")
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    if num_decode * block_g * block_d >= 2**31:     # the partials' int32 offsets
        raise InvalidArgument(f"{num_decode} decode splits of {block_g} x {block_d} floats "
                              f"exceed the 2**31 a launch can address; pass a smaller "
                              f"max_decode_len or a longer tiling.split than {split}")
    require_runnable(q_decode.device)
    dev = q_decode.device
    tma = (tiling.tma if tiling.tma is not None
           else _tma_refusal(k_cache, v_cache, block_d) is None)
    descs = _descriptors(k_cache, v_cache, tiling, block_d) if tma else (k_cache,) * 4
    num_splits = triton.cdiv(max_len, split)
    # One workspace, one memset: counters, arrivals, then the partials.
    ints = 2 + sms + batch * num_kv_heads
    floats = num_decode * block_g * (block_d + 1)
    work = torch.zeros(ints + floats, dtype=torch.int32, device=dev)
    counters, arrive = work[:2 + sms], work[2 + sms:ints]
    partials = work[ints:].view(torch.float32)
    lse, part = partials[:num_decode * block_g], partials[num_decode * block_g:]
    scale = (softmax_scale if softmax_scale is not None else head_dim ** -0.5) * LOG2E
    interpreted = _interpreted()
    # Stand-ins for pointers never read (no decodes: an empty tensor may have no storage).
    lens_arg = decode_seqlens if batch else counters
    slots_arg = decode_slots if decode_slots is not None and batch else lens_arg
    _pod_kernel[(num_prefill + num_decode,)](
        q_prefill, out_prefill, q_decode, out_decode, k_cache, v_cache, *descs,
        lens_arg, slots_arg, part, lse, counters, arrive,
        trace if trace is not None else counters,
        prefix_len, chunk, prefill_slot, num_prefill, num_decode, num_slots, max_len,
        round(tiling.decode_sms * sms),
        q_prefill.stride(0), q_prefill.stride(1), out_prefill.stride(0), out_prefill.stride(1),
        q_decode.stride(0), q_decode.stride(1), out_decode.stride(0), out_decode.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), scale,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, NUM_SPLITS=num_splits,
        HEAD_DIM=head_dim, HAS_SLOTS=decode_slots is not None,
        POLICY=_POLICY_CODE[policy], NUM_SM=sms,
        UPCAST=interpreted and q_decode.dtype == torch.bfloat16,
        PRECISION="ieee" if q_decode.dtype == torch.float32 else None,
        INTERPRETED=interpreted, SPLIT=split, BLOCK_M=tiling.block_m,
        BLOCK_G=block_g, BLOCK_N=tiling.block_n, BLOCK_ND=tiling.decode_block_n,
        BLOCK_D=block_d, TRACE=trace is not None,
        DECODE_STAGES=tiling.decode_stages or tiling.num_stages, TMA=tma,
        SHIFT=tma and tiling.tma_shift,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
        **({} if tiling.max_registers is None or interpreted
           else {"maxnreg": tiling.max_registers}))
    return out_prefill, out_decode


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """The tensor memory accelerator: compute capability 9.0+ (the interpreter has it)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _tma_refusal(k: torch.Tensor, v: torch.Tensor, block_d: int) -> str | None:
    """Why K/V tiles of this cache cannot be bulk-copied, or None where they can."""
    if not _has_tma(k.device):
        return "the tensor memory accelerator (compute capability 9.0+)"
    size = k.element_size()
    if k.shape[3] != block_d or any(
            t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:3]) for t in (k, v)):
        return (f"a power-of-two head dim and 16-byte aligned K/V addresses and strides; got "
                f"head dim {k.shape[3]}, strides {k.stride()} / {v.stride()} of {size}-byte "
                f"elements")
    return None


def _descriptors(k: torch.Tensor, v: torch.Tensor, tiling: PodTiling,
                 block_d: int) -> tuple[TensorDescriptor, ...]:
    """Tensor descriptors of K and V for the prefill tiles' and the decode splits' K/V
    boxes (``[1, tokens, 1, D]`` of ``[slots, Lmax, Hkv, D]``): the TMA zero-fills a box
    before token 0 or past ``Lmax``, so a tile never reads another slot."""
    refusal = _tma_refusal(k, v, block_d)
    if refusal is not None:
        raise InvalidArgument(f"tiling.tma needs {refusal}")
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, n, 1, block_d])
                 for n in (tiling.block_n, tiling.decode_block_n) for t in (k, v))


def pod_units(chunk: int, num_heads: int, batch: int, num_kv_heads: int,
              max_decode_len: int, tiling: PodTiling | None = None,
              device: torch.device | str = "cuda") -> tuple[int, int]:
    """``(prefill tiles, decode splits)`` of a `pod_attention` launch on `device`, one
    program each: ``ceil(chunk / block_m)`` per query head, and ``ceil(max_decode_len /
    split)`` per decode and KV head (`max_decode_len`: the launch's bound, at most
    ``Lmax``; the split is `PodTiling.split_for` the device's SM count)."""
    tiling = tiling or PodTiling()
    return _units(chunk, num_heads, batch, num_kv_heads, max_decode_len, tiling.block_m,
                  pod_split(batch, num_kv_heads, max_decode_len, tiling, device))


def pod_split(batch: int, num_kv_heads: int, max_decode_len: int,
              tiling: PodTiling | None = None, device: torch.device | str = "cuda") -> int:
    """The tokens per decode split of a `pod_attention` launch on `device`
    (`PodTiling.split_for` its SM count)."""
    tiling = tiling or PodTiling()
    # A set split needs no SM count: no device is queried (a CPU-only host included).
    return tiling.split or tiling.split_for(batch, num_kv_heads, max_decode_len,
                                            _num_sms(torch.device(device)))


def _units(chunk: int, num_heads: int, batch: int, num_kv_heads: int, max_decode_len: int,
           block_m: int, split: int) -> tuple[int, int]:
    return (triton.cdiv(chunk, block_m) * num_heads,
            batch * num_kv_heads * triton.cdiv(max_decode_len, split))


def _check(qp: torch.Tensor, qd: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           slot: int, prefix: int, lens: torch.Tensor, slots: torch.Tensor | None,
           policy: str) -> tuple[int, int, int]:
    """Everything `pod_attention` is given; returns (chunk, Hq, D)."""
    if policy not in POLICIES:
        raise InvalidArgument(f"policy must be one of {POLICIES}, got {policy!r}")
    if qp.dim() != 3 or qd.dim() != 3 or qp.shape[1:] != qd.shape[1:]:
        raise InvalidArgument(f"q_prefill and q_decode must be [n, Hq, D] with the same "
                              f"Hq and D, got {tuple(qp.shape)} and {tuple(qd.shape)}")
    chunk, num_heads, head_dim = qp.shape
    for name, t in (("k_cache", k), ("v_cache", v)):
        if t.dim() != 4 or t.shape != k.shape or t.shape[3] != head_dim:
            raise InvalidArgument(f"{name} must be [slots, Lmax, Hkv, {head_dim}] like "
                                  f"k_cache, got {tuple(t.shape)}")
    if qp.dtype not in DTYPES or {qd.dtype, k.dtype, v.dtype} != {qp.dtype}:
        raise InvalidArgument(f"queries and cache must share one of bf16, fp16, fp32; got "
                              f"{qp.dtype}, {qd.dtype}, {k.dtype}, {v.dtype}")
    if any(t.stride(-1) != 1 for t in (qp, qd, k, v)):
        raise InvalidArgument("queries and cache need a contiguous last dim")
    check_heads(num_heads, k.shape[2], head_dim)
    num_slots, max_len = k.shape[:2]
    if chunk > max_len:
        raise InvalidArgument(f"the chunk of {chunk} tokens does not fit in the cache's "
                              f"Lmax of {max_len}")
    for name, value, high in (("prefill_slot", slot, num_slots - 1),
                              ("prefix_len", prefix, max_len - chunk)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
            raise InvalidArgument(f"{name} must be an int in [0, {high}], got {value!r}"
                                  + (" (the chunk must fit in Lmax)" if name == "prefix_len"
                                     else ""))
    batch = qd.shape[0]
    index: list[tuple[str, torch.Tensor | None]] = [("decode_seqlens", lens),
                                                    ("decode_slots", slots)]
    check_index(index, batch)
    if slots is None and batch > num_slots:
        raise InvalidArgument(f"{batch} decodes read slots 0..{batch - 1} (no decode_slots "
                              f"given), but the cache has {num_slots}")
    tensors: list[tuple[str, torch.Tensor | None]] = [
        ("q_prefill", qp), ("k_cache", k), ("v_cache", v), *index]
    for name, tensor in tensors:
        if tensor is not None and tensor.device != qd.device:
            raise InvalidArgument(f"{name} is on {tensor.device}, q_decode on {qd.device}")
    return chunk, num_heads, head_dim
