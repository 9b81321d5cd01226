"""`pod_attention` (fused prefill + decode, one launch) against the float32 reference and
against the separate kernels, on a real `VirtualKVCache` with NaN-filled pages.

On a CPU through the Triton interpreter (small shapes; programs alternate between 2
pretend SMs, so both kinds, the hand-over between them and the last-arriver merge of
decode splits run); on a GPU the same tests compiled, plus a sampled sweep.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_kernels import (
    DEVICE,
    HKV,
    PAGE,
    D,
    _ints,
    fill,
    make_cache,
    reference,
    relative_error,
)
from vattn import InvalidArgument, VirtualKVCache
from vattn.kernels import decode_attention, pod_attention, pod_split, pod_units
from vattn.kernels.pod import (
    POLICIES,
    SPLIT_BASE,
    SPLIT_MAX,
    SPLIT_SMS_PER_UNIT,
    PodTiling,
)

SMALL = PodTiling(block_m=16, block_n=16, decode_block_n=16, split=32)  # many units


def worst_row_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative error of any row (a request, or a chunk token)."""
    return max(relative_error(o, r) for o, r in zip(out, ref, strict=True) if r.norm() > 0)


def causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: int,
                     prefix: int, scale: float) -> torch.Tensor:
    """float32 causal attention of chunk row i (token prefix + i) over tokens <= it."""
    chunk, num_heads, _ = q.shape
    group = num_heads // k.shape[2]
    end = prefix + chunk
    keys = k[slot, :end].float().repeat_interleave(group, dim=1)
    values = v[slot, :end].float().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,lhd->hml", q.float(), keys) * scale
    mask = torch.arange(end, device=q.device)[None] > (prefix + torch.arange(
        chunk, device=q.device))[:, None]
    scores = scores.masked_fill(mask[None], float("-inf"))
    return torch.einsum("hml,lhd->mhd", scores.softmax(-1), values)


def hybrid(dtype: torch.dtype, layout: str, prefix: int, chunk: int, lengths: list[int],
           group: int = 2):  # type: ignore[no-untyped-def]
    """A cache with one prefill slot (prefix + chunk tokens written) and decodes; a
    length of -1 becomes ``Lmax`` (the last decode split holds tokens). Returns the
    lengths too. The cache keeps 64 tokens mapped past each length: TMA-copied tiles
    that cross a length read up to 63 there (`PodTiling.tma`)."""
    slots = list(range(1, len(lengths) + 1))
    cache = make_cache(layout, dtype, slots=len(lengths) + 1, read_slack=64)
    for _ in range(len(lengths) + 1):
        cache.allocate()
    lengths[:] = [cache.max_context_len if n == -1 else n for n in lengths]
    fill(cache, 0, [0, *slots], [prefix + chunk, *lengths], dtype)
    k, v = cache.kv(0)
    qp = torch.randn(chunk, HKV * group, D, device=DEVICE).to(dtype)
    qd = torch.randn(len(lengths), HKV * group, D, device=DEVICE).to(dtype)
    return cache, k, v, qp, qd, slots


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layout,dtype", [("per_layer", torch.bfloat16),
                                          ("token_major", torch.float16),
                                          ("per_layer", torch.float32)])
def test_pod_matches_the_float32_reference(layout: str, dtype: torch.dtype,
                                           policy: str) -> None:
    torch.manual_seed(0)
    prefix, chunk, lengths = 45, 37, [1, 70, 33, 0, 129, -1]
    cache, k, v, qp, qd, slots = hybrid(dtype, layout, prefix, chunk, lengths)
    try:
        op, od = pod_attention(qp, qd, k, v, 0, prefix, _ints(lengths), _ints(slots),
                               policy=policy, tiling=SMALL)  # type: ignore[arg-type]
        scale = D ** -0.5
        ref_p = causal_reference(qp, k, v, 0, prefix, scale)
        ref_d = reference(qd, k, v, lengths, slots, [0] * len(lengths), scale)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert not torch.isnan(op).any() and not torch.isnan(od).any()
        assert worst_row_error(op, ref_p) < tol
        assert worst_row_error(od, ref_d) < tol
        assert torch.all(od[3] == 0)                    # nothing to attend to
    finally:
        cache.close()


