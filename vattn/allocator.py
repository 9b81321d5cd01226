"""Slot policy: which slot a request gets and which pages to map or unmap.

Ints and dataclasses only (no torch, no driver). Counts are pages *per tensor*: a slot
with ``num_pages = n`` has pages ``0..n-1`` of its range mapped in every one of the
cache's tensors, so it holds ``n * num_tensors`` physical pages.

Freed slots keep their pages (deferred reclamation): the next request of a similar size
reuses them without a driver call. When the pool cannot cover a step, pages are taken
back from idle slots, least recently freed first, from the top of each slot down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vattn.errors import OutOfPages, OutOfSlots


@dataclass(slots=True, frozen=True)
class PageRun:
    """Pages ``first_page .. first_page + num_pages - 1`` of `slot`, in every tensor."""

    slot: int
    """Batch index."""
    first_page: int
    """First page index within the slot."""
    num_pages: int
    """Pages per tensor in the run."""


@dataclass(slots=True, frozen=True)
class MapPlan:
    """What one step must do: unmap `reclaim` (idle slots, in order) then map `grow`."""

    grow: tuple[PageRun, ...] = ()
    """Runs to map, one per slot that grows."""
    reclaim: tuple[PageRun, ...] = ()
    """Runs taken back from idle slots to make room."""

    def num_pages(self, runs: tuple[PageRun, ...], num_tensors: int) -> int:
        """Physical pages in `runs`."""
        return sum(run.num_pages for run in runs) * num_tensors

    @property
    def empty(self) -> bool:
        """True when the step needs no driver call."""
        return not self.grow and not self.reclaim


_NOTHING_TO_DO = MapPlan()


@dataclass(slots=True)
class SlotState:
    """One slot's policy state."""

    num_pages: int = 0
    """Pages mapped per tensor."""
    active: bool = False
    """Owned by a request."""
    freed_at: int = 0
    """Order in which it was last freed (for least-recently-freed reclaim)."""


