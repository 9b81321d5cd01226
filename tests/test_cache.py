"""The public cache API on the host backend: behaviour, bad input, errors, lifetime."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch

import vattn
from tests.conftest import (
    PAGE,
    check_invariants,
    hammer_from_threads,
    host_mapped_bytes,
    small_cache,
)

LAYOUTS = ["per_layer", "token_major"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_shape_dtype_and_zero_copy(layout: str) -> None:
    with small_cache(layout) as cache:
        # 5000 padded to whole pages: 2048 tokens a page per layer, 1024 token-major.
        lmax = 6144 if layout == "per_layer" else 5120
        assert cache.max_context_len == lmax
        for layer in range(2):
            k, v = cache.kv(layer)
            assert k.shape == v.shape == (4, lmax, 2, 64)
            assert k.dtype == torch.float32 and k.stride(-1) == 1
        if layout == "token_major":
            assert cache.kv(0)[0].stride(1) == 2 * 2 * 64   # both layers of a token
            assert cache.kv(1)[0].data_ptr() - cache.kv(0)[0].data_ptr() == 2 * 64 * 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_maps_target_plus_slack_and_data_survives(layout: str) -> None:
    with small_cache(layout) as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.step({a: 2040})
        assert cache.capacity(a) >= 2040 + 16 and cache.capacity(b) == 0
        k, v = cache.kv(1)
        data = torch.randn(2040, 2, 64)
        k[a, :2040] = data
        v[a, :2040] = -data
        cache.step({a: 4000, b: 100})          # a grows by a page, b starts
        k[b, :100] = torch.randn(100, 2, 64)
        assert torch.equal(k[a, :2040], data) and torch.equal(v[a, :2040], -data)
        check_invariants(cache)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_new_pages_are_nan_in_debug_mode(layout: str) -> None:
    with small_cache(layout) as cache:
        slot = cache.allocate()
        cache.step({slot: 10})
        k, v = cache.kv(0)
        assert torch.isnan(k[slot, :cache.capacity(slot)]).all()
        assert torch.isnan(v[slot, :cache.capacity(slot)]).all()


def test_freed_slot_keeps_pages_and_is_reused_best_fit() -> None:
    with small_cache() as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.step({a: 5000, b: 100})
        cache.free(a)
        cache.free(b)
        before = cache.stats()
        assert before.idle_slots_with_pages == 2 and before.pages_idle == before.pages_mapped
        assert cache.allocate(4000) == a      # a covers 4000 tokens; b does not
        cache.step({a: 4000})
        assert cache.stats().pages_created == before.pages_created  # no driver work
        cache.free(a)
        assert cache.allocate(50) == b        # the fewest pages that cover 50 tokens
        cache.free(b)
        assert cache.allocate() == a          # unknown size: the most pages


def test_reclaim_from_idle_slot_when_pool_is_dry() -> None:
    with small_cache(memory_limit=9 * PAGE) as cache:  # anchor + 8 pages
        a, b = cache.allocate(), cache.allocate()
        cache.step({a: 4000})                   # 2 pages x 4 tensors: all 8
        k, _ = cache.kv(0)
        k[a, :100] = torch.randn(100, 2, 64)
        cache.free(a)
        cache.step({b: 10})                     # 4 pages: the top page of idle slot a
        assert cache.capacity(a) == 2048 and cache.capacity(b) == 2048
        stats = cache.stats()
        assert stats.pages_created == 8 and stats.pages_idle == 4
        check_invariants(cache)


def test_out_of_pages_leaves_cache_unchanged_then_succeeds_after_free() -> None:
    with small_cache(memory_limit=9 * PAGE) as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.step({a: 4000})
        before = cache.stats()
        with pytest.raises(vattn.OutOfPages) as info:
            cache.step({b: 100})
        assert info.value.needed == 4 and info.value.available == 0
        assert cache.stats() == before and cache.capacity(b) == 0
        assert not cache.can_allocate(100)
        cache.free(a)
        assert cache.can_allocate(100)
        cache.step({b: 100})
        assert cache.capacity(b) >= 116
        check_invariants(cache)


def test_out_of_slots() -> None:
    with small_cache() as cache:
        for _ in range(4):
            cache.allocate()
        assert not cache.can_allocate()
        with pytest.raises(vattn.OutOfSlots):
            cache.allocate()


@pytest.mark.parametrize("release", [True, False])
def test_trim(release: bool) -> None:
    with small_cache() as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.step({a: 3000, b: 10})
        cache.free(a)
        released = cache.trim(release=release)
        stats = cache.stats()
        assert stats.idle_slots_with_pages == 0 and stats.pages_mapped == 4
        assert released == (8 if release else 0)
        assert stats.pages_free == (0 if release else 8)
        check_invariants(cache)


def test_grow_pool_creates_ahead_up_to_limit() -> None:
    with small_cache(memory_limit=9 * PAGE) as cache:
        assert cache.grow_pool(3 * PAGE) == 3 * PAGE
        assert cache.grow_pool(100 * PAGE) == 5 * PAGE
        assert cache.stats().pages_free == 8


BAD_CONSTRUCTION = [
    ({"num_layers": 0}, "num_layers"),
    ({"head_dim": 2.5}, "head_dim"),
    ({"dtype": torch.int8}, "dtype"),
    ({"layout": "paged"}, "layout"),
    ({"device": "tpu"}, "device"),
    ({"page_size_bytes": PAGE + 1}, "granularity"),
    ({"memory_limit": 10}, "memory_limit"),
    ({"read_slack": -1}, "read_slack"),
    ({"pending_timeout_s": -1.0}, "pending_timeout_s"),
]


@pytest.mark.parametrize("overrides, word", BAD_CONSTRUCTION)
def test_bad_construction_is_invalid_argument(overrides: dict, word: str) -> None:
    with pytest.raises(vattn.InvalidArgument, match=word):
        small_cache(**overrides)


def test_pending_timeout_is_a_constructor_argument() -> None:
    with small_cache(pending_timeout_s=0.5) as cache:
        assert cache.config.pending_timeout_s == 0.5


def test_cuda_device_without_gpu_is_invalid_argument() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(vattn.InvalidArgument, match="CUDA"):
        small_cache(device="cuda")


def test_bad_calls_raise_invalid_argument_and_change_nothing() -> None:
    with small_cache() as cache:
        a = cache.allocate()
        cache.step({a: 100})
        before = cache.stats()
        calls = [
            lambda: cache.step({a: cache.max_context_len + 1}),
            lambda: cache.step({a: -1}),
            lambda: cache.step({a: 10.0}),
            lambda: cache.step({7: 10}),
            lambda: cache.step({1: 10}),            # not allocated
            lambda: cache.step({a: 200, 1: 10}),    # one bad target spoils the step
            lambda: cache.step([(a, 10)]),
            lambda: cache.free(1),
            lambda: cache.free(-1),
            lambda: cache.allocate(-5),
            lambda: cache.allocate(10**9),
            lambda: cache.kv(2),
            lambda: cache.kv("0"),
            lambda: cache.kv(True),
            lambda: cache.allocate(None),       # type: ignore[arg-type]
            lambda: cache.allocate(0.0),        # type: ignore[arg-type]
            lambda: cache.capacity(4),
            lambda: cache.grow_pool(-1),
        ]
        for call in calls:
            with pytest.raises(vattn.InvalidArgument):
                call()
            assert cache.stats() == before
        cache.free(a)
        with pytest.raises(vattn.InvalidArgument, match="not allocated"):
            cache.free(a)


def test_invalid_argument_is_value_error_and_vattn_error() -> None:
    assert issubclass(vattn.InvalidArgument, ValueError)
    assert issubclass(vattn.InvalidArgument, vattn.VattnError)
    assert issubclass(vattn.OutOfPages, vattn.VattnError)


@pytest.mark.parametrize("error", [vattn.OutOfPages(4, 2, "host mappings"),
                                   vattn.DriverError("cuMemMap", "CUDA_ERROR_OUT_OF_MEMORY",
                                                     "page 3"),
                                   vattn.InvalidArgument("slot must be an int")])
def test_errors_cross_a_process_boundary_with_their_fields(error: vattn.VattnError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert vars(again) == vars(error)
    assert str(copy.copy(error)) == str(error)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_close_leaves_no_mapping_and_refuses_further_use(layout: str) -> None:
    cache = small_cache(layout)
    slot = cache.allocate()
    cache.step({slot: 3000})
    base, size = cache._res.base_address, cache.layout.reservation_bytes
    assert host_mapped_bytes(base, size) > 0
    cache.close()
    cache.close()  # idempotent
    assert host_mapped_bytes(base, size) == 0
    with open("/proc/self/maps") as f:
        assert not any(int(line.split("-")[0], 16) < base + size
                       and int(line.split()[0].split("-")[1], 16) > base for line in f)
    assert cache.closed
    with pytest.raises(vattn.VattnError, match="closed"):
        cache.allocate()


def test_forked_child_is_refused() -> None:
    cache = small_cache()
    slot = cache.allocate()
    cache.step({slot: 10})
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            cache.step({slot: 20})
            message = b"no error"
        except vattn.VattnError as exc:
            message = str(exc).encode()
        os.write(write, message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    assert "forked child" in message
    cache.step({slot: 20})  # the parent is unaffected
    cache.close()


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter at the repository root."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)


def test_child_cannot_touch_parent_pages() -> None:
    # MADV_DONTFORK: the pages are absent in a child, so a write faults there.
    code = (
        "import os, torch, vattn\n"
        "from tests.conftest import small_cache\n"
        "c = small_cache(); s = c.allocate(); c.step({s: 10}); k, _ = c.kv(0)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    k[s, 0] = 1.0\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('signaled' if os.WIFSIGNALED(status) else 'exited')\n"
    )
    out = _run_python(code)
    assert out.stdout.strip() == "signaled", out.stderr


def test_interpreter_exit_releases_a_cache_never_closed() -> None:
    code = (
        "import torch, vattn\n"
        "from tests.conftest import small_cache\n"
        "c = small_cache(); s = c.allocate(); c.step({s: 3000})\n"
        "print('ok')\n"
    )
    out = _run_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert out.stderr == ""


def test_stats_counts() -> None:
    with small_cache() as cache:
        a = cache.allocate()
        cache.step({a: 3000})
        stats = cache.stats()
        assert stats.active_slots == 1
        assert stats.pages_mapped == 8 and stats.pages_created == 8
        assert stats.physical_bytes == 9 * PAGE
        assert stats.memory_limit_bytes == 64 * PAGE


def test_public_names() -> None:
    for name in ("VirtualKVCache", "VattnError", "OutOfPages", "OutOfSlots",
                 "InvalidArgument", "DriverError", "CacheStats"):
        assert hasattr(vattn, name)


def test_several_threads_share_one_cache() -> None:
    with small_cache(max_batch_size=8, memory_limit=40 * PAGE) as cache:
        hammer_from_threads(cache, background=False)
        check_invariants(cache)
        assert cache.stats().active_slots == 0


def test_streams_on_a_host_cache_are_invalid() -> None:
    with pytest.raises(vattn.InvalidArgument, match="streams"):
        small_cache(streams=[object()])
