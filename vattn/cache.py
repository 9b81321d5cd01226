"""`VirtualKVCache`: the public object tying the layers together.

::

    step(targets) --validate--> SlotAllocator.plan --> Mapper (unmap reclaim, map grow)
                                      |                     |
                                  PagePool.take/put     VirtualMemory (cuda | host)

Every public method takes the cache's lock, so it may be called from several threads.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping

import torch

from vattn import driver
from vattn.allocator import MapPlan, PageRun, SlotAllocator
from vattn.config import DEFAULT_MEMORY_FRACTION, CacheConfig, resolve_device
from vattn.errors import InvalidArgument, OutOfPages, VattnError
from vattn.layout import LayoutName
from vattn.mapper import CompletedFence, EventFence, Fence
from vattn.resources import Pending, Resources
from vattn.stats import CacheStats
from vattn.targets import TargetIndex
from vattn.views import byte_view, kv_views

logger = logging.getLogger(__name__)
_LIVE: weakref.WeakSet[VirtualKVCache] = weakref.WeakSet()
_NO_PLAN = MapPlan()


class VirtualKVCache:
    """KV cache of `num_layers` layers in contiguous virtual memory, mapped on demand.

    Example::

        cache = VirtualKVCache(num_layers=32, num_kv_heads=8, head_dim=128,
                               dtype=torch.bfloat16, max_batch_size=32,
                               max_context_len=32768, device="cuda")
        slot = cache.allocate()
        cache.step({slot: 3000})          # slot now holds >= 3000 (+ read_slack) tokens
        k, v = cache.kv(0)                # [max_batch_size, max_context_len, 8, 128] views
        k[slot, :3000] = new_keys
        cache.free(slot)
        cache.close()

    ``layout="token_major"`` (the default) keeps one K and one V tensor
    ``[B, Lmax, num_layers, Hkv, D]`` and `kv` returns strided per-layer views;
    ``"per_layer"`` keeps a contiguous K and V tensor per layer.
    ``max_context_len`` is rounded up so a slot is a whole number of pages; the
    attribute holds the padded value. The views cover the whole reservation, most of it
    unmapped: index them by slot and length only (DESIGN.md, Views); they dangle after
    `close()`. On CUDA, pages that leave a slot are unmapped only after an event recorded
    on `streams` (default: the current stream) at the time of `free` has completed.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_batch_size: int, max_context_len: int,
                 device: str | torch.device = "cuda", *, layout: LayoutName = "token_major",
                 page_size_bytes: int = 2 << 20, memory_limit: int | None = None,
                 read_slack: int = 256, lookahead_tokens: int | None = None,
                 lookahead_pages_per_step: int = 64, debug_fill_nan: bool = False,
                 streams: list[torch.cuda.Stream] | None = None,
                 pending_timeout_s: float = 5.0) -> None:
        self.config = CacheConfig(num_layers, num_kv_heads, head_dim, dtype, max_batch_size,
                                  max_context_len, resolve_device(device), layout,
                                  page_size_bytes, memory_limit, read_slack, lookahead_tokens,
                                  lookahead_pages_per_step, debug_fill_nan,
                                  pending_timeout_s)
        self.layout = self.config.make_layout()
        self.max_context_len = self.layout.max_context_len
        self.device = self.config.device
        self._streams = self._check_streams(streams)
        vm = driver.open_backend(self.device)
        try:
            if page_size_bytes % vm.granularity:
                raise InvalidArgument(f"page_size_bytes must be a multiple of the "
                                      f"{vm.granularity}-byte granularity, got {page_size_bytes}")
            limit = memory_limit or int(vm.memory_info()[0] * DEFAULT_MEMORY_FRACTION)
            self._res = Resources(vm, self.layout, limit // page_size_bytes - 1)
        except BaseException:
            vm.close()
            raise
        self._finalize = weakref.finalize(self, self._res.teardown)
        self._memory_limit = limit
        self._policy = SlotAllocator(max_batch_size, self.layout.pages_per_slot,
                                     self.layout.num_tensors)
        self._free_fences: list[Fence] = [CompletedFence()] * max_batch_size
        self._targets: dict[int, int] = {}
        self._index = TargetIndex(self.layout, self.config.read_slack, self.config.lookahead)
        self._inflight: MapPlan | None = None
        try:
            self._bytes = byte_view(self._res.base_address, self.layout.reservation_bytes,
                                    self.device)
            self._views = kv_views(self._bytes, self.layout, dtype)
        except BaseException:
            self._finalize()
            raise
        self._lock = threading.RLock()
        self._forked = False
        _LIVE.add(self)

    # -- requests --------------------------------------------------------------------

    def can_allocate(self, num_tokens: int = 0) -> bool:
        """Whether `allocate(num_tokens)` then `step` to `num_tokens` would succeed now."""
        with self._lock:
            self._check_usable()
            self._join()
            pages = self._index.pages_for(num_tokens)
            slot = self._policy.choose(pages if num_tokens else 0)
            if slot is None:
                return False
            short = max(0, pages - self._policy.slots[slot].num_pages) * self.layout.num_tensors
            spare = (self._available() + self._res.num_pending
                     + self._policy.reclaimable(exclude=slot))
            return short <= spare

    def allocate(self, num_tokens: int = 0) -> int:
        """Take a free slot for a request of about `num_tokens` tokens (0: unknown).

        Prefers a freed slot whose pages already cover `num_tokens` (best fit); for an
        unknown size, the freed slot with the most pages. Maps nothing: call `step`
        next. Raises `OutOfSlots` when every slot is taken.
        """
        with self._lock:
            self._check_usable()
            pages = self._index.pages_for(num_tokens)      # validates
            slot = self._policy.allocate(pages if num_tokens else 0)
            self._targets.pop(slot, None)
            self._index.fits[slot] = self._index.fit(self._policy.slots[slot])
            return slot

    def free(self, slot: int) -> None:
        """Release `slot`; its pages stay mapped for the next request.

        Kernels already enqueued may still read the slot: its pages are unmapped (if
        ever) only after an event recorded now has completed.
        """
        with self._lock:
            self._check_usable()
            self._check_active(slot)
            fence = self._new_fence()       # first: a failure leaves the slot active
            self._policy.free(slot)
            self._index.fits[slot] = -1
            self._free_fences[slot] = fence

    def step(self, targets: Mapping[int, int]) -> None:
        """Map pages so that each slot in `targets` holds at least that many tokens.

        `targets` maps slot -> tokens the slot must hold once the next forward pass has
        appended its tokens; `read_slack` more tokens are mapped behind them, and slots
        within `lookahead_tokens` of their capacity grow ahead of need to twice that
        (a bounded number of pages a step). Slots not named keep what they have; no
        slot shrinks. Joins background work first. Raises `OutOfPages` with nothing
        changed when the pages cannot be had (after waiting up to `pending_timeout_s`
        for fenced pages).
        """
        with self._lock:
            self._check_usable()
            self._join()
            plan = self._plan_step(targets, reap=True)
            if plan.empty:
                return
            try:
                self._execute(plan)
            except BaseException:
                self._reconcile(plan)
                raise

    def step_async(self, targets: Mapping[int, int]) -> None:
        """`step`, with the driver work on the cache's mapper thread.

        Joins the previous background work (raising its error, if any), then plans and
        reserves the pages here, so `OutOfPages` for the memory limit (or the slots'
        pages) is raised by this call with nothing changed, and returns while the
        mapper thread creates and maps them (and unmaps pending pages whose fences
        completed). A device that runs out before the limit does, or a failed driver
        call, surfaces at the join instead, with the plan undone. The pages are mapped
        once the next `step`, `step_async` or `wait` returns: call it with the targets
        of the forward pass after the one about to run, and that forward's pages map
        while the GPU works.
        """
        with self._lock:
            self._check_usable()
            self._join()
            plan = self._plan_step(targets, reap=False)   # the mapper thread reaps
            if plan.empty and not self._res.pending:
                return
            needed, ahead = self._split(plan, targets)
            # Pages ahead of need only (the usual look-ahead job): the targets are mapped
            # already, so there is no milestone for `wait(targets_only=True)` to wait for.
            milestone = bool(needed or plan.reclaim)
            worker = self._res.worker
            self._inflight = plan
            worker.submit(lambda: self._execute(plan, needed, ahead, worker.reach), milestone)

    def wait(self, targets_only: bool = False) -> None:
        """Join the background work of the last `step_async`; raise its error, if any.
        Afterwards every target of that call is mapped.

        With `targets_only`, return as soon as the pages the targets need are mapped
        (and raise only an error met before that). The pages that call maps ahead of
        need, if any are left, are held until the next call that joins (`step`,
        `step_async`, `wait`, `stats`, ...), which maps them and raises their error
        (without a join they go on by themselves after `mapper.HOLD_LIMIT_S`).
        This is for a loop that calls `step_async` right after enqueuing its forward, so
        that the mapper works while the host waits for the device: the next forward
        starts without waiting for look-ahead pages it does not read, and what is left
        of them is mapped inside the next `step_async` (while the device runs) rather
        than alongside the host's kernel launches, which it would slow down."""
        with self._lock:
            self._check_usable()
            worker = self._res.worker
            if targets_only and self._inflight is not None and worker.wait_milestone():
                worker.pause()      # the look-ahead left waits for the next join
                return
            self._join()

    def set_memory_limit(self, memory_limit: int) -> int:
        """Change the cap on physical memory at run time; returns the bytes released.

        Lowering it releases free pages, then idle slots' pages (once their fences
        complete); active slots keep their data, and until enough is freed, growth
        raises `OutOfPages`.
        """
        with self._lock:
            self._check_usable()
            page = self.layout.page_size_bytes
            if (not isinstance(memory_limit, int) or isinstance(memory_limit, bool)
                    or memory_limit < page):
                raise InvalidArgument(f"memory_limit must be an int >= the {page}-byte page, "
                                      f"got {memory_limit!r}")
            self._join()
            pool, before = self._res.pool, self._res.pool.num_created
            pool.set_limit(memory_limit // page - 1)
            self._memory_limit = memory_limit
            if pool.num_created > pool.limit_pages:
                self._trim_idle(release=True)
            return (before - pool.num_created) * page

    def trim(self, release: bool = True) -> int:
        """Unmap every idle slot's pages; returns the pages released to the device now.

        With `release` (the default) the unmapped pages and the pool's free pages are
        released to the device; pages still fenced behind running kernels follow once
        their events complete. With ``release=False`` they go back to the pool.
        """
        with self._lock:
            self._check_usable()
            self._join()
            released = self._trim_idle(release)
            return released + (self._res.pool.trim(0) if release else 0)

    def grow_pool(self, num_bytes: int) -> int:
        """Create physical pages ahead of need (up to `memory_limit`) so later steps only
        map; returns the bytes created."""
        if not isinstance(num_bytes, int) or isinstance(num_bytes, bool) or num_bytes < 0:
            raise InvalidArgument(f"num_bytes must be an int >= 0, got {num_bytes!r}")
        with self._lock:
            self._check_usable()
            self._join()
            page = self.layout.page_size_bytes
            return self._res.pool.grow(-(-num_bytes // page)) * page

    # -- views and numbers -----------------------------------------------------------

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of `layer`, each ``[max_batch_size, max_context_len, Hkv, D]`` of the
        cache's dtype, zero-copy over the virtual reservation. Index by slot and length.
        """
        self._check_usable()
        if (not isinstance(layer, int) or isinstance(layer, bool)
                or not 0 <= layer < self.layout.num_layers):
            raise InvalidArgument(
                f"layer must be an int in [0, {self.layout.num_layers}), got {layer!r}")
        return self._views[layer]

    def capacity(self, slot: int) -> int:
        """Tokens `slot` holds (its target plus at least `read_slack`): mapped once the
        background work is joined. Between `step_async` and the next join, and after
        ``wait(targets_only=True)``, pages ahead of the targets may not be mapped yet:
        kernels may touch only the targets' tokens (and the read slack)."""
        with self._lock:
            self._check_usable()
            self._check_slot(slot)
            return self.layout.tokens_for_pages(self._policy.slots[slot].num_pages)

    def stats(self) -> CacheStats:
        """Counts of slots and physical pages; see `CacheStats`."""
        with self._lock:
            self._check_usable()
            self._join()
            tensors = self.layout.num_tensors
            slots = self._policy.slots
            mapped = sum(s.num_pages for s in slots) * tensors
            pool = self._res.pool
            return CacheStats(
                page_size_bytes=self.layout.page_size_bytes,
                active_slots=sum(s.active for s in slots),
                idle_slots_with_pages=sum(not s.active and s.num_pages > 0 for s in slots),
                pages_mapped=mapped,
                pages_idle=self._policy.reclaimable(),
                pages_ahead=tensors * sum(
                    max(0, s.num_pages - self._index.pages_for(self._targets.get(b, 0)))
                    for b, s in enumerate(slots) if s.active),
                pages_pending=self._res.num_pending,
                pages_free=pool.num_free,
                pages_created=pool.num_created,
                memory_limit_bytes=self._memory_limit,
                physical_bytes=(pool.num_created + 1) * self.layout.page_size_bytes)

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and release everything, give back the reservation. Idempotent.

        Waits for the device to finish first. The views dangle afterwards. If a driver
        call fails, `DriverError` is raised with what could not be undone kept, and
        calling `close()` again finishes the work.
        """
        with self._lock:
            if self._forked:
                return
            self._res.teardown()
            self._finalize.detach()
            _LIVE.discard(self)

    @property
    def closed(self) -> bool:
        """True once `close()` has released everything."""
        return self._res.closed

    def __enter__(self) -> VirtualKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"VirtualKVCache(layers={c.num_layers}, kv_heads={c.num_kv_heads}, "
                f"head_dim={c.head_dim}, dtype={c.dtype}, slots={c.max_batch_size}, "
                f"max_context_len={self.max_context_len}, layout={c.layout!r}, "
                f"device={self.device}, page={self.layout.page_size_bytes >> 20} MiB)")

    # -- internals -------------------------------------------------------------------

    def _plan_step(self, targets: Mapping[int, int], reap: bool) -> MapPlan:
        """Validate `targets`, plan them and record the plan in the policy (the driver
        work follows; `_reconcile` undoes the record if it fails). With `reap`, pending
        pages whose fences completed are unmapped first, on this thread."""
        need, ahead = self._index.needed(targets, self._check_active)
        if reap and self._res.pending:
            self._res.reap(block=False)
        plan = self._plan(need, ahead) if need else _NO_PLAN
        self._targets.update(targets)
        if not plan.empty:
            self._policy.apply(plan)
            self._index.refresh(self._policy.slots,
                                {run.slot for run in (*plan.grow, *plan.reclaim)})
        return plan

    def _plan(self, need: dict[int, int], ahead: dict[int, int]) -> MapPlan:
        """Plan `need`; when short, wait for pending pages once and plan again."""
        budget = self.config.lookahead_pages_per_step
        try:
            return self._policy.plan(need, self._available(), ahead, budget)
        except OutOfPages:
            if not self._res.pending:
                raise
        self._res.reap(block=True, timeout_s=self.config.pending_timeout_s)
        return self._policy.plan(need, self._available(), ahead, budget)

    def _available(self) -> int:
        """Pages a plan may count on from the pool: what it can hand out, less what it
        will release of the pages given back while over a lowered limit."""
        return self._res.pool.num_available - self._res.pool.num_over_limit

    def _split(self, plan: MapPlan, targets: Mapping[int, int],
               ) -> tuple[tuple[PageRun, ...], tuple[PageRun, ...]]:
        """`plan.grow` cut into the pages the (validated) targets need and the pages
        ahead of need."""
        needed, ahead = [], []
        for run in plan.grow:
            cut = min(max(0, self._index.pages_for(targets[run.slot]) - run.first_page),
                      run.num_pages)
            if cut:
                needed.append(PageRun(run.slot, run.first_page, cut))
            if cut < run.num_pages:
                ahead.append(PageRun(run.slot, run.first_page + cut, run.num_pages - cut))
        return tuple(needed), tuple(ahead)

    def _execute(self, plan: MapPlan, needed: tuple[PageRun, ...] | None = None,
                 ahead: tuple[PageRun, ...] = (),
                 on_needed: Callable[[], None] | None = None) -> None:
        """The driver work of a recorded plan, on either thread: unmap the reclaimed runs
        (after their fences), map the grown ones (all or nothing), unmap pending pages
        whose fences completed.

        Split (`needed`, `ahead`: `plan.grow` cut by `_split`), the pages the targets
        need are mapped first and `on_needed` is called; then the pages ahead of need,
        between tensors held while the worker is paused (all or nothing each: a failure
        there leaves the needed pages mapped).

        Reclaimed pages come from idle slots; whatever happens after, they sit in the
        pool, which changes no request's data.
        """
        timeout = self.config.pending_timeout_s
        for run in plan.reclaim:
            if not self._free_fences[run.slot].wait(timeout):
                raise OutOfPages(plan.num_pages(plan.grow, self.layout.num_tensors),
                                 self._res.pool.num_available)
        self._res.wait_pending({run.slot for run in plan.grow}, timeout)
        for run in plan.reclaim:
            rows = self._res.rows[run.slot][run.first_page:]
            self._res.mapper.unmap_runs([(run.slot, run.first_page, rows)])
            self._res.pool.put([h for row in self._res.take_rows(run) for h in row])
        if needed is None:
            self._map(plan.grow)
        else:
            self._map(needed)
            if on_needed is not None:
                on_needed()
            self._map(ahead, self._res.worker.checkpoint)
        self._res.reap(block=False)

    def _map(self, runs: tuple[PageRun, ...],
             between: Callable[[], None] | None = None) -> None:
        """Map `runs` (all or nothing), filled with NaN with `debug_fill_nan`; `between`
        as in `Mapper.map_runs`."""
        if not runs:
            return
        self._res.map_runs(runs, between)
        if self.config.debug_fill_nan:
            for run in runs:
                self._fill_nan(run)

    def _join(self) -> None:
        """Wait for the background work; on its failure, bring the policy back to what is
        really mapped and raise."""
        if self._inflight is None:      # nothing submitted since the last join
            return
        plan, self._inflight = self._inflight, None
        try:
            self._res.worker.join()
        except BaseException:
            if plan is not None:
                self._reconcile(plan)
            raise

    def _reconcile(self, plan: MapPlan) -> None:
        """After a failed execution: each slot of `plan` has the pages its rows hold."""
        for run in (*plan.reclaim, *plan.grow):
            self._policy.slots[run.slot].num_pages = len(self._res.rows[run.slot])
        self._index.refresh(self._policy.slots)

    def _trim_idle(self, release: bool) -> int:
        """Move every idle slot's pages to pending (behind the slot's free fence) and
        unmap those whose fence completed; returns the pages released."""
        plan = self._policy.trim_plan()
        for run in plan.reclaim:
            rows = self._res.take_rows(run)
            self._res.pending.append(Pending(self._free_fences[run.slot], run, rows, release))
        self._policy.apply(plan)
        self._index.refresh(self._policy.slots)
        return self._res.reap(block=False)

    def _fill_nan(self, run: PageRun) -> None:
        page = self.layout.page_size_bytes
        for tensor in range(self.layout.num_tensors):
            start = self.layout.page_offset(tensor, run.slot, run.first_page)
            self._bytes[start:start + run.num_pages * page].view(self.config.dtype).fill_(
                float("nan"))

    def _new_fence(self) -> Fence:
        if self.device.type != "cuda":
            return CompletedFence()
        return EventFence(self._streams or [torch.cuda.current_stream(self.device)])

    def _check_streams(self, streams: list[torch.cuda.Stream] | None) -> list[torch.cuda.Stream]:
        streams = list(streams or [])
        for stream in streams:
            if (self.device.type != "cuda" or not isinstance(stream, torch.cuda.Stream)
                    or stream.device != self.device):
                raise InvalidArgument(f"streams must be torch.cuda.Stream objects on "
                                      f"{self.device}, got {stream!r}")
        return streams

    def _check_slot(self, slot: int) -> int:
        if not isinstance(slot, int) or isinstance(slot, bool) or not (
                0 <= slot < self.layout.max_batch_size):
            raise InvalidArgument(
                f"slot must be an int in [0, {self.layout.max_batch_size}), got {slot!r}")
        return slot

    def _check_active(self, slot: int) -> int:
        if not self._policy.slots[self._check_slot(slot)].active:
            raise InvalidArgument(f"slot {slot} is not allocated (freed twice, or never "
                                  f"returned by allocate())")
        return slot

    def _check_usable(self) -> None:
        if self._forked:
            raise VattnError("this VirtualKVCache belongs to the parent process; a forked "
                             "child cannot use it (create a new cache in the child)")
        if self._res.leftover is not None:
            unfinished = "" if self._res.closed else " (teardown unfinished: call close() again)"
            raise VattnError(f"this VirtualKVCache is closed{unfinished}")


def _after_fork_in_child() -> None:
    for cache in list(_LIVE):
        cache._forked = True
        cache._finalize.detach()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
