"""Fault injection: the Nth call of one driver operation fails once with
``DriverError(call, "INJECTED")``.

A wrapper around `HostVirtualMemory` (installed in place of `vattn.driver.open_backend`)
fails the chosen call, counts the handles it created and released, tracks what is
mapped where, and records calls that break the `VirtualMemory` protocol (mapping over a
mapping, releasing a mapped handle, freeing a reservation with pages still mapped in it).

A fixed script (construct, allocate, grow, free, reclaim from idle slots, trim with and
without release, close) runs with the fault placed on every call index in a range. Where
the fault surfaces as a `DriverError`, right after it: the invariants hold
(`check_invariants`: counts, no page held twice, host mappings equal to the
bookkeeping), every live slot's data is intact, and the same operation, retried, succeeds.
At the end nothing is mapped in the reservation and every created handle was released.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import torch

import vattn
from tests.conftest import PAGE, check_invariants, host_mapped_bytes, small_cache
from vattn import DriverError, VattnError, VirtualKVCache
from vattn.driver.host import HostVirtualMemory
from vattn.layout import LAYOUTS, Layout

READ_SLACK = 16
SLOTS = 4
OPS = ("create", "map", "set_access", "unmap", "release")
R = TypeVar("R")

# Data patterns: 7 random tensors as long as the longest slot, used cyclically (4 a
# write), so no two live slots hold the same values.
PATTERNS = [torch.randn(6144, 2, 64, generator=torch.Generator().manual_seed(i))
            for i in range(7)]


class FaultyVM:
    """`HostVirtualMemory` whose `nth` call of `op` raises ``DriverError(op, "INJECTED")``
    once (before delegating, so the failed call did nothing)."""

    name = "host"
    device = "cpu"

    def __init__(self, op: str | None = None, nth: int = 0) -> None:
        self.inner = HostVirtualMemory()
        self.granularity = self.inner.granularity
        self.op, self.nth = op, nth
        self.calls: Counter[str] = Counter()
        self.log: list[tuple[str, str]] = []  # (op, phase) of every call
        self.phase = "open"
        self.fired_in: str | None = None
        self.created = 0
        self.released = 0
        self.live: set[int] = set()
        self.mapped: dict[int, tuple[int, int]] = {}  # address -> (size, handle)
        self.reservations: dict[int, int] = {}  # address -> size
        self.violations: list[str] = []
        self.closed = False
        self.opens = 0

    # -- fault and bookkeeping -------------------------------------------------------

    def _call(self, op: str) -> None:
        self.calls[op] += 1
        self.log.append((op, self.phase))
        if op == self.op and self.calls[op] == self.nth:
            self.fired_in = self.phase
            raise DriverError(op, "INJECTED")

    def _violation(self, what: str) -> None:
        self.violations.append(f"[{self.phase}] {what}")

    def _mapped_in(self, address: int, size: int) -> list[int]:
        return [a for a, (s, _) in self.mapped.items() if a < address + size and address < a + s]

    @property
    def leaked_handles(self) -> int:
        return self.created - self.released

    # -- the VirtualMemory protocol --------------------------------------------------

    def describe(self) -> dict[str, str]:
        return self.inner.describe()

    def memory_info(self) -> tuple[int, int]:
        return self.inner.memory_info()

    def reserve(self, size_bytes: int, alignment_bytes: int) -> int:
        self._call("reserve")
        address = self.inner.reserve(size_bytes, alignment_bytes)
        self.reservations[address] = size_bytes
        return address

    def free(self, address: int, size_bytes: int) -> None:
        self._call("free")
        inside = self._mapped_in(address, size_bytes)
        if inside:
            self._violation(f"free of a reservation with {len(inside)} page(s) still mapped")
        self.inner.free(address, size_bytes)
        for a in inside:
            del self.mapped[a]
        self.reservations.pop(address, None)

    def create(self, size_bytes: int) -> int:
        self._call("create")
        handle = self.inner.create(size_bytes)
        self.created += 1
        self.live.add(handle)
        return handle

    def release(self, handle: int) -> None:
        self._call("release")
        if handle not in self.live:
            self._violation(f"release of handle {handle}, not live")
        if any(h == handle for _, h in self.mapped.values()):
            self._violation(f"release of handle {handle} while it is mapped")
        self.inner.release(handle)
        self.released += 1
        self.live.discard(handle)

    def map(self, address: int, size_bytes: int, handle: int) -> None:
        self._call("map")
        if self._mapped_in(address, size_bytes):
            self._violation(f"map at {address:#x} over a mapping")
        if handle not in self.live:
            self._violation(f"map of handle {handle}, not live")
        if any(h == handle for _, h in self.mapped.values()):
            self._violation(f"map of handle {handle}, mapped elsewhere already")
        self.inner.map(address, size_bytes, handle)
        self.mapped[address] = (size_bytes, handle)

    def set_access(self, address: int, size_bytes: int) -> None:
        self._call("set_access")
        covered = sum(self.mapped[a][0] for a in self._mapped_in(address, size_bytes))
        if covered < size_bytes:
            self._violation(f"set_access over {size_bytes} bytes, {covered} mapped")
        self.inner.set_access(address, size_bytes)

    def unmap(self, address: int, size_bytes: int) -> None:
        self._call("unmap")
        inside = self._mapped_in(address, size_bytes)
        if not inside:
            self._violation(f"unmap at {address:#x} of nothing mapped")
        self.inner.unmap(address, size_bytes)
        for a in inside:
            del self.mapped[a]

    def reopen(self) -> FaultyVM:
        """What `open_backend` returns: a fresh host backend once the last one closed."""
        if self.closed:
            assert not self.live and not self.mapped and not self.reservations, (
                "the last cache left handles, mappings or its reservation behind")
            self.inner = HostVirtualMemory()
            self.closed = False
        self.opens += 1
        return self

    def synchronize(self) -> None:
        self.inner.synchronize()

    def close(self) -> None:
        self.closed = True
        self.inner.close()


def install(monkeypatch: pytest.MonkeyPatch, vm: FaultyVM) -> None:
    """Every cache opened from now on gets `vm` (reopened after a close, counts kept)."""
    monkeypatch.setattr(vattn.driver, "open_backend", lambda device: vm.reopen())


# -- the script ----------------------------------------------------------------------


@dataclass
class Run:
    """One run of the script: the cache, its backend, and the live slots' data."""

    vm: FaultyVM
    layout: str
    cache: VirtualKVCache | None = None
    copies: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    trace: list[tuple[str, object]] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def check(self) -> None:
        cache = self.cache
        assert cache is not None
        check_invariants(cache)
        for slot, layers in self.copies.items():
            n = layers[0][0].shape[0]
            for layer, (ck, cv) in enumerate(layers):
                k, v = cache.kv(layer)
                assert torch.equal(k[slot, :n], ck), f"slot {slot} layer {layer} K changed"
                assert torch.equal(v[slot, :n], cv), f"slot {slot} layer {layer} V changed"

    def write(self, slot: int, n: int) -> None:
        """Random values (from a precomputed set, cycled) in the first `n` tokens of every
        K and V of `slot`."""
        assert self.cache is not None
        layers = []
        for layer in range(self.cache.config.num_layers):
            k, v = self.cache.kv(layer)
            ck, cv = (PATTERNS[next(self.counter) % len(PATTERNS)][:n] for _ in range(2))
            k[slot, :n] = ck
            v[slot, :n] = cv
            layers.append((ck, cv))
        self.copies[slot] = layers

    def do(self, phase: str, call: Callable[[], R]) -> R:
        """Run `call`; if the injected fault surfaces, check the cache, then retry."""
        self.vm.phase = phase
        try:
            return call()
        except DriverError as exc:
            assert exc.code_name == "INJECTED", f"{phase}: unexpected {exc!r}"
            assert self.vm.fired_in == phase
            self.faults.append(phase)
            if phase == "close":
                # A failed close keeps what it could not undo and refuses further use.
                assert self.cache is not None and not self.cache.closed
                with pytest.raises(VattnError, match="call close\\(\\) again"):
                    self.cache.stats()
            elif self.cache is not None:
                self.check()
            return call()  # the fault is spent: the retry must succeed

    def record(self, phase: str) -> None:
        """Check the cache after `phase` and remember its numbers."""
        self.check()
        assert self.cache is not None
        stats = self.cache.stats()
        self.trace.append((phase, (stats.active_slots, stats.pages_mapped, stats.pages_idle,
                                   stats.pages_pending, stats.pages_free, stats.pages_created,
                                   [self.cache.capacity(s) for s in range(SLOTS)])))