def test_pod_equals_the_separate_decode_kernel() -> None:
    torch.manual_seed(1)
    prefix, chunk, lengths = 0, 20, [64, 65, -1, 7]
    cache, k, v, qp, qd, slots = hybrid(torch.bfloat16, "per_layer", prefix, chunk, lengths,
                                        group=4)
    try:
        _, od = pod_attention(qp, qd, k, v, 0, prefix, _ints(lengths), _ints(slots),
                              tiling=SMALL)
        alone = decode_attention(qd, k, v, _ints(lengths), _ints(slots))
        assert worst_row_error(od, alone.float()) < 1e-2
    finally:
        cache.close()


@pytest.mark.parametrize("bound", [129, 40])
def test_max_decode_len_sets_the_splits_and_clamps_longer_lengths(bound: int) -> None:
    """With the tight bound (129) the splits past it are never launched and the result
    is unchanged; a smaller one (40) clamps the longer decodes to their first 40
    tokens."""
    torch.manual_seed(3)
    prefix, chunk, lengths = 5, 17, [1, 70, 33, 0, 129]
    cache, k, v, qp, qd, slots = hybrid(torch.bfloat16, "per_layer", prefix, chunk, lengths)
    try:
        op, od = pod_attention(qp, qd, k, v, 0, prefix, _ints(lengths), _ints(slots),
                               tiling=SMALL, max_decode_len=bound)
        clamped = [min(n, bound) for n in lengths]
        ref_d = reference(qd, k, v, clamped, slots, [0] * len(lengths), D ** -0.5)
        assert worst_row_error(od, ref_d) < 1e-2
        assert worst_row_error(op, causal_reference(qp, k, v, 0, prefix, D ** -0.5)) < 1e-2
    finally:
        cache.close()


def test_pod_with_only_one_kind_of_work_and_preallocated_outputs() -> None:
    torch.manual_seed(2)
    cache, k, v, qp, qd, slots = hybrid(torch.float16, "per_layer", 10, 24, [50])
    try:
        out_p, out_d = torch.empty_like(qp), torch.empty_like(qd)
        got_p, _ = pod_attention(qp, qd[:0], k, v, 0, 10, _ints([]), out_prefill=out_p,
                                 tiling=SMALL)
        assert got_p is out_p
        assert relative_error(out_p, causal_reference(qp, k, v, 0, 10, D ** -0.5)) < 1e-2
        _, got_d = pod_attention(qp[:0], qd, k, v, 0, 0, _ints([50]), _ints(slots),
                                 out_decode=out_d)
        assert got_d is out_d
        ref = reference(qd, k, v, [50], slots, [0], D ** -0.5)
        assert relative_error(out_d, ref) < 1e-2
    finally:
        cache.close()


def paired_counts(monkeypatch: pytest.MonkeyPatch, *args: object,
                  **kwargs: object) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor]]:
    """`pod_attention(*args, policy="paired", **kwargs)`, and its per-SM counters (the
    prefill programs running on each SM) after the launch."""
    made: list[torch.Tensor] = []
    zeros = torch.zeros

    def spy(*shape: object, **options: object) -> torch.Tensor:
        out = zeros(*shape, **options)  # type: ignore[call-overload]
        made.append(out)
        return out

    with monkeypatch.context() as patched:
        patched.setattr(torch, "zeros", spy)
        outs = pod_attention(*args, policy="paired", **kwargs)  # type: ignore[arg-type]
    work = next(t for t in made if t.dtype == torch.int32)    # counters, arrivals, partials
    sms = torch.cuda.get_device_properties(work.device).multi_processor_count \
        if work.is_cuda else 2
    return work[2:2 + sms].tolist(), outs


