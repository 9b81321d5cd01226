"""The CUDA backend's handling of the current context, against a fake driver (no GPU):
two caches on two devices, used from one thread, each synchronize and count their own
device, and leave the thread's current context as they found it; a thread with no
current context gets the device's primary one, and a thread with one keeps it."""

from __future__ import annotations

import threading
from typing import Any
from unittest import mock

import pytest

from vattn.driver import cuda as backend
from vattn.errors import DriverError


class Context(str):
    """A context handle: `int()` of a real one is its address, never 0."""

    def __int__(self) -> int:
        return 1


class FakeDriver:
    """The calls `CudaVirtualMemory` makes, on two devices; each thread has a context
    stack, whose top is the current context (None: none)."""

    def __init__(self) -> None:
        self.real = mock.MagicMock()        # enums and structs: any attribute will do
        self.CUresult = self.real.CUresult
        self.ok = self.CUresult.CUDA_SUCCESS
        self.contexts = {0: Context("context 0"), 1: Context("context 1")}
        self.free = {"context 0": 1000, "context 1": 2000}
        self.synced: list[Any] = []
        self.pop_fails = False
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def stack(self) -> list[Any]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack  # type: ignore[no-any-return]

    def current(self) -> Any:
        return self.stack()[-1] if self.stack() else None

    def cuInit(self, flags: int) -> tuple[Any]:
        return (self.ok,)

    def cuDeviceGet(self, ordinal: int) -> tuple[Any, int]:
        return self.ok, ordinal

    def cuDevicePrimaryCtxRetain(self, device: int) -> tuple[Any, str]:
        return self.ok, self.contexts[device]

    def cuMemGetAllocationGranularity(self, prop: Any, flags: Any) -> tuple[Any, int]:
        return self.ok, 2 << 20

    def cuCtxGetCurrent(self) -> tuple[Any, Any]:
        return self.ok, self.current() or 0        # 0: a null CUcontext

    def cuCtxSetCurrent(self, context: Any) -> tuple[Any]:
        if self.stack():
            self.stack()[-1] = context
        else:
            self.stack().append(context)
        return (self.ok,)

    def cuCtxPushCurrent(self, context: Any) -> tuple[Any]:
        self.stack().append(context)
        return (self.ok,)

    def cuCtxPopCurrent(self) -> tuple[Any, Any]:
        if self.pop_fails:
            return self.CUresult.CUDA_ERROR_INVALID_CONTEXT, None
        return self.ok, self.stack().pop()

    def cuCtxSynchronize(self) -> tuple[Any]:
        self.synced.append(self.current())
        return (self.ok,)

    def cuMemGetInfo(self) -> tuple[Any, int, int]:
        return self.ok, self.free[self.current()], 4000

    def cuMemAddressReserve(self, size: int, alignment: int, addr: int,
                            flags: int) -> tuple[Any, int]:
        if self.current() is None:
            return self.CUresult.CUDA_ERROR_INVALID_CONTEXT, 0
        return self.ok, 1 << 40


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    fake = FakeDriver()
    monkeypatch.setattr(backend, "cu", fake)
    return fake


def test_each_backend_synchronizes_and_counts_its_own_device(driver: FakeDriver) -> None:
    first, second = backend.CudaVirtualMemory(0), backend.CudaVirtualMemory(1)
    assert first.memory_info() == (1000, 4000)
    assert second.memory_info() == (2000, 4000)
    driver.cuCtxSetCurrent("context 1")        # torch.cuda.set_device(1), say
    first.synchronize()
    assert driver.synced == ["context 0"]
    assert first.memory_info() == (1000, 4000)
    assert driver.current() == "context 1"     # the thread's context as it was
    second.synchronize()
    assert driver.synced == ["context 0", "context 1"]
    assert driver.stack() == ["context 1"]


def test_a_fresh_thread_gets_the_primary_context(driver: FakeDriver) -> None:
    vm = backend.CudaVirtualMemory(1)
    seen: list[Any] = []

    def work() -> None:
        seen.append(vm.reserve(2 << 20, 2 << 20))
        seen.append(driver.current())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [1 << 40, "context 1"]


def test_a_current_context_is_kept(driver: FakeDriver) -> None:
    """A cache on device 1, made and used from a thread where torch uses device 0,
    leaves device 0 current there (and still synchronizes device 1)."""
    driver.cuCtxSetCurrent(driver.contexts[0])
    vm = backend.CudaVirtualMemory(1)
    assert vm.reserve(2 << 20, 2 << 20) == 1 << 40
    assert driver.stack() == ["context 0"]
    vm.synchronize()
    assert driver.synced == ["context 1"]
    assert driver.stack() == ["context 0"]


def test_a_failed_pop_is_reported(driver: FakeDriver) -> None:
    vm = backend.CudaVirtualMemory(0)
    driver.pop_fails = True
    with pytest.raises(DriverError, match="cuCtxPopCurrent"):
        vm.synchronize()
