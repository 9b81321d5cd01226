"""Property test: random allocate / step / free / trim / can_allocate sequences on the host
backend, both layouts, under a memory limit small enough that `OutOfPages` and reclaiming
pages from idle slots happen often.

After every operation: `check_invariants` (DESIGN.md invariant 2 and the host mappings),
invariant 1 (every stepped active slot covers its target plus `read_slack`), and
invariant 3 (every live slot's first n tokens of every layer's K and V still hold the
random pattern written there). A step that raises `OutOfPages` and an allocate that
raises `OutOfSlots` must leave the cache exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import PAGE, check_invariants, host_mapped_bytes, small_cache
from vattn import CacheStats, OutOfPages, OutOfSlots, VirtualKVCache
from vattn.layout import LAYOUTS

# 64 KiB pages and a 1000-token context keep the data small (a full slot is 2 MiB of
# K/V) while a slot still spans 8 (per_layer) or 16 (token_major) pages per tensor:
# 32 physical pages either way. The limit holds 40 pages (plus the anchor): one full
# slot and a quarter, of four slots.
SMALL_PAGE = PAGE // 16
MAX_CONTEXT = 1000
LIMIT_PAGES = 40
SLOTS = 4
READ_SLACK = 16

SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Snapshot:
    """What must not change when an operation raises a recoverable error."""

    stats: CacheStats
    capacities: list[int]


class CacheMachine(RuleBasedStateMachine):
    layout_name: str = "per_layer"
    lookahead_tokens: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.cache: VirtualKVCache = small_cache(
            self.layout_name, page_size_bytes=SMALL_PAGE, max_context_len=MAX_CONTEXT,
            max_batch_size=SLOTS, memory_limit=(LIMIT_PAGES + 1) * SMALL_PAGE,
            read_slack=READ_SLACK, lookahead_tokens=self.lookahead_tokens,
            lookahead_pages_per_step=4)
        self.base = self.cache._res.base_address
        self.size = self.cache.layout.reservation_bytes
        self.max_len = self.cache.max_context_len
        self.num_layers = self.cache.layout.num_layers
        self.gen = torch.Generator().manual_seed(0)
        self.active: set[int] = set()
        # Active slot -> largest target it was stepped to (absent: never stepped).
        self.targets: dict[int, int] = {}
        # Active slot -> per layer (K copy, V copy) of its first n tokens.
        self.copies: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        tokens_per_page = self.cache.layout.tokens_for_pages(1)
        # Lengths at which a step needs one page more or one less.
        edges = {k * tokens_per_page - READ_SLACK + d
                 for k in range(1, self.cache.layout.pages_per_slot + 1) for d in (-1, 0, 1)}
        self.lengths = st.one_of(
            st.integers(0, self.max_len),
            st.sampled_from(sorted(n for n in edges | {0, self.max_len} if 0 <= n <= self.max_len)))

    # -- helpers ---------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(self.cache.stats(), [self.cache.capacity(s) for s in range(SLOTS)])

    def data_len(self, slot: int) -> int:
        copies = self.copies.get(slot)
        return copies[0][0].shape[0] if copies else 0

    def write_pattern(self, slot: int, new_len: int) -> None:
        """Write fresh random values into tokens [old, new_len) of every K and V."""
        old = self.data_len(slot)
        if new_len <= old:
            return
        layers = self.copies.setdefault(slot, [])
        heads, dim = self.cache.config.num_kv_heads, self.cache.config.head_dim
        for layer in range(self.num_layers):
            k, v = self.cache.kv(layer)
            fresh_k = torch.randn(new_len - old, heads, dim, generator=self.gen)
            fresh_v = torch.randn(new_len - old, heads, dim, generator=self.gen)
            k[slot, old:new_len] = fresh_k
            v[slot, old:new_len] = fresh_v
            if len(layers) <= layer:
                layers.append((fresh_k, fresh_v))
            else:
                ck, cv = layers[layer]
                layers[layer] = (torch.cat([ck, fresh_k]), torch.cat([cv, fresh_v]))

    def check_data(self) -> None:
        for slot, layers in self.copies.items():
            n = layers[0][0].shape[0]
            for layer, (ck, cv) in enumerate(layers):
                k, v = self.cache.kv(layer)
                assert torch.equal(k[slot, :n], ck), f"slot {slot} layer {layer} K changed"
                assert torch.equal(v[slot, :n], cv), f"slot {slot} layer {layer} V changed"

    def check_unchanged(self, before: Snapshot) -> None:
        after = self.snapshot()
        assert after.stats == before.stats
        assert after.capacities == before.capacities
        self.check_data()

    # -- rules -----------------------------------------------------------------------

    @initialize(seed=st.integers(0, 2**32 - 1))
    def seed(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    @rule(num_tokens=st.data(), then_step=st.booleans())
    def allocate(self, num_tokens: st.DataObject, then_step: bool) -> None:
        self.allocate_n(num_tokens.draw(self.lengths, label="num_tokens"), then_step)

    def allocate_n(self, n: int, then_step: bool) -> None:
        """`allocate(n)`, then (with `then_step`) `step` to n: the outcome must be what
        `can_allocate(n)` said before."""
        predicted = self.cache.can_allocate(n)
        before = self.snapshot()
        try:
            slot = self.cache.allocate(n)
        except OutOfSlots:
            event("allocate: OutOfSlots")
            assert len(self.active) == SLOTS
            assert not predicted
            self.check_unchanged(before)
            return
        assert slot not in self.active
        self.active.add(slot)
        if not then_step:
            return
        before = self.snapshot()
        try:
            self.cache.step({slot: n})
        except OutOfPages as exc:
            event("allocate+step: OutOfPages")
            assert not predicted, f"can_allocate({n}) was True but step raised {exc}"
            assert exc.needed > exc.available
            self.check_unchanged(before)
            return
        assert predicted, f"can_allocate({n}) was False but allocate + step succeeded"
        if self.cache.stats().pages_idle < before.stats.pages_idle:
            event("allocate+step: reclaimed pages from idle slots")
        self.targets[slot] = n
        self.write_pattern(slot, n)

    @precondition(lambda self: self.active)
    @rule(data=st.data(), background=st.booleans(), targets_only=st.booleans())
    def step(self, data: st.DataObject, background: bool, targets_only: bool) -> None:
        targets = data.draw(st.dictionaries(st.sampled_from(sorted(self.active)), self.lengths,
                                            min_size=1, max_size=SLOTS), label="targets")
        self.step_to(targets, background, targets_only)

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def step_async_then_free(self, data: st.DataObject) -> None:
        """Free a slot while the mapper thread is growing it."""
        slot = data.draw(st.sampled_from(sorted(self.active)), label="slot")
        try:
            self.cache.step_async({slot: data.draw(self.lengths, label="n")})
        except OutOfPages:
            event("step_async: OutOfPages")
        self.cache.free(slot)
        self.cache.wait()
        self.active.discard(slot)
        self.targets.pop(slot, None)
        self.copies.pop(slot, None)

    def step_to(self, targets: dict[int, int], background: bool = False,
                targets_only: bool = False) -> None:
        before = self.snapshot()
        try:
            if background:
                self.cache.step_async(targets)
                self.cache.wait(targets_only=targets_only)
            else:
                self.cache.step(targets)
        except OutOfPages as exc:
            event("step: OutOfPages")
            assert exc.needed > exc.available
            self.check_unchanged(before)
            return
        if background and targets_only:
            # The targets' pages are mapped; pages ahead of need may still be mapping.
            if self.cache._res.worker.busy:
                event("wait(targets_only=True): returned with the mapper busy")
            for slot, n in targets.items():
                self.write_pattern(slot, max(n, self.targets.get(slot, 0)))
        after = self.cache.stats()
        if after.pages_idle < before.stats.pages_idle:
            event("step: reclaimed pages from idle slots")
        for slot, n in targets.items():
            # No slot shrinks.
            assert self.cache.capacity(slot) >= before.capacities[slot]
            self.targets[slot] = max(n, self.targets.get(slot, 0))
            self.write_pattern(slot, self.targets[slot])
        for slot in self.active - set(targets):
            assert self.cache.capacity(slot) == before.capacities[slot]

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.active)), label="slot")
        before = self.snapshot()
        self.cache.free(slot)
        self.active.discard(slot)
        self.targets.pop(slot, None)
        self.copies.pop(slot, None)
        # Deferred reclamation: the pages stay mapped.
        assert self.cache.capacity(slot) == before.capacities[slot]

    @precondition(lambda self: len(self.active) >= 2)
    @rule(data=st.data())
    def free_then_grow(self, data: st.DataObject) -> None:
        """Free one slot, then grow another: the likeliest way to make a step take
        pages back from an idle slot."""
        self.free(data)
        grower = data.draw(st.sampled_from(sorted(self.active)), label="grower")
        n = data.draw(st.integers(self.max_len // 2, self.max_len), label="length")
        self.step_to({grower: n})

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def free_then_allocate(self, data: st.DataObject) -> None:
        """Free one or more slots, then allocate a long request: when no idle slot covers
        it, the one taken grows by taking pages back from the other idle slots."""
        for _ in range(data.draw(st.integers(1, len(self.active)), label="frees")):
            self.free(data)
        self.allocate_n(data.draw(st.integers(self.max_len // 2, self.max_len),
                                  label="num_tokens"), then_step=True)

    @rule(release=st.booleans())
    def trim(self, release: bool) -> None:
        before = self.cache.stats()
        released = self.cache.trim(release=release)
        after = self.cache.stats()
        for slot in range(SLOTS):
            if slot not in self.active:
                assert self.cache.capacity(slot) == 0
        assert after.pages_idle == 0 and after.idle_slots_with_pages == 0
        assert after.pages_pending == 0  # host fences complete at once
        assert after.pages_mapped == before.pages_mapped - before.pages_idle
        if release:
            assert after.pages_free == 0
            assert released == before.pages_created - after.pages_created
            assert released == before.pages_free + before.pages_idle
        else:
            assert released == 0
            assert after.pages_created == before.pages_created
            assert after.pages_free == before.pages_free + before.pages_idle

    @rule(num_tokens=st.data())
    def can_allocate(self, num_tokens: st.DataObject) -> None:
        n = num_tokens.draw(self.lengths, label="num_tokens")
        before = self.snapshot()
        answer = self.cache.can_allocate(n)
        if len(self.active) == SLOTS:
            assert not answer
        self.check_unchanged(before)

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        check_invariants(self.cache)
        stats = self.cache.stats()
        assert stats.active_slots == len(self.active)
        for slot, n in self.targets.items():
            want = min(n + READ_SLACK, self.max_len)
            assert self.cache.capacity(slot) >= want, (
                f"slot {slot} stepped to {n} holds {self.cache.capacity(slot)} tokens, "
                f"needs {want}")
        self.check_data()

    def teardown(self) -> None:
        self.cache.close()
        assert self.cache.closed
        assert host_mapped_bytes(self.base, self.size) == 0


@pytest.mark.parametrize("lookahead", [0, 48])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_operations_keep_invariants(layout: str, lookahead: int) -> None:
    machine = type(f"CacheMachine_{layout}_{lookahead}", (CacheMachine,),
                   {"layout_name": layout, "lookahead_tokens": lookahead})
    run_state_machine_as_test(machine, settings=SETTINGS)
