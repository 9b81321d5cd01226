"""What a cache owns on the device: reservation, anchor page, pool, mapped rows, pending
pages. Kept apart from `VirtualKVCache` so that its finalizer can tear them down
without holding a reference to the cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vattn.allocator import PageRun
from vattn.driver.base import VirtualMemory
from vattn.errors import OutOfPages, VattnError
from vattn.layout import Layout
from vattn.mapper import BackgroundWorker, Fence, Mapper
from vattn.pages import PagePool

logger = logging.getLogger(__name__)

Row = list[int]
"""One handle per tensor: the pages that back page index j of a slot."""


@dataclass(slots=True)
class Pending:
    """Pages that left a slot and wait for `fence` before they are unmapped."""

    fence: Fence
    """Completes when no kernel enqueued before the release can read them."""
    run: PageRun
    """Where they are mapped."""
    rows: list[Row]
    """Their handles."""
    release: bool
    """Release the handles to the device (trim) rather than return them to the pool."""


class Resources:
    """Reservation + anchor page + page pool + per-slot rows of mapped handles."""

    def __init__(self, vm: VirtualMemory, layout: Layout, limit_pages: int) -> None:
        self.vm = vm
        self.layout = layout
        self.pid = os.getpid()
        page = layout.page_size_bytes
        self.base_address = vm.reserve(layout.reservation_bytes, page)
        try:
            anchor = vm.create(page)
            try:
                vm.map(self.base_address, page, anchor)
                try:
                    vm.set_access(self.base_address, page)
                except BaseException:
                    vm.unmap(self.base_address, page)
                    raise
            except BaseException:
                vm.release(anchor)
                raise
        except BaseException:
            vm.free(self.base_address, layout.reservation_bytes)
            raise
        self.anchor: int | None = anchor
        """The page kept mapped at the base (None once released)."""
        self.mapper = Mapper(vm, layout, self.base_address)
        self.worker = BackgroundWorker(f"vattn-mapper-{self.base_address:x}")
        self.pool = PagePool(lambda: vm.create(page), vm.release, max(0, limit_pages))
        self.rows: list[list[Row]] = [[] for _ in range(layout.max_batch_size)]
        self.pending: list[Pending] = []
        self.leftover: list[tuple[int, int]] | None = None
        """Set once teardown starts: (address, handle) of pages it has still to unmap."""
        self.anchor_mapped = True
        self.reserved = True
        self.closed = False

    @property
    def num_pending(self) -> int:
        """Physical pages waiting for their fence."""
        return sum(len(p.rows) for p in self.pending) * self.layout.num_tensors

    def take_rows(self, run: PageRun) -> list[Row]:
        """Detach the rows of `run` (the top of its slot) from the slot."""
        rows = self.rows[run.slot]
        assert len(rows) == run.first_page + run.num_pages
        taken = rows[run.first_page:]
        del rows[run.first_page:]
        return taken

    def map_runs(self, runs: Iterable[PageRun],
                 between: Callable[[], None] | None = None) -> None:
        """Take handles from the pool and map every run; all or nothing. `between` as in
        `Mapper.map_runs`. Pages an earlier undo failed to unmap are unmapped first (a
        failure raises before anything else changes); a page this call fails to undo
        keeps its handle out of the pool."""
        self._unstick()
        tensors = self.layout.num_tensors
        planned = []
        runs = list(runs)
        handles = self.pool.take(sum(run.num_pages for run in runs) * tensors)
        position = 0
        for run in runs:
            planned.append((run.slot, run.first_page,
                            [handles[position + j * tensors:position + (j + 1) * tensors]
                             for j in range(run.num_pages)]))
            position += run.num_pages * tensors
        try:
            self.mapper.map_runs(planned, between)
        except BaseException:
            held = {handle for _, handle in self.mapper.stuck}
            self.pool.put([h for h in handles if h not in held])
            raise
        for slot, _, rows in planned:
            self.rows[slot].extend(rows)

    def _unstick(self) -> None:
        """Unmap the pages an undo left mapped (`Mapper.stuck`) and pool their handles."""
        stuck, page = self.mapper.stuck, self.layout.page_size_bytes
        while stuck:
            address, handle = stuck[-1]
            self.vm.unmap(address, page)
            stuck.pop()
            self.pool.put([handle])

    def reap(self, block: bool, timeout_s: float = 0.0) -> int:
        """Unmap pending pages whose fence completed (waiting up to `timeout_s` each when
        `block`); returns how many pages were released to the device."""
        released = 0
        for entry in list(self.pending):
            if entry.fence.done() or (block and entry.fence.wait(timeout_s)):
                released += self._retire(entry)
        return released

    def wait_pending(self, slots: set[int], timeout_s: float) -> None:
        """Unmap pending pages that lie in `slots` before they are mapped again."""
        if not any(p.run.slot in slots for p in self.pending):
            return
        for entry in self.pending:
            if entry.run.slot in slots and not entry.fence.wait(timeout_s):
                raise OutOfPages(len(entry.rows) * self.layout.num_tensors, 0,
                                 "pages (still fenced behind running kernels)")
        self.reap(block=False)

    def _retire(self, entry: Pending) -> int:
        """Unmap a pending entry (it stays pending if that fails) and pool or release its
        pages (a failed release leaves the rest in the pool)."""
        self.mapper.unmap_runs([(entry.run.slot, entry.run.first_page, entry.rows)])
        self.pending.remove(entry)
        handles = [h for row in entry.rows for h in row]
        if not entry.release:
            self.pool.put(handles)
            return 0
        self.pool.retire(handles)
        return len(handles)

    def teardown(self) -> None:
        """Unmap and release everything, free the reservation, close the backend.

        Runs from `close()` and from the finalizer. It goes on past a failed call and
        raises the first failure at the end, keeping what it could not undo (a page
        that failed to unmap is not released, a reservation with a page still mapped is
        not freed), so a later call finishes the work. A CUDA context already gone at
        interpreter exit is not a failure: everything went with it.
        """
        if self.closed or os.getpid() != self.pid:
            return
        self.worker.stop()
        if self.leftover is None:
            self.leftover = self._everything_mapped()
            self.rows = [[] for _ in self.rows]
            self.pending = []
        vm, page = self.vm, self.layout.page_size_bytes
        errors: list[VattnError] = []

        def attempt(call: Callable[..., object], *args: object) -> bool:
            try:
                call(*args)
                return True
            except VattnError as exc:
                errors.append(exc)
                return False

        attempt(vm.synchronize)
        remaining, unmapped = [], []
        for address, handle in self.leftover:
            if not attempt(vm.unmap, address, page):
                remaining.append((address, handle))
            elif handle == self.anchor:
                self.anchor_mapped = False
            else:
                unmapped.append(handle)
        self.leftover = remaining
        # Pooled (a pool over a lowered limit releases some at once), then released;
        # either keeps what it failed to release, for a later call.
        if attempt(self.pool.put, unmapped):
            attempt(self.pool.release_all)
        if not self.anchor_mapped and self.anchor is not None and attempt(
                vm.release, self.anchor):
            self.anchor = None
        if self.reserved and not remaining:
            self.reserved = not attempt(vm.free, self.base_address,
                                        self.layout.reservation_bytes)
        if not self.reserved and self.anchor is None and self.pool.num_created == 0:
            self.closed = attempt(vm.close)
        real = [e for e in errors
                if getattr(e, "code_name", "") != "CUDA_ERROR_DEINITIALIZED"]
        if errors and not real:
            logger.debug("CUDA context already gone at teardown; nothing left to release")
            self.closed = True
        if real:
            raise real[0]

    def _everything_mapped(self) -> list[tuple[int, int]]:
        """(address, handle) of every mapped page: slots, pending, the anchor."""
        runs = [(slot, 0, rows) for slot, rows in enumerate(self.rows) if rows]
        runs += [(p.run.slot, p.run.first_page, p.rows) for p in self.pending]
        assert self.anchor is not None
        stuck, self.mapper.stuck = self.mapper.stuck, []
        return [*self.mapper.pages(runs), *stuck, (self.base_address, self.anchor)]