def geometry(layout: str) -> tuple[int, Callable[[int], int]]:
    """(tensors, tokens(k)): `tokens(k)` is a length that needs exactly k pages per
    tensor (with the read slack)."""
    lay = Layout(2, 2, 64, 4, SLOTS, 5000, PAGE, layout)  # type: ignore[arg-type]
    per_page = lay.tokens_for_pages(1)

    def tokens(k: int) -> int:
        n = k * per_page - READ_SLACK - 1
        assert lay.pages_for_tokens(n, READ_SLACK) == k
        return n

    return lay.num_tensors, tokens


def script(run: Run) -> None:
    """Construct, allocate, grow, reclaim from idle slots, trim, close; check each step."""
    layout = run.layout
    tensors, tokens = geometry(layout)
    # The limit fits a 1 + b 2 + c 1, then a 2: 5 pages a tensor.
    limit = (5 * tensors + 1) * PAGE
    run.cache = run.do("construct", lambda: small_cache(
        layout, memory_limit=limit, read_slack=READ_SLACK, max_batch_size=SLOTS))
    cache = run.cache
    run.record("construct")

    a, b, c = cache.allocate(), cache.allocate(), cache.allocate()
    run.do("step abc", lambda: cache.step({a: tokens(1), b: tokens(2), c: tokens(1)}))
    for slot, k in ((a, 1), (b, 2), (c, 1)):
        run.write(slot, tokens(k))
    run.record("step abc")

    run.do("grow a", lambda: cache.step({a: tokens(2)}))
    run.write(a, tokens(2))
    run.record("grow a")
    assert cache.stats().pages_free == 0 and cache._res.pool.num_available == 0

    cache.free(b)
    del run.copies[b]
    run.do("grow a from idle b", lambda: cache.step({a: tokens(3)}))
    run.write(a, tokens(3))
    run.record("grow a from idle b")
    assert cache.capacity(b) == cache.layout.tokens_for_pages(1), "b lost one page"

    cache.free(c)
    del run.copies[c]
    d = cache.allocate()
    assert d == b, "d reuses b's slot (most pages, lowest index)"
    run.do("grow d from idle c", lambda: cache.step({d: tokens(2)}))
    run.write(d, tokens(2))
    run.record("grow d from idle c")
    assert cache.capacity(c) == 0, "c gave its page to d"

    cache.free(a)
    del run.copies[a]
    run.do("trim keep", lambda: cache.trim(release=False))
    run.record("trim keep")
    assert cache.stats().pages_free == 3 * tensors

    e = cache.allocate()
    run.do("step e", lambda: cache.step({e: tokens(2)}))
    run.write(e, tokens(2))
    run.record("step e")

    cache.free(e)
    del run.copies[e]
    run.do("trim release", lambda: cache.trim())
    run.record("trim release")
    stats = cache.stats()
    assert stats.pages_free == 0 and stats.pages_created == 2 * tensors  # d's pages

    base, size = cache._res.base_address, cache.layout.reservation_bytes
    run.do("close", cache.close)
    assert cache.closed
    assert host_mapped_bytes(base, size) == 0