def test_paired_gives_back_every_prefill_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every count a paired program takes is given back: by a prefill tile when it ends,
    at once when its SM already runs one, or when the prefill tiles have run out."""
    torch.manual_seed(6)
    prefix, chunk, lengths = 30, 50, [40, 97, -1]
    cache, k, v, qp, qd, slots = hybrid(torch.float16, "per_layer", prefix, chunk, lengths)
    try:
        counts, (op, od) = paired_counts(monkeypatch, qp, qd, k, v, 0, prefix,
                                         _ints(lengths), _ints(slots), tiling=SMALL)
        assert counts == [0] * len(counts) and counts
        assert worst_row_error(op, causal_reference(qp, k, v, 0, prefix, D ** -0.5)) < 1e-2
        assert worst_row_error(od, reference(qd, k, v, lengths, slots, [0] * 3,
                                             D ** -0.5)) < 1e-2
    finally:
        cache.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_the_trace_has_a_row_for_every_program(policy: str) -> None:
    check_trace(policy)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["50:50", "paired"])
def test_the_trace_on_the_gpu(policy: str) -> None:
    check_trace(policy)


def check_trace(policy: str) -> None:
    """One row a program: every prefill tile and decode split ran once, each on an SM
    of the device, and the outputs are those of the launch without a trace."""
    torch.manual_seed(7)
    prefix, chunk, lengths = 20, 40, [9, 70, -1]
    cache, k, v, qp, qd, slots = hybrid(torch.float16, "token_major", prefix, chunk, lengths)
    try:
        args = (qp, qd, k, v, 0, prefix, _ints(lengths), _ints(slots))
        num_prefill, num_decode = pod_units(chunk, qp.shape[1], len(lengths), HKV,
                                            k.shape[1], SMALL)
        trace = torch.full((num_prefill + num_decode, 5), -1, dtype=torch.int64,
                           device=DEVICE)
        op, od = pod_attention(*args, policy=policy, tiling=SMALL,  # type: ignore[arg-type]
                               trace=trace)
        plain_p, plain_d = pod_attention(*args, policy=policy,  # type: ignore[arg-type]
                                         tiling=SMALL)
        assert torch.equal(op, plain_p) and torch.equal(od, plain_d)
        start, end, sm, kind, unit = trace.cpu().T
        assert sorted(unit[kind == 0].tolist()) == list(range(num_prefill))
        assert sorted(unit[kind == 1].tolist()) == list(range(num_decode))
        sms = (torch.cuda.get_device_properties(DEVICE).multi_processor_count
               if DEVICE == "cuda" else 2)
        assert sm.min() >= 0 and sm.max() < sms
        assert (end >= start).all() and (start >= 0).all()
        if DEVICE == "cuda":                # the clock runs: one launch, within a second
            assert start.min() > 0 and end.max() - start.min() < 10**9
    finally:
        cache.close()


@pytest.mark.parametrize("change,message", [
    ("policy", "policy must be one of"),
    ("heads", "same Hq and D"),
    ("dtype", "must share one of"),
    ("prefix", "prefix_len must be an int"),
    ("slot", "prefill_slot must be an int"),
    ("lens", "decode_seqlens must be"),
    ("bound", "max_decode_len must be an int >= 1"),
    ("trace", "trace must be a contiguous int64"),
    ("column", "decode_seqlens must be a contiguous"),
    ("rows", "4 decodes read slots 0..3 .no decode_slots given., but the cache has 3"),
    ("out", "out_decode must be .2, 4, 64. torch.float16 on"),
    ("splits", "exceed the 2..31 a launch can address"),
    ("chunk", "the chunk of 80 tokens does not fit in the cache's Lmax of 64"),
    ("no_kv_heads", "KV heads and head dim must be >= 1, got 0 and 64"),
    ("overlap", "out_prefill has elements that share memory"),
])
def test_pod_refuses_bad_input(change: str, message: str) -> None:
    q = torch.randn(4, 4, D, device=DEVICE, dtype=torch.float16)
    k = torch.randn(3, 64, HKV, D, device=DEVICE, dtype=torch.float16)
    args: dict[str, object] = dict(q_prefill=q, q_decode=q[:2], k_cache=k, v_cache=k,
                                   prefill_slot=0, prefix_len=8, decode_seqlens=_ints([3, 4]))
    if change == "policy":
        args["policy"] = "fifo"
    elif change == "heads":
        args["q_decode"] = torch.randn(2, 2, D, device=DEVICE, dtype=torch.float16)
    elif change == "dtype":
        args["q_decode"] = q[:2].float()
    elif change == "prefix":
        args["prefix_len"] = 61                 # 61 + 4 > 64
    elif change == "slot":
        args["prefill_slot"] = 3
    elif change == "bound":
        args["max_decode_len"] = 0
    elif change == "trace":
        args["trace"] = torch.zeros(3, 5, dtype=torch.int64, device=DEVICE)   # too few rows
    elif change == "column":
        args["decode_seqlens"] = _ints([[3, 0], [4, 0]])[:, 0]
    elif change == "rows":
        args["q_decode"], args["decode_seqlens"] = q, _ints([3] * 4)
    elif change == "out":
        args["out_decode"] = torch.empty(2, 4, D, device="meta", dtype=torch.float16)
    elif change == "splits":    # 2**20 decode units of 16 x 64 floats each
        args["tiling"] = PodTiling(decode_block_n=16, split=16)
        args["q_decode"] = torch.randn(2**13, 4, D, device="meta", dtype=torch.float16)
        args["decode_seqlens"] = torch.ones(2**13, dtype=torch.int32, device="meta")
        args["decode_slots"] = torch.zeros(2**13, dtype=torch.int32, device="meta")
        args["q_prefill"] = q.to("meta")
        args["k_cache"] = args["v_cache"] = torch.empty(3, 2**12, HKV, D, device="meta",
                                                        dtype=torch.float16)
    elif change == "chunk":
        args["q_prefill"] = torch.randn(80, 4, D, device=DEVICE, dtype=torch.float16)
        args["prefix_len"] = 0
    elif change == "no_kv_heads":
        args["k_cache"] = args["v_cache"] = k[:, :, :0]
    elif change == "overlap":
        args["out_prefill"] = torch.empty(1, 4, D, device=DEVICE,
                                          dtype=torch.float16).expand(4, 4, D)
    else:
        args["decode_seqlens"] = _ints([3])
    with pytest.raises(InvalidArgument, match=message):
        pod_attention(**args)  # type: ignore[arg-type]


def test_tiling_is_validated() -> None:
    with pytest.raises(ValueError, match="split must be"):
        PodTiling(decode_block_n=64, split=96)
    with pytest.raises(ValueError, match="block_m"):
        PodTiling(block_m=48)
    with pytest.raises(ValueError, match="decode_sms must be in"):
        PodTiling(decode_sms=1.5)
    with pytest.raises(ValueError, match="decode_stages must be >= 1"):
        PodTiling(decode_stages=0)
    with pytest.raises(ValueError, match="max_registers must be in"):
        PodTiling(max_registers=300)


def test_the_split_from_the_shape_follows_the_decodes_not_their_lengths() -> None:
    """Few decodes keep the base split, many get longer ones (fewer partials to merge),
    a set split is kept, and `pod_units` counts with the split `pod_split` gives."""
    tiling = PodTiling()
    assert tiling.split is None                                 # the default: the rule
    assert tiling.split_for(8, 8, 4096, 132) == SPLIT_BASE      # 64 splits of 4096: too few
    assert tiling.split_for(8, 8, 16384, 132) == 8192           # 128 of 8192: enough
    assert tiling.split_for(64, 8, 16384, 132) == SPLIT_MAX > SPLIT_BASE
    assert tiling.split_for(64, 8, 4096, 132) == 4096           # one a decode, no longer
    assert tiling.split_for(64, 8, 1000, 132) == SPLIT_BASE    # one split a decode already
    assert PodTiling(decode_block_n=16384).split_for(64, 8, 65536, 132) == 16384
    assert PodTiling(split=2048).split_for(64, 8, 16384, 132) == 2048
    assert PodTiling(split=96, decode_block_n=32).split_for(64, 8, 16384, 132) == 96
    assert pod_split(64, 8, 16384, tiling, device="cpu") == tiling.split_for(64, 8, 16384, 2)
    assert pod_units(64, 32, 64, 8, 16384, device="cpu") == (32, 64 * 8 * 16384 // SPLIT_MAX)
    assert pod_units(64, 32, 64, 8, 16384, PodTiling(split=2048), device="cpu") == (
        32, 64 * 8 * 16384 // 2048)


def test_a_launch_takes_the_split_from_the_shape() -> None:
    """Split None: the launch's grid is the one `pod_units` counts for the device (the
    trace must match it), and both kinds match the float32 reference; in the
    interpreter (2 SMs) five decodes bounded by 16384 tokens get splits of SPLIT_MAX
    (8192), two of them live in the decode of 8300 tokens."""
    torch.manual_seed(11)
    prefix, chunk, lengths, lmax = 40, 17, [1, 70, 8300, 0, 129], 16384
    k, v = (torch.randn(len(lengths) + 1, lmax, HKV, D, device=DEVICE).to(torch.float16)
            for _ in range(2))
    qp = torch.randn(chunk, 2 * HKV, D, device=DEVICE).to(torch.float16)
    qd = torch.randn(len(lengths), 2 * HKV, D, device=DEVICE).to(torch.float16)
    tiling = PodTiling(split=None, block_m=16, block_n=16, decode_block_n=64)
    if DEVICE == "cpu":
        assert pod_split(len(lengths), HKV, lmax, tiling, device=DEVICE) == SPLIT_MAX
    trace = torch.zeros(sum(pod_units(chunk, 2 * HKV, len(lengths), HKV, lmax, tiling,
                                      device=DEVICE)), 5, dtype=torch.int64, device=DEVICE)
    slots = list(range(1, len(lengths) + 1))
    op, od = pod_attention(qp, qd, k, v, 0, prefix, _ints(lengths), _ints(slots),
                           tiling=tiling, trace=trace)
    assert worst_row_error(od, reference(qd, k, v, lengths, slots, [0] * len(lengths),
                                         D ** -0.5)) < 1e-2
    assert worst_row_error(op, causal_reference(qp, k, v, 0, prefix, D ** -0.5)) < 1e-2


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 256), heads=st.integers(1, 16), length=st.integers(1, 2**17),
       sms=st.integers(1, 200), block=st.sampled_from([16, 64, 128]))
def test_the_split_from_the_shape_is_the_longest_that_fills_the_sms(
        batch: int, heads: int, length: int, sms: int, block: int) -> None:
    split = PodTiling(split=None, decode_block_n=block).split_for(batch, heads, length, sms)
    units = batch * heads * -(-length // split)
    assert split % block == 0 and SPLIT_BASE <= split <= SPLIT_MAX
    assert split == SPLIT_BASE or SPLIT_SMS_PER_UNIT * units >= sms
    longer = batch * heads * -(-length // (2 * split))
    assert (split == SPLIT_MAX or split >= length
            or SPLIT_SMS_PER_UNIT * longer < sms)


@pytest.mark.parametrize("stages", [1, 2])
def test_decode_stages_leave_the_result_alone(stages: int) -> None:
    torch.manual_seed(8)
    prefix, chunk, lengths = 12, 30, [5, 90, -1]
    cache, k, v, qp, qd, slots = hybrid(torch.bfloat16, "per_layer", prefix, chunk, lengths)
    try:
        tiling = PodTiling(decode_block_n=16, split=32, decode_stages=stages)
        op, od = pod_attention(qp, qd, k, v, 0, prefix, _ints(lengths), _ints(slots),
                               tiling=tiling)
        assert worst_row_error(od, reference(qd, k, v, lengths, slots, [0] * 3,
                                             D ** -0.5)) < 1e-2
        assert worst_row_error(op, causal_reference(qp, k, v, 0, prefix, D ** -0.5)) < 1e-2
    finally:
        cache.close()


@pytest.mark.parametrize("layout,dtype", [("per_layer", torch.bfloat16),
                                          ("token_major", torch.float16)])
@pytest.mark.parametrize("tiling", [dataclasses.replace(SMALL, tma=True, tma_shift=False),
                                    dataclasses.replace(SMALL, tma=True, tma_shift=False,
                                                        split=48),
                                    dataclasses.replace(SMALL, tma=True),
                                    dataclasses.replace(SMALL, tma=True, split=48),
                                    dataclasses.replace(SMALL, tma=False),
                                    dataclasses.replace(SMALL, max_registers=128)],
                         ids=["tma", "tma-partial-tiles", "tma-shift",
                              "tma-shift-partial-tiles", "per-thread-loads",
                              "max-registers"])
def test_tma_and_a_register_cap_leave_the_result_alone(layout: str, dtype: torch.dtype,
                                                       tiling: PodTiling) -> None:
    """Bulk copies take the tiles wholly within the lengths, masked loads the rest;
    the NaN-filled pages past the lengths must not reach the sums. Lengths end inside
    a tile (70, 33, 129; the chunk at 30 + 35), on its edge (64 with 16-token tiles)
    and at Lmax; 48-token splits leave a partial last tile in every split."""
    torch.manual_seed(9)
    prefix, chunk, lengths = 30, 35, [70, 33, 0, 64, 129, -1]
    cache, k, v, qp, qd, slots = hybrid(dtype, layout, prefix, chunk, lengths)
    try:
        op, od = pod_attention(qp, qd, k, v, 0, prefix, _ints(lengths), _ints(slots),
                               tiling=tiling)
        assert not torch.isnan(op).any() and not torch.isnan(od).any()
        assert worst_row_error(od, reference(qd, k, v, lengths, slots, [0] * len(lengths),
                                             D ** -0.5)) < 1e-2
        assert worst_row_error(op, causal_reference(qp, k, v, 0, prefix, D ** -0.5)) < 1e-2
        assert torch.all(od[2] == 0)
    finally:
        cache.close()


def test_shifted_tma_boxes_need_no_read_slack() -> None:
    """With `PodTiling.tma_shift` (the default), a tile crossing a length is copied as
    the box ending there, so a cache with no read slack serves 64-token tiles: lengths
    under a tile (the box starts before token 0), inside one, and past a page's end. On
    the host a page holds 32 tokens (NaN when mapped, the next one unmapped): copied
    whole instead (``tma_shift=False``), the first tile of the 17-token decode reads
    the unmapped page past token 32 and faults."""
    torch.manual_seed(12)
    dtype = torch.bfloat16
    cache = VirtualKVCache(num_layers=8, num_kv_heads=HKV, head_dim=D, dtype=dtype,
                           max_batch_size=5, max_context_len=512, device=DEVICE,
                           layout="token_major", page_size_bytes=PAGE, read_slack=0,
                           lookahead_tokens=0, debug_fill_nan=True)
    try:
        prefix, chunk, lengths = 20, 17, [17, 40, 96, 200]
        slots = [cache.allocate() for _ in range(5)]
        fill(cache, 3, slots, [prefix + chunk, *lengths], dtype)
        k, v = cache.kv(3)
        assert cache.layout.tokens_for_pages(1) == PAGE // (8 * HKV * D * dtype.itemsize)
        qp = torch.randn(chunk, 2 * HKV, D, device=DEVICE).to(dtype)
        qd = torch.randn(len(lengths), 2 * HKV, D, device=DEVICE).to(dtype)
        op, od = pod_attention(qp, qd, k, v, slots[0], prefix, _ints(lengths),
                               _ints(slots[1:]), tiling=PodTiling(tma=True, tma_shift=True,
                                                                  split=128))
        assert not torch.isnan(op).any() and not torch.isnan(od).any()
        assert worst_row_error(od, reference(qd, k, v, lengths, slots[1:],
                                             [0] * len(lengths), D ** -0.5)) < 1e-2
        assert worst_row_error(op, causal_reference(qp, k, v, slots[0], prefix,
                                                    D ** -0.5)) < 1e-2
    finally:
        cache.close()


def test_tma_only_where_the_cache_allows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head dim of 48 cannot be boxed: required, it is refused before anything runs;
    by default the launch takes per-thread loads and matches the reference."""
    import vattn.kernels.pod as pod

    torch.manual_seed(10)
    q = torch.randn(4, 2, 48, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(3, 32, 2, 48, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.tensor([8, 1, 30, 17], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([1, 2, 1, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(InvalidArgument, match="power-of-two head dim"):
        pod_attention(q, q, k, v, 0, 0, lens, slots, tiling=PodTiling(tma=True))
    built = []
    monkeypatch.setattr(pod, "_descriptors", lambda *a: built.append(a) or (k,) * 4)
    op, od = pod_attention(q, q, k, v, 0, 0, lens, slots, tiling=SMALL)
    assert not built
    assert worst_row_error(od, reference(q, k, v, lens.tolist(), slots.tolist(), [0] * 4,
                                         48 ** -0.5)) < 1e-2
    assert worst_row_error(op, causal_reference(q, k, v, 0, 0, 48 ** -0.5)) < 1e-2


def test_the_fused_kernel_fits_two_programs_an_sm_on_hopper(
        sm90_footprints: dict[str, dict[str, object]]) -> None:
    """Compiled ahead of time for sm_90, the default tiling leaves room for two
    programs an SM, with and without the TMA, so that a prefill tile and a decode split
    can share an SM, and none spills registers to the stack."""
    for tma in (False, True, "shift"):
        used = sm90_footprints[f"pod tma={tma}"]
        assert used["fit"] >= used["programs_per_sm"] == 2, used
        assert used["bulk copies"] == (tma is not False), used
        assert used["stack"] == 0, used


@pytest.mark.gpu
@pytest.mark.parametrize("prefix,chunk,batch,context", [
    (0, 512, 8, 4096), (4096, 1024, 32, 16384), (16384, 2048, 64, 4096), (1000, 333, 5, 9000)])
def test_pod_sweep_on_the_gpu(prefix: int, chunk: int, batch: int, context: int,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama-3-8B heads (32 / 8 / 128), bf16, every policy: against the separate kernels
    and, on a sample of rows, the float32 reference; paired gives back every count."""
    from vattn.kernels import flash_attention

    torch.manual_seed(prefix + chunk)
    hkv, hq, d = 8, 32, 128
    lmax = max(prefix + chunk, context) + 1
    k = torch.randn(batch + 1, lmax, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qp = torch.randn(chunk, hq, d, device="cuda", dtype=torch.bfloat16)
    qd = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(1, context + 1, (batch,), device="cuda", dtype=torch.int32)
    slots = torch.arange(1, batch + 1, device="cuda", dtype=torch.int32)
    alone = decode_attention(qd, k, v, lengths, slots)
    flash = flash_attention(qp[None], k, v, torch.tensor([prefix + chunk], device="cuda",
                                                            dtype=torch.int32),
                            slots=torch.zeros(1, device="cuda", dtype=torch.int32),
                            causal=True).out[0]
    rows = torch.randperm(chunk)[:16].tolist()
    ref = causal_reference(qp, k, v, 0, prefix, d ** -0.5)
    for policy in POLICIES:
        if policy == "paired":
            counts, (op, od) = paired_counts(monkeypatch, qp, qd, k, v, 0, prefix, lengths,
                                             slots)
            assert counts == [0] * len(counts), counts
        else:
            op, od = pod_attention(qp, qd, k, v, 0, prefix, lengths, slots, policy=policy)
        assert relative_error(od, alone.float()) < 1e-2, policy
        assert relative_error(op, flash.float()) < 1e-2, policy
        assert relative_error(op[rows], ref[rows]) < 1e-2, policy
    for tiling in (PodTiling(tma=False), PodTiling(tma_shift=False),
                   PodTiling(block_n=32, decode_block_n=32, max_registers=168),
                   PodTiling(split=2048)):     # the fixed split the rule replaced
        op, od = pod_attention(qp, qd, k, v, 0, prefix, lengths, slots, tiling=tiling)
        assert relative_error(od, alone.float()) < 1e-2, tiling
        assert relative_error(op, flash.float()) < 1e-2, tiling


@pytest.mark.gpu
def test_pod_is_capturable_in_a_cuda_graph() -> None:
    """Decode lengths and queries change between replays (the workspace memset is in the
    graph too); the prefill's slot and prefix are the captured ones."""
    torch.manual_seed(4)
    prefix, chunk, lengths = 100, 64, [3000, 17, 4096]
    cache, k, v, qp, qd, slots = hybrid(torch.bfloat16, "token_major", prefix, chunk, lengths)
    try:
        lens, slot_ids = _ints(lengths), _ints(slots)
        out_p, out_d = torch.empty_like(qp), torch.empty_like(qd)
        pod_attention(qp, qd, k, v, 0, prefix, lens, slot_ids, out_prefill=out_p,
                      out_decode=out_d)                   # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pod_attention(qp, qd, k, v, 0, prefix, lens, slot_ids, out_prefill=out_p,
                          out_decode=out_d)
        for new in (lengths, [1, 16, 2048]):           # within what fill() wrote
            lens.copy_(_ints(new))
            qd.copy_(torch.randn_like(qd))
            graph.replay()
            torch.cuda.synchronize()
            assert worst_row_error(out_d, reference(qd, k, v, new, slots, [0] * 3,
                                                    D ** -0.5)) < 1e-2
            assert worst_row_error(out_p, causal_reference(qp, k, v, 0, prefix,
                                                           D ** -0.5)) < 1e-2
    finally:
        cache.close()
