"""The physical page pool: handles created ahead of need, reused last-in first-out.

No torch, no driver import: the pool is given the backend's `create` and `release`
functions. A handle is an int (the backend's own name for one physical page).

Counts: ``num_created == num_free + num_out`` always; the cache then splits
``num_out`` into pages mapped in slots and pages pending their fenced unmap.
"""

from __future__ import annotations

from collections.abc import Callable

from vattn.errors import OutOfPages


class PagePool:
    """Physical pages of one size, capped at `limit_pages`.

    `take` hands out free handles first (most recently returned first, so a page that is
    still warm in the driver's bookkeeping is reused), then creates new ones up to the
    limit. `put` returns handles; `trim` releases free handles back to the device.
    """

    def __init__(self, create: Callable[[], int], release: Callable[[int], None],
                 limit_pages: int) -> None:
        if limit_pages < 0:
            raise ValueError(f"limit_pages must be >= 0, got {limit_pages}")
        self._create = create
        self._release = release
        self._free: list[int] = []
        self.limit_pages = limit_pages
        self.num_created = 0

    @property
    def num_free(self) -> int:
        """Handles created and not handed out."""
        return len(self._free)

    @property
    def num_out(self) -> int:
        """Handles handed out by `take` and not yet returned."""
        return self.num_created - len(self._free)

    @property
    def num_available(self) -> int:
        """Handles `take` can hand out now: free ones plus those it may still create."""
        return len(self._free) + max(0, self.limit_pages - self.num_created)

    @property
    def num_over_limit(self) -> int:
        """Handles beyond a lowered limit: `put` releases this many of the handles given
        back before it keeps any (so reclaiming pages yields that many fewer)."""
        return max(0, self.num_created - self.limit_pages)

    def take(self, num_pages: int) -> list[int]:
        """Hand out `num_pages` handles, or raise `OutOfPages` with the pool unchanged.

        A driver failure while creating releases what this call created and re-raises.
        """
        if num_pages > self.num_available:
            raise OutOfPages(num_pages, self.num_available)
        num_reused = min(num_pages, len(self._free))
        try:
            created = self._create_many(num_pages - num_reused)
        except OutOfPages:
            # The device ran out before the limit did: report what could be had.
            raise OutOfPages(num_pages, len(self._free)) from None
        taken = self._free[len(self._free) - num_reused:][::-1] if num_reused else []
        del self._free[len(self._free) - num_reused:]
        return taken + created

    def put(self, handles: list[int]) -> None:
        """Return handles; the last one returned is the first one taken next. Handles
        beyond a lowered limit are released instead."""
        self._free.extend(handles)
        excess = self.num_created - self.limit_pages
        if excess > 0:
            self.trim(keep_free=max(0, len(self._free) - excess))

    def grow(self, num_pages: int) -> int:
        """Create handles ahead of need, up to the limit; returns how many were created."""
        count = max(0, min(num_pages, self.limit_pages - self.num_created))
        self._free.extend(self._create_many(count))
        return count

    def trim(self, keep_free: int = 0) -> int:
        """Release free handles until at most `keep_free` are left; returns how many.

        Releases the least recently returned handles first.
        """
        count = max(0, len(self._free) - keep_free)
        victims = self._free[:count]
        del self._free[:count]
        for released, handle in enumerate(victims):
            try:
                self._release(handle)
            except BaseException:
                self._free[:0] = victims[released:]
                self.num_created -= released
                raise
        self.num_created -= count
        return count

    def retire(self, handles: list[int]) -> None:
        """Release handles that were taken out, instead of returning them."""
        for count, handle in enumerate(handles):
            try:
                self._release(handle)
            except BaseException:
                self.num_created -= count
                self._free.extend(handles[count:])
                raise
        self.num_created -= len(handles)

    def set_limit(self, limit_pages: int) -> None:
        """Change the cap; handles beyond it are released as they come back free."""
        if limit_pages < 0:
            raise ValueError(f"limit_pages must be >= 0, got {limit_pages}")
        self.limit_pages = limit_pages
        excess = self.num_created - limit_pages
        if excess > 0:
            self.trim(keep_free=max(0, len(self._free) - excess))

    def release_all(self) -> None:
        """Release every free handle (the caller has taken back every handle it held)."""
        self.trim(0)

    def _create_many(self, count: int) -> list[int]:
        created: list[int] = []
        try:
            for _ in range(count):
                created.append(self._create())
                self.num_created += 1
        except BaseException:
            for handle in created:
                self._release(handle)
            self.num_created -= len(created)
            raise
        return created
