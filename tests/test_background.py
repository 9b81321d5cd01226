"""Background mapping on the host backend: step_async / wait, look-ahead, run-time limit."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vattn
from tests.conftest import (
    PAGE,
    check_invariants,
    hammer_from_threads,
    host_mapped_bytes,
    small_cache,
)
from tests.test_faults import FaultyVM, install
from vattn.allocator import MapPlan, PageRun


def test_step_async_maps_by_the_next_join() -> None:
    with small_cache() as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.step_async({a: 3000, b: 100})
        assert cache._res.worker.busy or cache._res.rows[a]   # queued or already done
        cache.wait()
        assert cache.capacity(a) >= 3016 and cache.capacity(b) >= 116
        k, v = cache.kv(1)
        data = torch.randn(3000, 2, 64)
        k[a, :3000] = data
        cache.step_async({a: 5000})       # grows a in the background ...
        cache.step_async({b: 4000})       # ... joined here, before b is planned
        assert cache.capacity(a) >= 5016
        cache.wait()
        assert torch.equal(k[a, :3000], data)
        check_invariants(cache)


def test_step_async_out_of_pages_is_raised_in_the_call_with_nothing_changed() -> None:
    with small_cache(memory_limit=9 * PAGE) as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.step_async({a: 4000})
        before = cache.stats()              # joins
        with pytest.raises(vattn.OutOfPages):
            cache.step_async({b: 100})
        assert cache.stats() == before and not cache._res.worker.busy


@pytest.mark.parametrize("op", ["create", "map", "set_access", "unmap"])
def test_mapper_thread_error_surfaces_at_the_join(monkeypatch: pytest.MonkeyPatch,
                                                   op: str) -> None:
    vm = FaultyVM()
    install(monkeypatch, vm)
    reclaim = op != "create"     # a full pool makes b reclaim a's page; else b creates
    with small_cache(memory_limit=(9 if reclaim else 20) * PAGE) as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.step({a: 3000})
        k, _ = cache.kv(0)
        data = torch.randn(3000, 2, 64)
        k[a, :3000] = data
        if reclaim:
            cache.free(a)
        vm.op, vm.nth = op, vm.calls[op] + 1
        cache.step_async({b: 100})           # the fault fires on the mapper thread
        with pytest.raises(vattn.DriverError, match="INJECTED"):
            cache.wait()
        check_invariants(cache)              # the policy matches what is mapped
        assert cache.capacity(b) == 0
        cache.step_async({b: 100})           # the fault is spent
        cache.wait()
        assert cache.capacity(b) >= 116
        if not reclaim:
            assert torch.equal(k[a, :3000], data)
        check_invariants(cache)
    assert vm.created == vm.released and not vm.violations


def test_look_ahead_spreads_a_common_page_crossing_over_steps() -> None:
    # per_layer: 4 tensors, 2048 tokens a page. 4 slots at the same length cross their
    # page boundary together; a budget of 8 pages a step maps 2 slots a step ahead.
    with small_cache(read_slack=0, lookahead_tokens=64, lookahead_pages_per_step=8,
                     memory_limit=40 * PAGE) as cache:
        slots = [cache.allocate() for _ in range(4)]
        cache.step(dict.fromkeys(slots, 1900))
        assert [cache.capacity(s) for s in slots] == [2048] * 4
        cache.step(dict.fromkeys(slots, 1990))         # within 64 of the boundary
        assert [cache.capacity(s) for s in slots] == [4096, 4096, 2048, 2048]
        cache.step(dict.fromkeys(slots, 1991))
        assert [cache.capacity(s) for s in slots] == [4096] * 4
        pages = cache.stats().pages_created
        cache.step(dict.fromkeys(slots, 2100))         # crossing: nothing left to map
        assert cache.stats().pages_created == pages


def test_look_ahead_never_delays_what_is_needed() -> None:
    with small_cache(read_slack=0, lookahead_tokens=64, lookahead_pages_per_step=0,
                     memory_limit=40 * PAGE) as cache:
        slots = [cache.allocate() for _ in range(4)]
        cache.step(dict.fromkeys(slots, 2040))
        assert [cache.capacity(s) for s in slots] == [2048] * 4
        cache.step(dict.fromkeys(slots, 2049))         # needed now: past any budget
        assert [cache.capacity(s) for s in slots] == [4096] * 4


def test_lowering_the_memory_limit_keeps_active_data() -> None:
    with small_cache(memory_limit=40 * PAGE) as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.step({a: 3000, b: 3000})
        k, _ = cache.kv(0)
        data = torch.randn(3000, 2, 64)
        k[a, :3000] = data
        cache.free(b)
        cache.grow_pool(8 * PAGE)
        assert cache.stats().pages_created == 24
        released = cache.set_memory_limit(9 * PAGE)    # a alone holds 8 pages
        assert released == 16 * PAGE
        stats = cache.stats()
        assert stats.pages_created == 8 and stats.memory_limit_bytes == 9 * PAGE
        assert torch.equal(k[a, :3000], data)
        c = cache.allocate()
        with pytest.raises(vattn.OutOfPages):
            cache.step({c: 10})
        cache.free(a)
        cache.step({c: 10})                              # a's idle pages are reclaimed
        check_invariants(cache)
        with pytest.raises(vattn.InvalidArgument):
            cache.set_memory_limit(PAGE - 1)


def test_a_step_over_a_lowered_limit_reclaims_what_the_limit_takes_too() -> None:
    """Over a lowered limit, the pool releases the first pages given back to it, so a
    step that reclaims an idle slot's pages must reclaim that many more; can_allocate
    agrees with what the step then does."""
    with small_cache(read_slack=0) as cache:
        tokens = cache.layout.tokens_for_pages(1)
        a, c = cache.allocate(), cache.allocate()
        cache.step({a: tokens, c: 3 * tokens})              # 4 and 12 pages
        k, _ = cache.kv(0)
        data = torch.randn(tokens, 2, 64)
        k[a, :tokens] = data
        cache.set_memory_limit(15 * PAGE)                   # 14 pages: 2 over
        assert cache.stats().pages_created == 16
        cache.free(c)
        cache.step({a: 2 * tokens})     # 4 more: 2 of c's 3 rows (8 pages), 2 released
        stats = cache.stats()
        assert cache.capacity(a) == 2 * tokens and stats.pages_created == 14
        assert (stats.pages_idle, stats.pages_free) == (4, 2)
        assert torch.equal(k[a, :tokens], data)
        assert cache.can_allocate(tokens)                   # c's last row
        assert not cache.can_allocate(2 * tokens)           # 4 more, 2 free
        check_invariants(cache)


def test_step_async_from_several_threads() -> None:
    with small_cache(max_batch_size=8, memory_limit=40 * PAGE) as cache:
        hammer_from_threads(cache, background=True)
        check_invariants(cache)


def test_targets_only_from_several_threads() -> None:
    # With look-ahead, each thread's join may return with (another thread's) look-ahead
    # held; its own targets must be mapped all the same.
    with small_cache(max_batch_size=8, memory_limit=40 * PAGE, lookahead_tokens=64) as cache:
        hammer_from_threads(cache, background=True, targets_only=True)
        check_invariants(cache)


def test_close_joins_the_mapper_thread() -> None:
    cache = small_cache()
    slot = cache.allocate()
    cache.step_async({slot: 5000})
    base, size = cache._res.base_address, cache.layout.reservation_bytes
    cache.close()
    assert cache._res.worker._thread is None
    assert host_mapped_bytes(base, size) == 0


def test_stats_report_pages_mapped_ahead_of_need() -> None:
    with small_cache(read_slack=0, lookahead_tokens=64, memory_limit=40 * PAGE) as cache:
        slot = cache.allocate()
        cache.step({slot: 2000})
        assert cache.stats().pages_ahead == 4       # one page a tensor beyond 2000 tokens
        cache.step({slot: 2100})
        assert cache.stats().pages_ahead == 0


def test_look_ahead_maps_a_whole_page_row_even_when_it_exceeds_the_budget() -> None:
    # 4 tensors a row; a budget of 1 page still lets one slot a step grow a row ahead.
    with small_cache(read_slack=0, lookahead_tokens=64, lookahead_pages_per_step=1,
                     memory_limit=40 * PAGE) as cache:
        slots = [cache.allocate() for _ in range(2)]
        cache.step(dict.fromkeys(slots, 2000))
        assert [cache.capacity(s) for s in slots] == [4096, 2048]


def test_pending_pages_are_unmapped_by_the_mapper_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = FaultyVM()
    install(monkeypatch, vm)
    with small_cache() as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.step({a: 3000, b: 10})
        cache.free(a)
        fence = cache._free_fences[a]
        done = False
        monkeypatch.setattr(fence, "done", lambda: done)     # a kernel still reads a
        cache.trim(release=False)
        assert cache.stats().pages_pending == 8
        done = True
        threads: list[str] = []
        unmap = vm.unmap

        def recording_unmap(address: int, size_bytes: int) -> None:
            threads.append(threading.current_thread().name)
            unmap(address, size_bytes)

        monkeypatch.setattr(vm, "unmap", recording_unmap)
        cache.step_async({b: 10})                            # nothing to map: just reap
        cache.wait()
        assert len(threads) == 8
        assert all(name.startswith("vattn-mapper") for name in threads), threads
        assert cache.stats().pages_pending == 0 and cache.stats().pages_free == 8
        check_invariants(cache)


def wait_released(alive: weakref.ref[vattn.VirtualKVCache], base: int, size: int,
                  collected_within_s: float) -> None:
    """Assert that a dropped cache is collected within `collected_within_s` (the mapper
    thread drops its reference once its job ends), then that its reservation is
    unmapped within 30 s (its teardown may run on the mapper thread). A full collection
    holds the GIL that the mapper thread needs to finish its job. In a large process (the
    whole suite; a heap of 3 million small objects stands in for it, where one took
    0.7-0.8 s) collecting every 10 ms starved the mapper past the deadline. So it
    collects every 0.5 s, and once more at the end."""
    deadline = time.monotonic() + collected_within_s
    collect_at = time.monotonic() + 0.5
    while alive() is not None and time.monotonic() < deadline:
        if time.monotonic() >= collect_at:
            gc.collect()
            collect_at = time.monotonic() + 0.5
        time.sleep(0.01)
    gc.collect()
    assert alive() is None
    deadline = time.monotonic() + 30
    while host_mapped_bytes(base, size) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host_mapped_bytes(base, size) == 0


def test_a_dropped_cache_is_released_after_step_async() -> None:
    cache = small_cache()
    slot = cache.allocate()
    cache.step_async({slot: 5000})
    base, size = cache._res.base_address, cache.layout.reservation_bytes
    alive = weakref.ref(cache)
    del cache
    wait_released(alive, base, size, collected_within_s=30)


def test_a_dropped_cache_is_released_after_a_failed_step_async(vm: FaultyVM) -> None:
    """The job's error, never joined, must not keep the cache alive through its
    traceback's frames; the traceback is kept as text for the join."""
    cache = small_cache()
    slot = cache.allocate()
    cache.step({slot: 100})
    vm.op, vm.nth = "map", vm.calls["map"] + 1
    cache.step_async({slot: 4000})
    while cache._res.worker.busy:
        time.sleep(0.01)
    error = cache._res.worker._error
    assert isinstance(error, vattn.DriverError) and error.__traceback__ is None
    assert any("On the mapper thread" in note and "map_runs" in note
               for note in getattr(error, "__notes__", []))
    base, size = cache._res.base_address, cache.layout.reservation_bytes
    alive = weakref.ref(cache)
    del cache, error
    wait_released(alive, base, size, collected_within_s=5)