@dataclass(slots=True)
class SlotAllocator:
    """Slots and their mapped capacity for a cache of `num_slots` x `pages_per_slot`."""

    num_slots: int
    """Slots (max batch size)."""
    pages_per_slot: int
    """Pages per tensor that back a full slot."""
    num_tensors: int
    """Virtual tensors that every page index is mapped in."""
    slots: list[SlotState] = field(init=False)
    _num_frees: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        for name in ("num_slots", "pages_per_slot", "num_tensors"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.slots = [SlotState() for _ in range(self.num_slots)]

    # -- slots -----------------------------------------------------------------------

    def can_allocate(self) -> bool:
        """True when a slot is free."""
        return any(not s.active for s in self.slots)

    def choose(self, num_pages: int = 0) -> int | None:
        """The slot `allocate(num_pages)` would take, or None when every slot is active.

        Best fit: the idle slot with the fewest pages that still covers `num_pages`;
        when none covers it (or the size is unknown, 0), the one with the most pages.
        Ties go to the lowest index.
        """
        idle = [b for b, s in enumerate(self.slots) if not s.active]
        covering = [b for b in idle if self.slots[b].num_pages >= num_pages]
        if num_pages > 0 and covering:
            return min(covering, key=lambda b: (self.slots[b].num_pages, b))
        return min(idle, key=lambda b: (-self.slots[b].num_pages, b), default=None)

    def allocate(self, num_pages: int = 0) -> int:
        """Take the slot `choose(num_pages)` picks; `OutOfSlots` when none is free."""
        slot = self.choose(num_pages)
        if slot is None:
            raise OutOfSlots(f"all {self.num_slots} slots are active")
        self.slots[slot].active = True
        return slot

    def free(self, slot: int) -> None:
        """Mark `slot` idle; its pages stay mapped for the next request."""
        state = self.slots[slot]
        assert state.active, f"slot {slot} is not active"
        state.active = False
        self._num_frees += 1
        state.freed_at = self._num_frees

    # -- planning --------------------------------------------------------------------

    def reclaimable(self, exclude: int | None = None) -> int:
        """Physical pages held by idle slots (other than `exclude`)."""
        return sum(s.num_pages for b, s in enumerate(self.slots)
                   if not s.active and b != exclude) * self.num_tensors

    def plan(self, targets: Mapping[int, int], available: int,
             ahead: Mapping[int, int] | None = None, ahead_budget: int = 0) -> MapPlan:
        """Pages to map so each slot in `targets` has at least that many pages per tensor.

        `available` is how many physical pages the pool can hand out, less those it will
        release of the pages given back to it (over a lowered limit: may be negative, and
        reclaiming covers that first). Look-ahead: slots
        in `ahead` may also grow toward that many pages, spending at most `ahead_budget`
        physical pages of the pool (never reclaimed ones), the slots with the least
        headroom over their target first, so that many slots crossing a page boundary
        together are mapped over several steps. Slots never shrink here. Raises
        `OutOfPages(needed, available + reclaimable)` when even reclaiming every idle slot
        cannot cover `targets`; nothing is changed either way.
        """
        slots = self.slots
        need = {slot: pages for slot, pages in targets.items() if pages > slots[slot].num_pages}
        needed = sum(need[slot] - slots[slot].num_pages for slot in need) * self.num_tensors
        if needed and needed > available:
            if needed > available + self.reclaimable():
                raise OutOfPages(needed, available + self.reclaimable())
            return MapPlan(grow=self._runs(need), reclaim=self._reclaim_runs(needed - available))
        if ahead:
            # At least one page row when allowed at all: a row is num_tensors pages, which
            # can exceed the budget (64 pages per_layer for Llama-3-8B).
            budget = min(max(ahead_budget, self.num_tensors if ahead_budget else 0),
                         available - needed) // self.num_tensors
            for slot in sorted(ahead, key=lambda b: (self._headroom(b, targets), b)):
                have = max(slots[slot].num_pages, need.get(slot, 0))
                extra = min(ahead[slot] - have, budget)
                if extra > 0:
                    need[slot] = have + extra
                    budget -= extra
        return MapPlan(grow=self._runs(need)) if need else _NOTHING_TO_DO

    def _headroom(self, slot: int, targets: Mapping[int, int]) -> int:
        return self.slots[slot].num_pages - targets.get(slot, 0)

    def _runs(self, need: Mapping[int, int]) -> tuple[PageRun, ...]:
        slots = self.slots
        return tuple(PageRun(slot, slots[slot].num_pages, need[slot] - slots[slot].num_pages)
                     for slot in sorted(need))

    def trim_plan(self) -> MapPlan:
        """Every page of every idle slot, to give back to the pool."""
        return MapPlan(reclaim=tuple(
            PageRun(b, 0, s.num_pages)
            for b, s in enumerate(self.slots) if not s.active and s.num_pages))

    def apply(self, plan: MapPlan) -> None:
        """Record that `plan` was carried out."""
        for run in plan.reclaim:
            state = self.slots[run.slot]
            assert not state.active and run.first_page + run.num_pages == state.num_pages
            state.num_pages = run.first_page
        for run in plan.grow:
            state = self.slots[run.slot]
            assert state.active and run.first_page == state.num_pages
            state.num_pages += run.num_pages
            assert state.num_pages <= self.pages_per_slot

    def _reclaim_runs(self, shortfall: int) -> tuple[PageRun, ...]:
        """Top pages of idle slots, least recently freed first, covering `shortfall`."""
        runs = []
        order = sorted((s.freed_at, b) for b, s in enumerate(self.slots)
                       if not s.active and s.num_pages)
        for _, slot in order:
            if shortfall <= 0:
                break
            have = self.slots[slot].num_pages
            take = min(have, -(-shortfall // self.num_tensors))
            runs.append(PageRun(slot, have - take, take))
            shortfall -= take * self.num_tensors
        return tuple(runs)
