import pytest

from vattn.errors import DriverError, OutOfPages
from vattn.pages import PagePool


class FakeDevice:
    def __init__(self, fail_create_at: int = 0) -> None:
        self.next = 100
        self.live: set[int] = set()
        self.fail_create_at = fail_create_at
        self.creates = 0

    def create(self) -> int:
        self.creates += 1
        if self.creates == self.fail_create_at:
            raise DriverError("cuMemCreate", "CUDA_ERROR_UNKNOWN")
        self.next += 1
        self.live.add(self.next)
        return self.next

    def release(self, handle: int) -> None:
        self.live.remove(handle)


def test_take_creates_then_reuses_lifo() -> None:
    dev = FakeDevice()
    pool = PagePool(dev.create, dev.release, limit_pages=8)
    assert pool.take(3) == [101, 102, 103]
    pool.put([101, 102])
    pool.put([103])
    assert pool.take(2) == [103, 102]
    assert pool.take(2) == [101, 104]
    assert (pool.num_created, pool.num_free, pool.num_out) == (4, 0, 4)


def test_limit_raises_out_of_pages_unchanged() -> None:
    dev = FakeDevice()
    pool = PagePool(dev.create, dev.release, limit_pages=4)
    pool.take(3)
    with pytest.raises(OutOfPages) as info:
        pool.take(2)
    assert (info.value.needed, info.value.available) == (2, 1)
    assert pool.num_created == 3 and dev.live == {101, 102, 103}


def test_create_failure_releases_partial_work() -> None:
    dev = FakeDevice(fail_create_at=3)
    pool = PagePool(dev.create, dev.release, limit_pages=8)
    pool.put([])
    with pytest.raises(DriverError):
        pool.take(4)
    assert pool.num_created == 0 and not dev.live


def test_grow_and_trim_release_oldest_first() -> None:
    dev = FakeDevice()
    pool = PagePool(dev.create, dev.release, limit_pages=5)
    assert pool.grow(10) == 5
    assert pool.num_available == 5
    assert pool.trim(keep_free=2) == 3
    assert dev.live == {104, 105}
    assert pool.take(2) == [105, 104]


def test_lower_limit_releases_free_pages() -> None:
    dev = FakeDevice()
    pool = PagePool(dev.create, dev.release, limit_pages=6)
    pool.grow(6)
    out = pool.take(2)
    pool.set_limit(3)
    assert pool.num_created == 3 and len(dev.live) == 3 and pool.num_available == 1
    pool.put(out)
    assert pool.num_available == 3


def test_retire_releases_taken_pages() -> None:
    dev = FakeDevice()
    pool = PagePool(dev.create, dev.release, limit_pages=4)
    taken = pool.take(3)
    pool.retire(taken[:2])
    assert pool.num_created == 1 and dev.live == {taken[2]}