def run_script(monkeypatch: pytest.MonkeyPatch, vm: FaultyVM, layout: str) -> Run:
    """`script` with `vm` installed; a cache left open by a failure is closed here, not by
    the garbage collector."""
    install(monkeypatch, vm)
    run = Run(vm, layout)
    try:
        script(run)
    finally:
        if run.cache is not None and not run.cache.closed:
            with contextlib.suppress(Exception):  # the test has failed already
                run.cache.close()
    return run


@functools.cache
def baseline(layout: str) -> tuple[list[tuple[str, object]], tuple[tuple[str, str], ...]]:
    """The script without a fault: its trace and the (op, phase) of every driver call."""
    mp = pytest.MonkeyPatch()
    vm = FaultyVM()
    try:
        run = run_script(mp, vm, layout)
    finally:
        mp.undo()
    return run.trace, tuple(vm.log)


def fault_points() -> list[object]:
    """(layout, op, n): calls 1..3 of each op, and the first and last call of each op in
    every phase of the script (taken from a run without faults; calls 1..6 when that run
    fails)."""
    points: list[object] = []
    for layout in LAYOUTS:
        try:
            _, log = baseline(layout)
        except Exception:  # noqa: BLE001 - test_script_without_faults reports it
            points += [pytest.param(layout, op, n, id=f"{layout}-{op}-{n}")
                       for op in OPS for n in range(1, 7)]
            continue
        for op in OPS:
            phases = [phase for o, phase in log if o == op]
            chosen = {n for n in (1, 2, 3) if n <= len(phases)}
            for phase in dict.fromkeys(phases):
                indexes = [i + 1 for i, p in enumerate(phases) if p == phase]
                chosen |= {indexes[0], indexes[-1]}
            points += [pytest.param(layout, op, n, id=f"{layout}-{op}-{n}-{phases[n - 1]}")
                       for n in sorted(chosen)]
    return points


# -- tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_script_without_faults(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    vm = FaultyVM()
    run_script(monkeypatch, vm, layout)
    assert vm.leaked_handles == 0 and not vm.live
    assert not vm.mapped and not vm.reservations and vm.closed
    assert vm.violations == []


