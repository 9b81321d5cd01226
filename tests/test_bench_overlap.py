"""`vattn bench overlap`'s host-side pieces, on the host backend."""

from __future__ import annotations

import pytest
import torch

from vattn.bench.overlap import Case, _join_rounds, pages_ahead, prepare, summarize
from vattn.cache import VirtualKVCache


@pytest.mark.parametrize("layout", ["token_major", "per_layer"])
@pytest.mark.parametrize("lookahead", [None, 0, 40])
def test_the_pool_created_up_front_covers_a_whole_background_run(layout: str,
                                                                 lookahead: int | None) -> None:
    """The loop's pages are created before it (creating them while kernels run disturbs
    the kernels): no background step may create one, look-ahead included."""
    case = Case("t", 5, (700, 730, 1001, 1300, 1999), 900, 4096)
    with VirtualKVCache(num_layers=3, num_kv_heads=2, head_dim=64, dtype=torch.float16,
                        max_batch_size=case.batch, max_context_len=case.context,
                        device="cpu", layout=layout,  # type: ignore[arg-type]
                        page_size_bytes=16 << 10, lookahead_tokens=lookahead) as cache:
        prepare(cache, case, premapped=False, precreate_bytes=-1)
        created = cache.stats().pages_created
        lens = list(case.start)
        grew = 0
        for _ in range(case.iterations):
            before = cache.stats().pages_mapped
            cache.step_async({s: n + 2 for s, n in enumerate(lens)})
            cache.wait()
            grew += cache.stats().pages_mapped > before
            lens = [n + 1 for n in lens]
        assert grew > 0, "the run must map pages for the check to mean anything"
        assert cache.stats().pages_created == created


@pytest.mark.parametrize("layout", ["token_major", "per_layer"])
def test_pages_ahead_without_a_join_equals_the_stats_after_one(layout: str) -> None:
    case = Case("t", 3, (700, 1001, 1999), 300, 4096)
    with VirtualKVCache(num_layers=3, num_kv_heads=2, head_dim=64, dtype=torch.float16,
                        max_batch_size=case.batch, max_context_len=case.context,
                        device="cpu", layout=layout,  # type: ignore[arg-type]
                        page_size_bytes=16 << 10, lookahead_tokens=40) as cache:
        prepare(cache, case, premapped=False, precreate_bytes=-1)
        lens, seen = list(case.start), set()
        for _ in range(case.iterations):
            targets = {s: n + 2 for s, n in enumerate(lens)}
            cache.step_async(targets)
            ahead = pages_ahead(cache, targets)     # the job may still run
            assert ahead == cache.stats().pages_ahead
            seen.add(ahead)
            lens = [n + 1 for n in lens]
        assert len(seen) > 2, "the run must move the look-ahead for the check to mean anything"


def test_summary_pools_rounds_and_reports_pages_created_in_the_loop() -> None:
    case = Case("t", 1, (10,), 4, 4096)
    base = _join_rounds([
        {"iteration_s": [1.0, 1.0], "visible_s": [0.0, 0.0], "work": [False, False],
         "ahead_mib": 0.0, "created": 0}] * 2)
    mine = _join_rounds([
        {"iteration_s": [1.1, 1.3], "visible_s": [1e-5, 2e-5], "work": [True, False],
         "ahead_mib": 4.0, "created": 3},
        {"iteration_s": [1.1, 1.1], "visible_s": [1e-5, 1e-5], "work": [False, False],
         "ahead_mib": 8.0, "created": 2}])
    row = summarize("per_layer", case, "background", mine, base)
    assert row["pages created in loop"] == 5 and row["MiB ahead (max)"] == 8
    assert row["iters mapping"] == 1 and row["p50 vs base"] == "+10.0%"
    assert row["their p50 ms"] == 1100.0 and row["next p50 ms"] == 1300.0
    assert row["alloc visible p50 us"] == 10.0