@pytest.mark.parametrize("layout", ["per_layer", "token_major"])
def test_look_ahead_grows_in_few_large_jobs(layout: str) -> None:
    # Low water 1500 tokens, high water 3000 (pages of 2048 / 1024 tokens): a slot
    # decoding a token a step grows only when fewer than 1500 tokens are left, then to at
    # least 3000 past its target, so growth comes at most every 1500 steps, several
    # pages at once, and never leaves more than 3000 tokens plus a page mapped ahead.
    with small_cache(layout=layout, read_slack=0, lookahead_tokens=1500,
                     max_context_len=20000, memory_limit=200 * PAGE) as cache:
        slot = cache.allocate()
        lmax, page_tokens = cache.max_context_len, cache.layout.tokens_for_pages(1)
        grew_at, capacity = [], 0
        for tokens in range(1, lmax + 1):
            cache.step({slot: tokens})
            now = cache.capacity(slot)
            assert now - tokens >= min(1500, lmax - tokens)
            if now != capacity:
                grew_at.append(tokens)
                assert now - tokens >= min(3000, lmax - tokens)
                assert now - tokens < 3000 + page_tokens
                capacity = now
        gaps = [b - a for a, b in zip(grew_at, grew_at[1:], strict=False)]
        assert len(grew_at) >= 4 and min(gaps) >= 1500, grew_at


