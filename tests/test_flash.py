"""`vattn.kernels.flash_attention`: prefill chunks aligned to the end of the cached tokens,
and decode, on a real cache, against a float32 reference; the backend it reports."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels import DEVICE, HKV, D, _ints, fill, make_cache
from vattn import InvalidArgument
from vattn.kernels import available_backends, flash_attention
from vattn.layout import LAYOUTS


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
              slots: list[int], causal: bool) -> torch.Tensor:
    """float32: query i of row b is token n - Lq + i and sees tokens up to it."""
    batch, num_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    out = torch.empty(batch, num_q, num_heads, head_dim, device=q.device)
    for row, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
        keys = k[slot, :n].float().repeat_interleave(group, dim=1)
        values = v[slot, :n].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,lhd->hql", q[row].float(), keys) * head_dim ** -0.5
        if causal:
            seen = torch.arange(n, device=q.device)[None, :] <= (
                torch.arange(num_q, device=q.device)[:, None] + n - num_q)
            scores = scores.masked_fill(~seen, float("-inf"))
        out[row] = torch.einsum("hql,lhd->qhd", scores.softmax(-1), values)
    return out


def best_backend() -> str:
    return available_backends(torch.device(DEVICE))[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_q, causal", [(1, True), (7, True), (7, False)])
def test_chunk_and_decode_match_the_reference(layout: str, num_q: int, causal: bool) -> None:
    dtype = torch.bfloat16
    with make_cache(layout, dtype, slots=4) as cache:
        slots = [cache.allocate() for _ in range(4)]
        lengths = [7, 54, 97, 300]                  # the first row: its whole prompt
        fill(cache, 1, slots, lengths, dtype)
        k, v = cache.kv(1)
        rows = [2, 0, 3]
        q = torch.randn(len(rows), num_q, 4 * HKV, D, device=DEVICE).to(dtype)
        row_slots, row_lengths = [slots[r] for r in rows], [lengths[r] for r in rows]
        result = flash_attention(q, k, v, _ints(row_lengths), _ints(row_slots), causal=causal)
        assert result.backend == best_backend()
        ref = reference(q, k, v, row_lengths, row_slots, causal)
        assert result.out.shape == q.shape and not torch.isnan(result.out).any()
        err = ((result.out.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2


def test_sdpa_is_what_a_cpu_has() -> None:
    assert available_backends(torch.device("cpu")) == ["sdpa"]


@pytest.mark.gpu
def test_torch_fa2_runs_when_no_flash_attn_package_is_installed() -> None:
    backends = available_backends(torch.device("cuda"))
    if "flash-attn" in backends or "flash-attn-3" in backends:
        pytest.skip(f"a FlashAttention package is installed: {backends}")
    assert backends[0] == "torch-fa2"


def test_bad_input_is_refused() -> None:
    k = torch.randn(2, 64, HKV, D).to(torch.float16)
    q = torch.randn(1, 3, 4, D).to(torch.float16)
    with pytest.raises(InvalidArgument, match="is not available"):
        flash_attention(q, k, k, torch.tensor([9], dtype=torch.int32), backend="torch-fa2")
    with pytest.raises(InvalidArgument, match=r"q must be \[B, Lq, Hq, D\]"):
        flash_attention(q[0], k, k, torch.tensor([9], dtype=torch.int32))
    with pytest.raises(InvalidArgument, match="slot stride must be Lmax"):
        flash_attention(q, k[:, :32], k[:, :32], torch.tensor([9], dtype=torch.int32))
    with pytest.raises(InvalidArgument, match="cache_seqlens 2 < the chunk's 3 queries"):
        flash_attention(q, k, k, torch.tensor([2], dtype=torch.int32))
    lens = torch.tensor([9], dtype=torch.int32)
    with pytest.raises(InvalidArgument, match="must share one floating dtype"):
        flash_attention(q.int(), k.int(), k.int(), lens)
    with pytest.raises(InvalidArgument, match="k_cache is on meta, q on cpu"):
        flash_attention(q, k.to("meta"), k, lens)
    with pytest.raises(InvalidArgument, match="KV heads and head dim must be >= 1"):
        flash_attention(q, k[:, :, :0], k[:, :, :0], lens)
    with pytest.raises(InvalidArgument, match="a chunk of 65 queries cannot end inside"):
        flash_attention(torch.randn(1, 65, 4, D).to(torch.float16), k, k, lens)
    with pytest.raises(InvalidArgument, match=r"3 rows read slots 0..2 \(no slots given\)"):
        flash_attention(q.expand(3, -1, -1, -1), k, k, lens.expand(3).contiguous())
    for slot, length in ((-1, 9), (2, 9), (0, 65)):     # SDPA reads them on the host
        with pytest.raises(InvalidArgument, match=r"must be in \[0, 2\) and at most Lmax 64"):
            flash_attention(q, k, k, torch.tensor([length], dtype=torch.int32),
                            torch.tensor([slot], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_backend_on_the_gpu_matches_the_reference(layout: str) -> None:
    # FlashAttention-3 loads whole tiles past seqused_k and multiplies what it loaded by
    # zero weights, so it needs the cache's read slack mapped and finite (a real cache
    # holds zeros or stale K/V there): the NaN the pages were filled with is overwritten
    # with random values past each length.
    dtype, slack = torch.bfloat16, 256
    with make_cache(layout, dtype, slots=3, read_slack=slack) as cache:
        slots = [cache.allocate() for _ in range(3)]
        lengths = [9000, 97, 8193]                  # past a 2 MiB page
        fill(cache, 0, slots, lengths, dtype)
        k, v = cache.kv(0)
        for slot, n in zip(slots, lengths, strict=True):
            stop = min(n + slack, cache.max_context_len)
            k[slot, n:stop].normal_()
            v[slot, n:stop].normal_()
        for backend in available_backends(torch.device(DEVICE)):
            for num_q in (1, 16):
                q = torch.randn(3, num_q, 4 * HKV, D, device=DEVICE).to(dtype)
                result = flash_attention(q, k, v, _ints(lengths), _ints(slots),
                                         backend=backend)
                assert result.backend == backend
                ref = reference(q, k, v, lengths, slots, True)
                err = ((result.out.float() - ref).norm() / ref.norm()).item()
                assert not torch.isnan(result.out).any() and err < 1e-2, (backend, num_q)


def test_a_bad_fa3_library_path_means_no_fa3(monkeypatch: pytest.MonkeyPatch) -> None:
    from vattn.kernels import flash

    monkeypatch.setenv("VATTN_FA3_LIBRARY", "/nonexistent/_vllm_fa3_C.abi3.so")
    flash._vllm_fa3.cache_clear()
    try:
        assert flash._vllm_fa3() is None
    finally:
        flash._vllm_fa3.cache_clear()


def test_an_empty_batch_or_chunk_gives_an_empty_output() -> None:
    k = torch.randn(2, 64, HKV, D, device=DEVICE).to(torch.bfloat16)
    for batch, num_q in ((0, 1), (2, 0)):
        q = torch.randn(batch, num_q, 4 * HKV, D, device=DEVICE).to(torch.bfloat16)
        lengths = torch.full((batch,), 9, dtype=torch.int32, device=DEVICE)
        result = flash_attention(q, k, k, lengths)
        assert result.out.shape == q.shape and result.backend == best_backend()


@pytest.mark.gpu
def test_what_flashattention_cannot_take_falls_back_to_sdpa() -> None:
    # A head dim past 256, and float32: the default is SDPA; forcing a FlashAttention
    # build is refused with the reason.
    fa = [b for b in available_backends(torch.device(DEVICE)) if b != "sdpa"]
    if not fa:
        pytest.skip("no FlashAttention backend on this GPU")
    for head_dim, dtype in ((320, torch.bfloat16), (D, torch.float32)):
        k = torch.randn(2, 64, HKV, head_dim, device=DEVICE).to(dtype)
        v = torch.randn_like(k)
        q = torch.randn(2, 3, 4 * HKV, head_dim, device=DEVICE).to(dtype)
        result = flash_attention(q, k, v, _ints([40, 64]), _ints([1, 0]))
        assert result.backend == "sdpa"
        ref = reference(q, k, v, [40, 64], [1, 0], True)
        err = ((result.out.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2
        with pytest.raises(InvalidArgument, match=f"backend '{fa[0]}' needs"):
            flash_attention(q, k, v, _ints([40, 64]), _ints([1, 0]), backend=fa[0])
