"""`TargetIndex`: which `step` targets need pages. The hot path of a decode step.

A decode step names every active slot and almost none needs a page, so each target is
one comparison against the largest target its slot's pages already cover (`fits`);
only the others go through the page arithmetic. Pure integers: no torch, no driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from vattn.allocator import SlotState
from vattn.errors import InvalidArgument
from vattn.layout import Layout


class TargetIndex:
    """Per slot, the largest target its mapped pages cover (look-ahead included)."""

    def __init__(self, layout: Layout, read_slack: int, lookahead: int) -> None:
        self.layout = layout
        self.read_slack = read_slack
        self.lookahead = lookahead
        """Low water mark, in tokens; a slot that grows goes to twice this past its target."""
        self.fits: list[int] = [-1] * layout.max_batch_size
        """-1 for a free slot, so that naming it takes the slow path that rejects it."""
        # The layout's derived sizes as plain ints: its properties are chains of calls,
        # and a step that plans runs this arithmetic on the serving loop's critical path.
        self._lmax = layout.max_context_len
        self._token_bytes = layout.token_bytes
        self._page_bytes = layout.page_size_bytes
        self._pages_per_slot = layout.pages_per_slot

    def pages_for(self, num_tokens: int) -> int:
        """Pages per tensor for `num_tokens` plus the read slack (validated); the
        arithmetic of `Layout.pages_for_tokens`."""
        lmax = self._lmax
        if (not isinstance(num_tokens, int) or isinstance(num_tokens, bool)
                or not 0 <= num_tokens <= lmax):
            raise InvalidArgument(f"num_tokens must be an int in [0, {lmax}] "
                                  f"(max_context_len), got {num_tokens!r}")
        covered = min(num_tokens + self.read_slack, lmax)
        return -(-covered * self._token_bytes // self._page_bytes)

    def needed(self, targets: Mapping[int, int], check_active: Callable[[int], object],
               ) -> tuple[dict[int, int], dict[int, int]]:
        """Validated targets that need pages or look-ahead, as slot -> pages per tensor:
        (needed now, wanted up to the high water mark). `check_active` raises for a
        slot that is out of range or not allocated."""
        if type(targets) is not dict and not isinstance(targets, Mapping):
            raise InvalidArgument(f"targets must be a mapping slot -> num_tokens, "
                                  f"got {type(targets).__name__}")
        fits, num_slots = self.fits, len(self.fits)
        high, lmax = 2 * self.lookahead, self._lmax
        need, ahead = {}, {}
        for slot, tokens in targets.items():
            if (type(slot) is int and 0 <= slot < num_slots and type(tokens) is int
                    and 0 <= tokens <= fits[slot]):
                continue                        # active, and its pages cover the target
            check_active(slot)
            need[slot] = self.pages_for(tokens)
            ahead[slot] = self.pages_for(min(tokens + high, lmax))
        return need, ahead

    def refresh(self, slots: Sequence[SlotState],
                changed: Iterable[int] | None = None) -> None:
        """Recompute the fits of the `changed` slots (default: all) after a change to
        their pages."""
        if changed is None:
            self.fits = [self.fit(state) for state in slots]
            return
        for slot in changed:
            self.fits[slot] = self.fit(slots[slot])

    def fit(self, state: SlotState) -> int:
        """The largest target a slot's pages cover with the look-ahead kept; -1 if free."""
        if not state.active:
            return -1
        if state.num_pages == self._pages_per_slot:
            return self._lmax
        return (state.num_pages * self._page_bytes // self._token_bytes - self.read_slack
                - self.lookahead)
