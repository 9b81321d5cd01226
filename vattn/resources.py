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
from vattn.errors import DriverError, OutOfPages
from vattn.layout import Layout
from vattn.mapper import Fence, Mapper
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
            self.anchor = vm.create(page)
            try:
                vm.map(self.base_address, page, self.anchor)
                vm.set_access(self.base_address, page)
            except BaseException:
                vm.release(self.anchor)
                raise
        except BaseException:
            vm.free(self.base_address, layout.reservation_bytes)
            raise
        self.mapper = Mapper(vm, layout, self.base_address)
        self.pool = PagePool(lambda: vm.create(page), vm.release, max(0, limit_pages))
        self.rows: list[list[Row]] = [[] for _ in range(layout.max_batch_size)]
        self.pending: list[Pending] = []

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

    def map_runs(self, runs: Iterable[PageRun]) -> None:
        """Take handles from the pool and map every run; all or nothing."""
        runs, mapper = list(runs), self.mapper
        tensors = self.layout.num_tensors
        handles = self.pool.take(sum(run.num_pages for run in runs) * tensors)
        done: list[tuple[PageRun, list[Row]]] = []
        try:
            position = 0
            for run in runs:
                rows = [handles[position + j * tensors:position + (j + 1) * tensors]
                        for j in range(run.num_pages)]
                mapper.map_run(run.slot, run.first_page, rows)
                position += run.num_pages * tensors
                done.append((run, rows))
        except BaseException:
            for run, rows in done:
                mapper.unmap_run(run.slot, run.first_page, rows)
            self.pool.put(handles)
            raise
        for run, rows in done:
            self.rows[run.slot].extend(rows)

    def reap(self, block: bool, timeout_s: float = 0.0) -> int:
        """Unmap pending pages whose fence completed (waiting up to `timeout_s` each when
        `block`); returns how many pages were released to the device."""
        released = 0
        for entry in list(self.pending):
            if entry.fence.done() or (block and entry.fence.wait(timeout_s)):
                released += self._retire(entry)
                self.pending.remove(entry)
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
        self.mapper.unmap_run(entry.run.slot, entry.run.first_page, entry.rows)
        handles = [h for row in entry.rows for h in row]
        if not entry.release:
            self.pool.put(handles)
            return 0
        self.pool.retire(handles)
        return len(handles)

    def teardown(self) -> None:
        """Unmap and release everything and free the reservation (the finalizer; runs
        once). Best effort: it goes on past a failed call and raises the first failure
        at the end; a context already gone at interpreter exit is not a failure."""
        if os.getpid() != self.pid:
            return
        vm, page = self.vm, self.layout.page_size_bytes
        errors: list[DriverError] = []

        def attempt(call: Callable[..., object], *args: int) -> None:
            try:
                call(*args)
            except DriverError as exc:
                errors.append(exc)

        attempt(vm.synchronize)
        mapped = [(slot, 0, rows) for slot, rows in enumerate(self.rows) if rows]
        mapped += [(p.run.slot, p.run.first_page, p.rows) for p in self.pending]
        for slot, first_page, rows in mapped:
            for tensor in range(self.layout.num_tensors):
                start = self.base_address + self.layout.page_offset(tensor, slot, first_page)
                for j, row in enumerate(rows):
                    attempt(vm.unmap, start + j * page, page)
                    attempt(vm.release, row[tensor])
        attempt(self.pool.release_all)
        attempt(vm.unmap, self.base_address, page)
        attempt(vm.release, self.anchor)
        attempt(vm.free, self.base_address, self.layout.reservation_bytes)
        attempt(vm.close)
        self.rows = [[] for _ in self.rows]
        self.pending = []
        real = [e for e in errors if e.code_name != "CUDA_ERROR_DEINITIALIZED"]
        if len(real) < len(errors):
            logger.debug("CUDA context already gone at teardown; nothing left to release")
        if real:
            raise real[0]
