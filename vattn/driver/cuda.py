"""The CUDA driver's virtual-memory API through cuda-python (`cuda.bindings.driver`).

A thread with no current context gets the device's primary context (the one torch
uses) on its first call; a thread that has one (torch's, perhaps of another device)
keeps it, so a cache never changes which device torch uses on that thread. The
virtual-memory calls name their device or act on a handle or an address, so they are
taken to be served by any current context (not yet checked on two GPUs). The two calls
that act on the current context (synchronize, memory info) push the device's own
around the call. The bindings release the GIL inside driver calls (cuda-bindings >=
12.9.1). A result other than ``CUDA_SUCCESS`` raises `DriverError(call, code_name)`,
and ``CUDA_ERROR_OUT_OF_MEMORY`` from `create` raises `OutOfPages`.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from cuda.bindings import driver as cu

from vattn.errors import DriverError, OutOfPages


def _check(call: str, result: tuple[Any, ...]) -> Any:
    """The value of a driver call's ``(CUresult, value...)`` tuple, or DriverError."""
    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        raise DriverError(call, getattr(err, "name", str(err)))
    return result[1] if len(result) == 2 else result[1:]


class CudaVirtualMemory:
    """The `VirtualMemory` protocol on one CUDA device."""

    name = "cuda"

    def __init__(self, ordinal: int) -> None:
        try:
            _check("cuInit", cu.cuInit(0))
        except RuntimeError as exc:  # the bindings could not load libcuda
            raise DriverError("cuInit", "CUDA_ERROR_NO_DEVICE", str(exc)) from exc
        self.ordinal = ordinal
        self.device = f"cuda:{ordinal}"
        self._cu_device = _check("cuDeviceGet", cu.cuDeviceGet(ordinal))
        self._context = _check("cuDevicePrimaryCtxRetain",
                               cu.cuDevicePrimaryCtxRetain(self._cu_device))
        self._local = threading.local()
        self._prop = cu.CUmemAllocationProp()
        self._prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = ordinal
        self._access = cu.CUmemAccessDesc()
        self._access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = ordinal
        self._access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.granularity = int(_check("cuMemGetAllocationGranularity",
                                      cu.cuMemGetAllocationGranularity(
                                          self._prop, cu.CUmemAllocationGranularity_flags
                                          .CU_MEM_ALLOC_GRANULARITY_MINIMUM)))

    def describe(self) -> dict[str, str]:
        self._enter()
        version = int(_check("cuDriverGetVersion", cu.cuDriverGetVersion()))
        name = _check("cuDeviceGetName", cu.cuDeviceGetName(256, self._cu_device))
        api = f"CUDA driver API {version // 1000}.{version % 1000 // 10}"
        kernel = _kernel_driver_version()
        return {"backend": "cuda", "device": name.split(b"\0", 1)[0].decode(),
                "driver": f"{kernel} ({api})" if kernel else api}

    def memory_info(self) -> tuple[int, int]:
        free, total = self._on_own_context("cuMemGetInfo", cu.cuMemGetInfo)
        return int(free), int(total)

    def reserve(self, size_bytes: int, alignment_bytes: int) -> int:
        self._enter()
        return int(_check("cuMemAddressReserve",
                          cu.cuMemAddressReserve(size_bytes, alignment_bytes, 0, 0)))

    def free(self, address: int, size_bytes: int) -> None:
        self._enter()
        _check("cuMemAddressFree", cu.cuMemAddressFree(address, size_bytes))

    def create(self, size_bytes: int) -> int:
        self._enter()
        err, handle = cu.cuMemCreate(size_bytes, self._prop, 0)
        if err == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise OutOfPages(1, 0, "device memory")
        _check("cuMemCreate", (err, handle))
        return int(handle)

    def release(self, handle: int) -> None:
        self._enter()
        _check("cuMemRelease", cu.cuMemRelease(handle))

    def map(self, address: int, size_bytes: int, handle: int) -> None:
        self._enter()
        _check("cuMemMap", cu.cuMemMap(address, size_bytes, 0, handle, 0))

    def set_access(self, address: int, size_bytes: int) -> None:
        self._enter()
        _check("cuMemSetAccess", cu.cuMemSetAccess(address, size_bytes, [self._access], 1))

    def unmap(self, address: int, size_bytes: int) -> None:
        self._enter()
        _check("cuMemUnmap", cu.cuMemUnmap(address, size_bytes))

    def synchronize(self) -> None:
        self._on_own_context("cuCtxSynchronize", cu.cuCtxSynchronize)

    def close(self) -> None:
        if self._context is not None:
            self._context = None
            result = cu.cuDevicePrimaryCtxRelease(self._cu_device)
            if result[0] not in (cu.CUresult.CUDA_SUCCESS,
                                 cu.CUresult.CUDA_ERROR_DEINITIALIZED):
                raise DriverError("cuDevicePrimaryCtxRelease", result[0].name)

    def _enter(self) -> None:
        """Give this thread a current context if it has none (once per thread): the
        device's primary context. A context already current stays, whichever device it
        is of: making ours current would switch torch's current device on this thread
        (the runtime follows the driver's current context), and the virtual-memory
        calls are taken not to depend on it (they name their device; not yet checked on
        two GPUs). The calls that act on the current context go through
        `_on_own_context`."""
        if getattr(self._local, "context_set", False):
            return
        if not int(_check("cuCtxGetCurrent", cu.cuCtxGetCurrent())):  # a null CUcontext
            _check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._context))
        self._local.context_set = True

    def _on_own_context(self, call: str, fn: Callable[[], tuple[Any, ...]]) -> Any:
        """``fn()`` (a driver call acting on the current context) with this device's
        primary context pushed, and the thread's context as it was afterwards: another
        device's backend, or torch, may have made its own current on this thread
        since `_enter`, and synchronizing or counting that device instead would be
        wrong (pages unmapped while this device may still read them)."""
        self._enter()
        _check("cuCtxPushCurrent", cu.cuCtxPushCurrent(self._context))
        try:
            return _check(call, fn())
        finally:
            popped = cu.cuCtxPopCurrent()[0]
            if popped != cu.CUresult.CUDA_SUCCESS and sys.exc_info()[0] is None:
                raise DriverError("cuCtxPopCurrent", getattr(popped, "name", str(popped)))


def _kernel_driver_version() -> str | None:
    """The NVIDIA kernel module's version (e.g. 580.159.04), where Linux shows it."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            words = f.readline().split()
    except OSError:
        return None
    return next((w for w in words if w[:1].isdigit() and w.count(".") >= 1), None)
