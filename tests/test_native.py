"""The C helper of batched driver calls (`vattn.driver.native`): how it is built and
found, how it falls back, and its calls on the host backend through callbacks (the
fault-injection script of test_faults.py runs through it as well)."""

from __future__ import annotations

import ctypes
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import host_mapped_bytes
from tests.native_calls import CallbackBatch, helper_or_skip
from vattn import DriverError
from vattn.driver import native
from vattn.driver.host import HostVirtualMemory

PAGE = 2 << 20


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """`native.load()` forgets what it found, and builds into a folder of its own."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    native.load.cache_clear()
    yield
    native.load.cache_clear()


def test_builds_once_into_the_cache_folder(fresh_load: None, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    library = native.load()
    if library.dll is None:
        pytest.skip(f"no helper here: {library.status}")
    built = list(tmp_path.glob("vattn-batch-*.so"))
    assert len(built) == 1 and library.status == f"native ({built[0]})"
    # A second process (here: a cleared cache) loads the same file without compiling.
    native.load.cache_clear()

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.load().status == library.status


def test_switched_off_by_the_environment(fresh_load: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    library = native.load()
    assert library.dll is None and library.status == "python (VATTN_NATIVE=0)"


def test_no_compiler_falls_back(fresh_load: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "")
    library = native.load()
    assert library.dll is None and library.status == "python (no C compiler found)"


def test_failed_build_falls_back_with_a_warning(fresh_load: None,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="vattn.driver.native"):
        library = native.load()
    assert library.dll is None and library.status.startswith("python (build failed")
    assert "one by one from Python" in caplog.text


class RefusingVM(HostVirtualMemory):
    """The host backend, refusing to unmap the addresses in `refuse`."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[int] = set()

    def unmap(self, address: int, size_bytes: int) -> None:
        if address in self.refuse:
            raise DriverError("unmap", "REFUSED")
        super().unmap(address, size_bytes)


@pytest.fixture
def host() -> Iterator[tuple[RefusingVM, int, list[int]]]:
    """A host backend with a reservation of 8 pages and 6 created pages."""
    vm = RefusingVM()
    base = vm.reserve(8 * PAGE, PAGE)
    handles = [vm.create(PAGE) for _ in range(6)]
    yield vm, base, handles
    vm.free(base, 8 * PAGE)
    for handle in handles:
        vm.release(handle)
    vm.close()


def read(address: int, size: int) -> torch.Tensor:
    return torch.frombuffer((ctypes.c_ubyte * size).from_address(address),
                            dtype=torch.uint8).clone()


def test_map_runs_and_unmap_pages_through_the_helper(
        host: tuple[RefusingVM, int, list[int]]) -> None:
    vm, base, handles = host
    batch = CallbackBatch(vm)
    helper_or_skip()
    # Runs of 2, 1 and 3 pages, the last starting right after the first.
    starts, counts = [base + 5 * PAGE, base, base + 2 * PAGE], [1, 2, 3]
    batch.map_runs(PAGE, starts, counts, handles)
    addresses = [base + 5 * PAGE, base, base + PAGE, base + 2 * PAGE, base + 3 * PAGE,
                 base + 4 * PAGE]
    values = torch.randint(0, 256, (6, PAGE), dtype=torch.uint8)
    for address, page in zip(addresses, values, strict=True):
        (ctypes.c_ubyte * PAGE).from_address(address)[:] = bytes(page.numpy())
    # Each handle went where the runs say: the data lands in the handle's page.
    batch.unmap_pages(PAGE, addresses, handles)
    batch.map_runs(PAGE, [base], [6], handles)
    for j in range(6):
        assert torch.equal(read(base + j * PAGE, PAGE), values[j])
    # A failing unmap (the third) maps back what the call had unmapped.
    vm.refuse = {base + 2 * PAGE}
    with pytest.raises(DriverError) as info:
        batch.unmap_pages(PAGE, [base, base + PAGE, base + 2 * PAGE], handles[:3])
    assert (info.value.call, info.value.code_name) == ("unmap", "INJECTED")
    assert host_mapped_bytes(base, 6 * PAGE) == 6 * PAGE
    assert torch.equal(read(base, 2 * PAGE), values[:2].flatten())
    vm.refuse = set()
    batch.unmap_pages(PAGE, [base + j * PAGE for j in range(6)], handles)
    assert host_mapped_bytes(base, 8 * PAGE) == 0
    assert batch.unexpected == [] and batch.bad_descriptors == 0


def test_a_failing_map_leaves_nothing_mapped(
        host: tuple[RefusingVM, int, list[int]]) -> None:
    vm, base, handles = host
    batch = CallbackBatch(vm)
    # The third handle is no page (the host backend refuses it): the second run fails.
    bad = handles[:2] + [handles[2] + 1]
    with pytest.raises(DriverError) as info:
        batch.map_runs(PAGE, [base, base + 4 * PAGE], [2, 1], bad)
    assert (info.value.call, info.value.code_name) == ("map", "INJECTED")
    assert host_mapped_bytes(base, 8 * PAGE) == 0, "the first run was not unmapped again"
    assert batch.unexpected == [] and batch.bad_descriptors == 0
