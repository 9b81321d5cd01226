"""Shared fixtures and checks: small caches on the host backend, DESIGN.md invariants."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; it is chosen when a
    # kernel is defined, so before any test imports vattn.kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vattn
from vattn.cache import VirtualKVCache

PAGE = 1 << 20
"""1 MiB pages keep host tests small; the backend maps at 4 KiB granularity."""


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from vattn.kernels.decode import runs_on_cpu_tensors

    skips = []
    if not has_cuda():
        skips.append(("gpu", "needs a CUDA device; torch sees none"))
    if not runs_on_cpu_tensors():   # a CUDA device is present: kernels are compiled
        skips.append(("host_kernels", "runs Triton kernels on CPU tensors, which needs the "
                      "interpreter from the first import of triton (TRITON_INTERPRET=1); "
                      "this suite turns it on only where torch sees no CUDA device"))
    for item in items:
        for marker, reason in skips:
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True, scope="session")
def launches_name_only_known_arguments() -> Iterator[None]:
    """The interpreter drops keyword arguments a kernel does not take, where the compiled
    launcher raises ``KeyError``: raise here too, so that a launch passing a stray
    constexpr fails on the CPU as it would on a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.runtime.interpreter import InterpretedFunction

    options = {field.name for field in dataclasses.fields(CUDAOptions)}
    run = InterpretedFunction.run

    def checked(self: InterpretedFunction, *args: object, grid: object, warmup: bool,
                **kwargs: object) -> object:
        stray = sorted(k for k in kwargs if k not in self.arg_names and k not in options)
        if stray:
            raise KeyError(f"keyword arguments {stray} were specified but are not "
                           f"arguments of {self.fn.__name__}")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InterpretedFunction, "run", checked)
        yield


@pytest.fixture(scope="session")
def sm90_footprints() -> dict[str, dict[str, object]]:
    """The decode and fused kernels compiled ahead of time for sm_90 on this machine's
    CPU (`tests/footprint.py`, in a process of its own: the interpreter cannot compile):
    shared memory, registers, and the programs an SM holds, by tiling."""
    out = subprocess.run([sys.executable, "-m", "tests.footprint"], capture_output=True,
                         text=True, timeout=900, cwd=pathlib.Path(__file__).parents[1],
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    found: dict[str, dict[str, object]] = json.loads(out.stdout)
    return found


def small_cache(layout: str = "per_layer", **overrides: object) -> VirtualKVCache:
    """2 layers, 2 KV heads x 64, fp32: 512 B a token, 2048 tokens a 1 MiB page."""
    args: dict[str, object] = dict(
        num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_batch_size=4,
        max_context_len=5000, device="cpu", layout=layout, page_size_bytes=PAGE,
        memory_limit=64 * PAGE, read_slack=16, lookahead_tokens=0, debug_fill_nan=True)
    args.update(overrides)
    return VirtualKVCache(**args)  # type: ignore[arg-type]


def host_mapped_bytes(start: int, size: int) -> int:
    """Bytes of memfd-backed mappings inside [start, start + size) in this process."""
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if len(fields) >= 6 and "memfd:vattn" in fields[5]:
                total += max(0, min(hi, start + size) - max(lo, start))
    return total


def check_invariants(cache: VirtualKVCache) -> None:
    """DESIGN.md invariants 1 and 2 (3 is checked by the data-pattern tests)."""
    stats = cache.stats()
    assert stats.pages_mapped + stats.pages_pending + stats.pages_free == stats.pages_created
    assert stats.pages_created * stats.page_size_bytes <= stats.memory_limit_bytes
    res = cache._res
    for slot, rows in enumerate(res.rows):
        assert len(rows) == cache._policy.slots[slot].num_pages
        assert all(len(row) == cache.layout.num_tensors for row in rows)
    # The fast path's per-slot fits, updated slot by slot, equal a full recompute.
    index = cache._index
    assert index.fits == [index.fit(state) for state in cache._policy.slots]
    handles = [h for rows in res.rows for row in rows for h in row]
    handles += [h for p in res.pending for row in p.rows for h in row]
    handles += res.pool._free
    assert len(handles) == len(set(handles)) == stats.pages_created, "a page is held twice"
    if cache.device.type == "cpu":
        mapped = host_mapped_bytes(res.base_address, cache.layout.reservation_bytes)
        expected = (stats.pages_mapped + stats.pages_pending + 1) * stats.page_size_bytes
        assert mapped == expected




def hammer_from_threads(cache: VirtualKVCache, background: bool, num_threads: int = 6,
                        rounds: int = 30, targets_only: bool = False) -> None:
    """Threads each allocate a slot, map it (`step`, or `step_async` + `wait`, with
    `targets_only` as given), write and read back random data, and free it; any failure
    is raised here."""
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        try:
            for _ in range(rounds):
                try:
                    slot = cache.allocate()
                except vattn.OutOfSlots:
                    continue
                n = int(torch.randint(1, 5000, (), generator=gen))
                try:
                    if background:
                        cache.step_async({slot: n})
                        cache.wait(targets_only=targets_only)
                    else:
                        cache.step({slot: n})
                except vattn.OutOfPages:
                    cache.free(slot)
                    continue
                k, _ = cache.kv(seed % 2)
                data = torch.randn(n, 2, 64, generator=gen)
                k[slot, :n] = data
                assert torch.equal(k[slot, :n], data)
                cache.free(slot)
        except BaseException as exc:  # raised in the calling thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