@pytest.mark.parametrize(("layout", "op", "nth"), fault_points())
def test_fault_is_undone_and_retry_succeeds(monkeypatch: pytest.MonkeyPatch, layout: str,
                                            op: str, nth: int) -> None:
    vm = FaultyVM(op, nth)
    run = run_script(monkeypatch, vm, layout)
    assert vm.fired_in is not None, "the fault never fired"
    assert run.faults == [vm.fired_in], "the fault did not surface as a DriverError"
    if vm.fired_in != "close":
        # A fault that was undone and retried leaves the same cache as no fault at all.
        assert run.trace == baseline(layout)[0]
    assert not vm.mapped and not vm.reservations and vm.closed
    assert vm.leaked_handles == 0, f"{vm.leaked_handles} handle(s) never released"
    assert vm.violations == [], f"calls that break the VirtualMemory protocol: {vm.violations}"


def reservations_overlapping(start: int, size: int) -> list[str]:
    """Lines of /proc/self/maps that overlap [start, start + size)."""
    lines = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo < start + size and start < hi:
                lines.append(line.strip())
    return lines


@pytest.mark.parametrize("op", ["reserve", "create", "map", "set_access"])
def test_fault_during_construction_leaves_nothing(monkeypatch: pytest.MonkeyPatch,
                                                  op: str) -> None:
    """The first call of each op is the reservation or the anchor page's."""
    vm = FaultyVM(op, 1)
    install(monkeypatch, vm)
    reserved: list[tuple[int, int]] = []
    inner_reserve = vm.inner.reserve

    def reserve(size_bytes: int, alignment_bytes: int) -> int:
        address = inner_reserve(size_bytes, alignment_bytes)
        reserved.append((address, size_bytes))
        return address

    vm.inner.reserve = reserve  # type: ignore[method-assign]
    with pytest.raises(DriverError) as info:
        small_cache("per_layer")
    assert (info.value.call, info.value.code_name) == (op, "INJECTED")
    assert vm.fired_in is not None
    assert vm.closed, "the backend was not closed"
    assert vm.leaked_handles == 0 and not vm.live, "a created page was not released"
    assert not vm.mapped, "a page is still mapped"
    assert not vm.reservations, "the reservation was not freed"
    assert len(reserved) == (0 if op == "reserve" else 1)
    for address, size in reserved:
        assert reservations_overlapping(address, size) == [], "address space still mapped"
    assert vm.violations == [], f"the undo broke the VirtualMemory protocol: {vm.violations}"


def test_a_page_whose_undo_fails_keeps_its_handle_until_it_is_unmapped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A map fails, then the undo's first unmap fails too (with `OutOfPages`, as the
    host backend's does on ENOMEM): the rest of the undo goes on, the page left mapped
    keeps its handle out of the pool (so no other slot maps it too), and the next map
    unmaps it first. Nothing leaks."""
    vm = FaultyVM()
    install(monkeypatch, vm)
    failed: list[int] = []
    inner_unmap = vm.unmap

    def unmap(address: int, size_bytes: int) -> None:
        if vm.fired_in is not None and not failed:
            failed.append(address)
            raise vattn.OutOfPages(1, 0, "host mappings")
        inner_unmap(address, size_bytes)

    monkeypatch.setattr(vm, "unmap", unmap)
    with small_cache(read_slack=0) as cache:
        a, b = cache.allocate(), cache.allocate()
        tokens = cache.layout.tokens_for_pages(2)
        vm.op, vm.nth = "map", vm.calls["map"] + 3      # the third of the step's maps
        with pytest.raises(DriverError, match="INJECTED"):
            cache.step({a: tokens})
        assert [address for address, _ in cache._res.mapper.stuck] == failed
        assert cache.capacity(a) == 0
        cache.step({b: tokens})         # unmaps the stuck page first, then maps b
        assert not cache._res.mapper.stuck and len(failed) == 1
        cache.step({a: tokens})
        check_invariants(cache)
    assert vm.violations == [], vm.violations
    assert vm.leaked_handles == 0 and not vm.mapped


def test_a_failed_release_at_close_over_a_lowered_limit_is_finished_by_the_next_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a lowered limit the pool releases pages as teardown gives them back; one
    release failing makes close raise, and the next close finishes without pooling a
    page twice."""
    vm = FaultyVM()
    install(monkeypatch, vm)
    cache = small_cache(read_slack=0)
    slot = cache.allocate()
    cache.step({slot: cache.layout.tokens_for_pages(3)})     # 12 pages
    cache.set_memory_limit(5 * PAGE)                          # 4 pages: 8 over
    vm.op, vm.nth = "release", vm.calls["release"] + 1
    with pytest.raises(DriverError, match="INJECTED"):
        cache.close()
    assert not cache.closed and not vm.mapped
    cache.close()
    assert cache.closed and vm.closed
    assert vm.leaked_handles == 0 and vm.violations == [], vm.violations
