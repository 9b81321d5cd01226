"""The protocol every virtual-memory backend implements, the optional batched calls a
backend may add, and the plain loops that stand in for them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from vattn.errors import DriverError

logger = logging.getLogger(__name__)


@runtime_checkable
class VirtualMemory(Protocol):
    """Reserve address ranges, create physical pages, map them into the ranges.

    Addresses and handles are plain ints; sizes are bytes and multiples of
    `granularity`. A handle is mapped whole, at one address (a handle cannot be mapped
    at an offset or partly unmapped). Every failure raises `DriverError` (or
    `OutOfPages` when physical memory or mappings run out) with nothing half done.
    Methods may be called from any thread.
    """

    name: str
    """``"cuda"`` or ``"host"``."""
    device: str
    """The torch device string the memory belongs to (``"cuda:0"``, ``"cpu"``)."""
    granularity: int
    """Smallest page size in bytes (2 MiB on current NVIDIA GPUs)."""

    def describe(self) -> dict[str, str]:
        """Backend, device name, driver version and the like, for reports."""
        ...

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the physical memory pages are created from."""
        ...

    def reserve(self, size_bytes: int, alignment_bytes: int) -> int:
        """Reserve `size_bytes` of virtual address space; returns its start."""
        ...

    def free(self, address: int, size_bytes: int) -> None:
        """Give back a reservation (everything in it unmapped first)."""
        ...

    def create(self, size_bytes: int) -> int:
        """Create one physical page of `size_bytes`; returns its handle."""
        ...

    def release(self, handle: int) -> None:
        """Release an unmapped page's memory back to the device."""
        ...

    def map(self, address: int, size_bytes: int, handle: int) -> None:
        """Map page `handle` (of exactly `size_bytes`) at `address`."""
        ...

    def set_access(self, address: int, size_bytes: int) -> None:
        """Make a mapped range readable and writable by the device."""
        ...

    def unmap(self, address: int, size_bytes: int) -> None:
        """Unmap whole pages; the range stays reserved."""
        ...

    def synchronize(self) -> None:
        """Wait for all work on the device (used at teardown)."""
        ...

    def close(self) -> None:
        """Drop what the backend itself holds (context, file descriptors)."""
        ...


@runtime_checkable
class BatchedVirtualMemory(VirtualMemory, Protocol):
    """A backend that maps and unmaps many pages in one call (same results as the loops
    `map_runs_each` and `unmap_pages_each`, fewer trips through Python)."""

    def map_runs(self, page_bytes: int, starts: Sequence[int], counts: Sequence[int],
                 handles: Sequence[int]) -> None:
        """Map `handles` in order: run ``r`` is ``counts[r]`` contiguous pages from
        ``starts[r]`` on, made accessible as a whole once mapped. All or nothing."""
        ...

    def unmap_pages(self, page_bytes: int, addresses: Sequence[int],
                    handles: Sequence[int]) -> None:
        """Unmap the page at each address; a failure maps back (``handles[k]`` at
        ``addresses[k]``) what the call had unmapped."""
        ...


def map_runs_each(vm: VirtualMemory, page_bytes: int, starts: Sequence[int],
                  counts: Sequence[int], handles: Sequence[int]) -> None:
    """`BatchedVirtualMemory.map_runs` made of single calls."""
    done: list[int] = []  # addresses mapped so far
    position = 0
    try:
        for start, count in zip(starts, counts, strict=True):
            for j in range(count):
                vm.map(start + j * page_bytes, page_bytes, handles[position + j])
                done.append(start + j * page_bytes)
            position += count
            vm.set_access(start, count * page_bytes)
    except BaseException:
        for address in done:
            quietly(vm.unmap, address, page_bytes)
        raise


def unmap_pages_each(vm: VirtualMemory, page_bytes: int, addresses: Sequence[int],
                     handles: Sequence[int]) -> None:
    """`BatchedVirtualMemory.unmap_pages` made of single calls."""
    done = 0
    try:
        for address in addresses:
            vm.unmap(address, page_bytes)
            done += 1
    except BaseException:
        for address, handle in zip(addresses[:done], handles[:done], strict=True):
            quietly(vm.map, address, page_bytes, handle)
            quietly(vm.set_access, address, page_bytes)
        raise


def quietly(call: Callable[..., None], *args: int) -> None:
    """Undo work after a failure; a second failure must not hide the first."""
    try:
        call(*args)
    except DriverError as exc:
        logger.error("undo after a driver failure failed too: %s", exc)
