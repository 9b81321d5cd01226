"""The C helper of `vattn.driver.native` on the CPU: its driver entry points replaced by
ctypes callbacks into a Python `VirtualMemory` (the host backend or a fault-injecting
wrapper of it), so the same loops and undo run as on a GPU, call for call."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import pytest

from vattn.driver import native
from vattn.driver.base import VirtualMemory
from vattn.errors import DriverError

INJECTED = 999
"""The code a callback returns when its call raised `DriverError`."""
UNEXPECTED = 998
"""The code a callback returns when its call raised anything else (recorded)."""
DESC = (1, 0, 3)
"""The access descriptor the helper must hand to every set-access call."""

MapFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t,
                         ctypes.c_uint64, ctypes.c_uint64)
SetAccessFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t,
                               ctypes.c_void_p, ctypes.c_size_t)
UnmapFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t)


def helper_or_skip() -> ctypes.CDLL:
    library = native.load()
    if library.dll is None:
        pytest.skip(f"the batched driver calls are not built here: {library.status}")
    return library.dll


class CallbackBatch:
    """`BatchedVirtualMemory.map_runs` / `unmap_pages` for `vm`, through the C helper."""

    def __init__(self, vm: VirtualMemory) -> None:
        self.vm = vm
        self.unexpected: list[BaseException] = []
        self.bad_descriptors = 0
        # Kept referenced: the helper calls them through raw pointers.
        self._callbacks = (MapFn(self._map), SetAccessFn(self._set_access),
                           UnmapFn(self._unmap))
        addresses = tuple(int(ctypes.cast(c, ctypes.c_void_p).value or 0)
                          for c in self._callbacks)
        self.calls = native.BatchedCalls(
            helper_or_skip(), (addresses[0], addresses[1], addresses[2]),
            native.AccessDesc(*DESC), ("map", "set_access", "unmap"),
            lambda code: "INJECTED" if code == INJECTED else f"code {code}")

    def map_runs(self, page_bytes: int, starts: Sequence[int], counts: Sequence[int],
                 handles: Sequence[int]) -> None:
        self.calls.map_runs(page_bytes, starts, counts, handles)

    def unmap_pages(self, page_bytes: int, addresses: Sequence[int],
                    handles: Sequence[int]) -> None:
        self.calls.unmap_pages(page_bytes, addresses, handles)

    def _guard(self, call: object, *args: int) -> int:
        try:
            call(*args)  # type: ignore[operator]
        except DriverError:
            return INJECTED
        except BaseException as exc:  # noqa: BLE001 - a callback must not raise into C
            self.unexpected.append(exc)
            return UNEXPECTED
        return 0

    def _map(self, address: int, size: int, offset: int, handle: int, flags: int) -> int:
        if offset or flags:
            self.unexpected.append(AssertionError(f"map offset {offset}, flags {flags}"))
        return self._guard(self.vm.map, address, size, handle)

    def _set_access(self, address: int, size: int, desc: int | None, count: int) -> int:
        got = ctypes.cast(desc, ctypes.POINTER(native.AccessDesc)).contents if desc else None
        if count != 1 or got is None or (
                got.location_type, got.location_id, got.flags) != DESC:
            self.bad_descriptors += 1
        return self._guard(self.vm.set_access, address, size)

    def _unmap(self, address: int, size: int) -> int:
        return self._guard(self.vm.unmap, address, size)
