"""The cache on the CUDA backend (marked gpu; skipped without a CUDA device)."""

from __future__ import annotations

import random

import pytest
import torch

import vattn
from tests.conftest import check_invariants

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def llama_cache(layout: str = "per_layer", **overrides: object) -> vattn.VirtualKVCache:
    """Llama-3-8B KV heads (8 x 128, bf16), 2 MiB pages: 1024 tokens a page per layer."""
    args: dict[str, object] = dict(
        num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, max_batch_size=8,
        max_context_len=8192, device="cuda", layout=layout, debug_fill_nan=True,
        memory_limit=512 * MiB, lookahead_tokens=0)
    args.update(overrides)
    return vattn.VirtualKVCache(**args)  # type: ignore[arg-type]


def test_backend_is_cuda() -> None:
    with llama_cache() as cache:
        assert cache._res.vm.name == "cuda"
        assert cache._res.vm.granularity == 2 * MiB
        assert cache.kv(0)[0].device.type == "cuda"


@pytest.mark.parametrize("layout", ["per_layer", "token_major"])
def test_random_operations_keep_invariants_and_data(layout: str) -> None:
    rng = random.Random(1234)
    with llama_cache(layout) as cache:
        lengths: dict[int, int] = {}
        copies: dict[int, list[torch.Tensor]] = {}
        for _ in range(150):
            op = rng.random()
            if op < 0.25 and cache.can_allocate():
                slot = cache.allocate(rng.randrange(0, 4000))
                lengths[slot] = 0
            elif op < 0.4 and lengths:
                slot = rng.choice(sorted(lengths))
                cache.free(slot)
                del lengths[slot]
                copies.pop(slot, None)
            elif op < 0.45:
                cache.trim(release=rng.random() < 0.5)
            elif lengths:
                grown = {s: min(n + rng.randrange(1, 3000), 8192 - 256)
                         for s, n in lengths.items() if rng.random() < 0.6}
                try:
                    cache.step(grown)
                except vattn.OutOfPages:
                    grown = {}      # nothing mapped; the checks below still run
                for slot, n in grown.items():
                    assert cache.capacity(slot) >= n + cache.config.read_slack
                    lengths[slot] = n
                    copies[slot] = []
                    for layer in range(cache.config.num_layers):
                        for t in cache.kv(layer):
                            data = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16)
                            t[slot, :n] = data
                            copies[slot].append(data)
            check_invariants(cache)
            for slot, data in copies.items():
                views = [t for layer in range(4) for t in cache.kv(layer)]
                for view, expect in zip(views, data, strict=True):
                    assert torch.equal(view[slot, :lengths[slot]], expect)


def test_kernel_writes_and_reads_every_mapped_slot() -> None:
    with llama_cache(max_batch_size=8) as cache:
        slots = [cache.allocate() for _ in range(8)]
        cache.step({s: 1000 + 517 * s for s in slots})
        for layer in range(4):
            k, v = cache.kv(layer)
            for s in slots:
                cap = cache.capacity(s)
                src = torch.randn(cap, 8, 128, device="cuda", dtype=torch.bfloat16)
                k[s, :cap] = src
                v[s, :cap] = src * 2
                torch.testing.assert_close((k[s, :cap].float() * 2), v[s, :cap].float())
                assert torch.equal(k[s, :cap], src)


def test_read_slack_past_a_page_boundary_with_next_page_unmapped() -> None:
    with llama_cache(read_slack=256) as cache:
        slot = cache.allocate()
        n = 1024 - 256                  # n + read_slack ends exactly on the first page
        cache.step({slot: n})
        assert cache.capacity(slot) == 1024  # the second page stays unmapped
        k, v = cache.kv(0)
        k[slot, :n] = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16)
        tile = k[slot, :n + 256].float()     # a kernel reading a whole tile past n
        torch.cuda.synchronize()
        assert torch.isfinite(tile[:n]).all()
        assert torch.isnan(tile[n:]).all()   # debug fill: unwritten tokens are NaN


def test_unmap_is_fenced_behind_running_kernels() -> None:
    with llama_cache() as cache:
        slot = cache.allocate()
        cache.step({slot: 3000})
        k, _ = cache.kv(0)
        data = torch.randn(3000, 8, 128, device="cuda", dtype=torch.bfloat16)
        k[slot, :3000] = data
        copy = torch.empty_like(data)        # allocated now: cudaMalloc would synchronize
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)       # ~0.1 s of GPU time ahead of the read
        copy.copy_(k[slot, :3000])           # reads the slot after the sleep
        cache.free(slot)
        cache.trim()
        assert cache.stats().pages_pending == 32, "unmapped while a kernel could read it"
        torch.cuda.synchronize()
        assert torch.equal(copy, data)
        cache.trim()
        assert cache.stats().pages_pending == 0
        check_invariants(cache)


def test_close_returns_device_memory() -> None:
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    cache = llama_cache(num_layers=32, max_batch_size=32, max_context_len=32768,
                        memory_limit=None)
    slots = [cache.allocate() for _ in range(32)]
    cache.step(dict.fromkeys(slots, 4096))
    assert torch.cuda.mem_get_info()[0] < free_before - 16 * 1024 * MiB
    cache.close()
    assert torch.cuda.mem_get_info()[0] == free_before


def test_out_of_pages_on_device_is_recoverable() -> None:
    with llama_cache(memory_limit=17 * 2 * MiB) as cache:  # anchor + 16 pages
        a, b = cache.allocate(), cache.allocate()
        cache.step({a: 1000})                               # 2 pages x 8 tensors
        before = cache.stats()
        with pytest.raises(vattn.OutOfPages):
            cache.step({b: 1000})
        assert cache.stats() == before
        cache.free(a)
        cache.step({b: 1000})
        check_invariants(cache)


def test_step_from_another_thread() -> None:
    import threading

    with llama_cache() as cache:
        slot = cache.allocate()
        errors: list[BaseException] = []

        def grow() -> None:
            try:
                cache.step({slot: 5000})   # the driver calls run on this thread
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=grow)
        thread.start()
        thread.join()
        assert not errors, errors
        k, _ = cache.kv(3)
        data = torch.randn(5000, 8, 128, device="cuda", dtype=torch.bfloat16)
        k[slot, :5000] = data
        assert torch.equal(k[slot, :5000], data)


def test_interpreter_exit_releases_a_cuda_cache_never_closed() -> None:
    import os
    import subprocess
    import sys

    code = (
        "import torch, vattn\n"
        "c = vattn.VirtualKVCache(num_layers=4, num_kv_heads=8, head_dim=128,\n"
        "    dtype=torch.bfloat16, max_batch_size=4, max_context_len=8192, device='cuda')\n"
        "s = c.allocate(); c.step({s: 5000})\n"
        "c.kv(0)[0][s, :5000] = 1.0\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert "Error" not in out.stderr, out.stderr
