"""The one protocol every virtual-memory backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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
