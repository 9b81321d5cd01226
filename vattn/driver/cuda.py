"""The CUDA driver's virtual-memory API through cuda-python (`cuda.bindings.driver`).

Every call runs with the device's primary context current (the one torch uses), set
once per thread; the bindings release the GIL inside driver calls (cuda-bindings >=
12.9.1). The mapper's batches (`map_runs`, `unmap_pages`) go through the C helper of
`vattn.driver.native` where it could be built, one foreign call a batch. A result
other than ``CUDA_SUCCESS`` raises `DriverError(call, code_name)`, and
``CUDA_ERROR_OUT_OF_MEMORY`` from `create` raises `OutOfPages`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from cuda.bindings import driver as cu

from vattn.driver import native
from vattn.driver.base import map_runs_each, unmap_pages_each
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
        self._batch, self.batch_status = _batched_calls(ordinal)

    def describe(self) -> dict[str, str]:
        self._enter()
        version = int(_check("cuDriverGetVersion", cu.cuDriverGetVersion()))
        name = _check("cuDeviceGetName", cu.cuDeviceGetName(256, self._cu_device))
        api = f"CUDA driver API {version // 1000}.{version % 1000 // 10}"
        kernel = _kernel_driver_version()
        return {"backend": "cuda", "device": name.split(b"\0", 1)[0].decode(),
                "driver": f"{kernel} ({api})" if kernel else api,
                "batched driver calls": self.batch_status}

    def memory_info(self) -> tuple[int, int]:
        self._enter()
        free, total = _check("cuMemGetInfo", cu.cuMemGetInfo())
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

    def map_runs(self, page_bytes: int, starts: Sequence[int], counts: Sequence[int],
                 handles: Sequence[int]) -> None:
        """`BatchedVirtualMemory.map_runs`: one call into the C helper where it loaded."""
        self._enter()
        if self._batch is None:
            map_runs_each(self, page_bytes, starts, counts, handles)
        else:
            self._batch.map_runs(page_bytes, starts, counts, handles)

    def unmap_pages(self, page_bytes: int, addresses: Sequence[int],
                    handles: Sequence[int]) -> None:
        """`BatchedVirtualMemory.unmap_pages`: one call into the C helper where it loaded."""
        self._enter()
        if self._batch is None:
            unmap_pages_each(self, page_bytes, addresses, handles)
        else:
            self._batch.unmap_pages(page_bytes, addresses, handles)

    def synchronize(self) -> None:
        self._enter()
        _check("cuCtxSynchronize", cu.cuCtxSynchronize())

    def close(self) -> None:
        if self._context is not None:
            self._context = None
            result = cu.cuDevicePrimaryCtxRelease(self._cu_device)
            if result[0] not in (cu.CUresult.CUDA_SUCCESS,
                                 cu.CUresult.CUDA_ERROR_DEINITIALIZED):
                raise DriverError("cuDevicePrimaryCtxRelease", result[0].name)

    def _enter(self) -> None:
        """Make the primary context current on this thread (once per thread)."""
        if getattr(self._local, "context_set", False):
            return
        _check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._context))
        self._local.context_set = True


def _batched_calls(ordinal: int) -> tuple[native.BatchedCalls | None, str]:
    """The C helper bound to this driver's map, set-access and unmap entry points (the
    ones the bindings call), or None and the reason."""
    library = native.load()
    if library.dll is None:
        return None, library.status
    version = int(_check("cuDriverGetVersion", cu.cuDriverGetVersion()))
    entry_points = []
    for symbol in ("cuMemMap", "cuMemSetAccess", "cuMemUnmap"):
        err, address, _ = cu.cuGetProcAddress(
            symbol.encode(), version, cu.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT)
        if err != cu.CUresult.CUDA_SUCCESS or not address:
            return None, f"python ({symbol} not found: {getattr(err, 'name', err)})"
        entry_points.append(int(address))
    desc = native.AccessDesc(int(cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE), ordinal,
                       int(cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE))
    batch = native.BatchedCalls(library.dll, (entry_points[0], entry_points[1],
                                              entry_points[2]), desc,
                                ("cuMemMap", "cuMemSetAccess", "cuMemUnmap"), _code_name)
    return batch, library.status


def _code_name(code: int) -> str:
    try:
        return cu.CUresult(code).name
    except ValueError:
        return f"CUresult {code}"


def _kernel_driver_version() -> str | None:
    """The NVIDIA kernel module's version (e.g. 580.159.04), where Linux shows it."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            words = f.readline().split()
    except OSError:
        return None
    return next((w for w in words if w[:1].isdigit() and w.count(".") >= 1), None)