# -- wait(targets_only=True): the targets' pages first, look-ahead left to finish --------


@pytest.fixture
def vm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyVM]:
    """A fault-injecting host backend for every cache the test opens; at the end, no
    handle leaked and no call broke the protocol."""
    vm = FaultyVM()
    install(monkeypatch, vm)
    yield vm


class Gate(threading.Event):
    """Set to let the gated call go; `reached` is set once the call is waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = threading.Event()


def gate_map(monkeypatch: pytest.MonkeyPatch, vm: FaultyVM, nth: int) -> Gate:
    """From now on the `nth` call of `vm.map` blocks until the returned gate is set."""
    gate, calls, inner = Gate(), [0], vm.map

    def gated(address: int, size_bytes: int, handle: int) -> None:
        calls[0] += 1
        if calls[0] == nth:
            gate.reached.set()
            assert gate.wait(10), "the test never opened the gate"
        inner(address, size_bytes, handle)

    monkeypatch.setattr(vm, "map", gated)
    return gate


def lookahead_cache() -> vattn.VirtualKVCache:
    # per_layer, 2 layers: 4 tensors, 2048 tokens a page; a target within 64 tokens of
    # the capacity grows the slot to 128 tokens past the target.
    return small_cache(read_slack=0, lookahead_tokens=64, memory_limit=40 * PAGE)


def test_targets_only_returns_once_the_targets_pages_are_mapped(
        monkeypatch: pytest.MonkeyPatch, vm: FaultyVM) -> None:
    with lookahead_cache() as cache:
        slot = cache.allocate()
        cache._res.worker.hold_limit_s = 10    # no going on by itself within the test
        # Page 0 is needed (4 map calls, one a tensor), page 1 is ahead of need: the 5th
        # map call, the first of the look-ahead, blocks.
        gate, start = gate_map(monkeypatch, vm, 5), vm.calls["map"]
        cache.step_async({slot: 2000})
        # The job is inside that map, past the checkpoint before tensor 0, before the
        # hold begins (a hold begun earlier would hold tensor 0's page too).
        assert gate.reached.wait(10)
        cache.wait(targets_only=True)
        assert cache._res.worker.busy and len(cache._res.rows[slot]) == 1
        k, v = cache.kv(1)
        data = torch.randn(2000, 2, 64)
        k[slot, :2000] = data               # the needed page, mapped in every tensor
        v[slot, :2000] = data
        gate.set()                          # tensor 0's look-ahead page maps; then the
        deadline = time.monotonic() + 10    # rest is held until the next join
        while vm.calls["map"] < start + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)                     # were it not held, tensor 1's map came now
        assert cache._res.worker.busy and vm.calls["map"] == start + 5
        cache.wait()                        # joins (and resumes) the look-ahead
        assert cache.capacity(slot) == 4096 and len(cache._res.rows[slot]) == 2
        assert torch.equal(k[slot, :2000], data) and torch.equal(v[slot, :2000], data)
        check_invariants(cache)


def test_targets_only_does_not_wait_for_a_job_that_only_maps_ahead(
        monkeypatch: pytest.MonkeyPatch, vm: FaultyVM) -> None:
    with lookahead_cache() as cache:
        slot = cache.allocate()
        cache.step({slot: 1900})            # page 0; 1900 is not within 64 of 2048
        gate = gate_map(monkeypatch, vm, 1)
        cache.step_async({slot: 1990})      # covered: only page 1, ahead of need
        cache.wait(targets_only=True)       # returns with the job blocked in its 1st map
        assert cache._res.worker.busy and len(cache._res.rows[slot]) == 1
        cache.wait(targets_only=True)       # and again: nothing is joined
        gate.set()
        cache.step_async({slot: 1991})      # joins the look-ahead first
        cache.wait()
        assert cache.capacity(slot) == 4096
        check_invariants(cache)


def test_close_finishes_look_ahead_held_by_targets_only(
        monkeypatch: pytest.MonkeyPatch, vm: FaultyVM) -> None:
    cache = lookahead_cache()
    slot = cache.allocate()
    gate = gate_map(monkeypatch, vm, 5)
    cache.step_async({slot: 2000})
    cache.wait(targets_only=True)
    gate.set()
    base, size = cache._res.base_address, cache.layout.reservation_bytes
    cache.close()                           # the held job is let go, then joined
    assert host_mapped_bytes(base, size) == 0


def test_a_dropped_cache_with_held_look_ahead_is_released(
        monkeypatch: pytest.MonkeyPatch, vm: FaultyVM) -> None:
    # 20 layers: 40 tensors, so 40 checkpoints in the look-ahead; the hold (0.2 s
    # here) runs out once for the whole job, not once a checkpoint (8 s).
    cache = small_cache(num_layers=20, read_slack=0, lookahead_tokens=64,
                        memory_limit=100 * PAGE)
    cache._res.worker.hold_limit_s = 0.2
    slot = cache.allocate()
    gate = gate_map(monkeypatch, vm, 41)    # the first look-ahead map
    cache.step_async({slot: 2000})
    cache.wait(targets_only=True)           # the job holds the cache while held
    gate.set()
    base, size = cache._res.base_address, cache.layout.reservation_bytes
    alive = weakref.ref(cache)
    del cache
    wait_released(alive, base, size, collected_within_s=4.0)   # the hold runs out


def test_a_look_ahead_error_surfaces_at_the_next_full_join(vm: FaultyVM) -> None:
    with lookahead_cache() as cache:
        slot = cache.allocate()
        k, _ = cache.kv(0)
        vm.op, vm.nth = "map", vm.calls["map"] + 5    # the first look-ahead map
        cache.step_async({slot: 2000})
        cache.wait(targets_only=True)       # the targets are mapped: no error yet
        data = torch.randn(2000, 2, 64)
        k[slot, :2000] = data
        with pytest.raises(vattn.DriverError, match="INJECTED"):
            cache.wait()
        check_invariants(cache)             # the policy holds what is mapped: page 0
        assert cache.capacity(slot) == 2048 and torch.equal(k[slot, :2000], data)
        cache.step_async({slot: 2000})      # the fault is spent: the look-ahead again
        cache.wait()
        assert cache.capacity(slot) == 4096 and torch.equal(k[slot, :2000], data)
        check_invariants(cache)


def test_an_error_before_the_targets_are_mapped_surfaces_at_targets_only(vm: FaultyVM) -> None:
    with lookahead_cache() as cache:
        slot = cache.allocate()
        vm.op, vm.nth = "map", vm.calls["map"] + 2    # a needed page's map
        cache.step_async({slot: 2000})
        with pytest.raises(vattn.DriverError, match="INJECTED"):
            cache.wait(targets_only=True)
        assert cache.capacity(slot) == 0 and not cache._res.worker.busy
        check_invariants(cache)
        cache.wait(targets_only=True)       # nothing in flight any more


@settings(max_examples=200, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 3),
                               st.integers(0, 5000)),
                     min_size=1, max_size=4, unique_by=lambda r: r[0]))
def test_a_plan_splits_into_the_pages_the_targets_need_and_the_rest(
        runs: list[tuple[int, int, int, int]]) -> None:
    """Each grown run is cut where its slot's target stops needing pages: the pages
    below the cut in the first part, the rest in the second, none lost or repeated."""
    with lookahead_cache() as cache:
        plan = MapPlan(grow=tuple(PageRun(slot, first, n) for slot, first, n, _ in runs))
        targets = {slot: tokens for slot, _, _, tokens in runs}
        needed, ahead = cache._split(plan, targets)
        assert all(r.num_pages > 0 for r in (*needed, *ahead))
        for run in plan.grow:
            cut = min(max(cache._index.pages_for(targets[run.slot]), run.first_page),
                      run.first_page + run.num_pages)
            mine = [r for r in needed if r.slot == run.slot]
            rest = [r for r in ahead if r.slot == run.slot]
            assert mine == ([PageRun(run.slot, run.first_page, cut - run.first_page)]
                            if cut > run.first_page else [])
            end = run.first_page + run.num_pages
            assert rest == ([PageRun(run.slot, cut, end - cut)] if cut < end else [])
