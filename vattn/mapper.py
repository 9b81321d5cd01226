"""Carrying out plans: the driver calls that map and unmap page runs, and the fences
that keep an unmap behind every kernel that may still read the page.

A run of `n` pages of one slot is mapped in each tensor with `n` map calls and one
set-access call over the whole run (the run is contiguous in that tensor). A failure
part way undoes what the call had done, so the caller sees all or nothing.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from vattn.driver.base import VirtualMemory
from vattn.errors import VattnError
from vattn.layout import Layout

logger = logging.getLogger(__name__)

Run = tuple[int, int, Sequence[Sequence[int]]]
"""(slot, first_page, rows): rows[j] holds one handle per tensor for page first_page + j."""


class Fence(Protocol):
    """Completes when the device work enqueued before it was recorded has finished."""

    def done(self) -> bool:
        """True once every recorded event has completed (never blocks)."""
        ...

    def wait(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` for completion; returns `done()`."""
        ...


class CompletedFence:
    """The host backend's fence: CPU tensors are written synchronously."""

    def done(self) -> bool:
        return True

    def wait(self, timeout_s: float) -> bool:
        return True


class EventFence:
    """CUDA events recorded on every registered stream at once."""

    def __init__(self, streams: Sequence[torch.cuda.Stream]) -> None:
        self._events = []
        for stream in streams:
            event = torch.cuda.Event()
            event.record(stream)
            self._events.append(event)

    def done(self) -> bool:
        self._events = [e for e in self._events if not e.query()]
        return not self._events

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        pause = 20e-6
        while not self.done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        return True


class Mapper:
    """Synchronous driver work for one cache's reservation at `base_address`."""

    def __init__(self, vm: VirtualMemory, layout: Layout, base_address: int) -> None:
        self.vm = vm
        self.layout = layout
        self.base_address = base_address
        # The address arithmetic of `Layout.page_offset`, precomputed for the loops.
        self._tensor_base = [base_address + layout.tensor_offset(t)
                             for t in range(layout.num_tensors)]
        self._slot_stride = layout.slot_stride_bytes
        self._page = layout.page_size_bytes
        self.stuck: list[tuple[int, int]] = []
        """(address, handle) of pages an undo failed to unmap: still mapped, owned by no
        slot; their handles must not be mapped anywhere else until they are unmapped."""

    def map_runs(self, runs: Sequence[Run],
                 between: Callable[[], None] | None = None) -> None:
        """Map ``rows[j][t]`` at page ``first_page + j`` of `slot` in tensor `t`, for each
        ``(slot, first_page, rows)`` run; each row holds one handle per tensor.

        Tensor by tensor, so addresses ascend (the driver maps faster in that order);
        `between` is called before each tensor's calls. All or nothing: on a failure
        every page this call mapped is unmapped again (one whose unmap fails too is
        added to `stuck`).
        """
        page, stride, vm = self._page, self._slot_stride, self.vm
        done: list[tuple[int, int]] = []  # (address, handle) mapped so far
        try:
            for tensor, tensor_base in enumerate(self._tensor_base):
                if between is not None:
                    between()
                for slot, first_page, rows in runs:
                    start = tensor_base + slot * stride + first_page * page
                    address = start
                    for row in rows:
                        vm.map(address, page, row[tensor])
                        done.append((address, row[tensor]))
                        address += page
                    vm.set_access(start, len(rows) * page)
        except BaseException:
            self.stuck += [(address, handle) for address, handle in done
                           if not _quietly(self.vm.unmap, address, page)]
            raise

    def unmap_runs(self, runs: Sequence[Run]) -> None:
        """Unmap what `map_runs(runs)` mapped; all or nothing: on a failure the pages this
        call unmapped are mapped back."""
        page = self.layout.page_size_bytes
        done: list[tuple[int, int]] = []  # (address, handle) unmapped so far
        try:
            for address, handle in self.pages(runs):
                self.vm.unmap(address, page)
                done.append((address, handle))
        except BaseException:
            for address, handle in done:
                _quietly(self.vm.map, address, page, handle)
                _quietly(self.vm.set_access, address, page)
            raise


    def pages(self, runs: Sequence[Run]) -> Iterator[tuple[int, int]]:
        """(address, handle) of every page of `runs`, tensor by tensor."""
        page, stride = self._page, self._slot_stride
        for tensor, tensor_base in enumerate(self._tensor_base):
            for slot, first_page, rows in runs:
                start = tensor_base + slot * stride + first_page * page
                for j, row in enumerate(rows):
                    yield start + j * page, row[tensor]


def _without_frames(exc: BaseException) -> BaseException:
    """`exc` for the caller's join, its traceback kept as text in a note: the frames of
    a job hold the job and the cache it works on, and an error stored with them would
    keep a cache that is dropped before its join from ever being collected."""
    text = "".join(["On the mapper thread:\n", *traceback.format_exception(exc)]).rstrip()
    logger.debug("%s", text)
    add_note = getattr(exc, "add_note", None)      # Python 3.11+
    if add_note is not None:
        add_note(text)
    seen: set[int] = set()
    chain: list[BaseException | None] = [exc]
    while chain:                                        # the chain's frames too
        link = chain.pop()
        if link is not None and id(link) not in seen:
            seen.add(id(link))
            link.__traceback__ = None
            chain += [link.__cause__, link.__context__]
    return exc


def _quietly(call: Callable[..., None], *args: int) -> bool:
    """Undo work after a failure; a second failure must not hide the first (nor stop
    the rest of the undo). Returns whether the call succeeded."""
    try:
        call(*args)
        return True
    except VattnError as exc:
        logger.error("undo after a driver failure failed too: %s", exc)
        return False


_ENDING: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
"""Mapper threads that tore their own cache down (a cache collected there) and are
still finishing: joined at interpreter exit, so that finalization does not stop one
inside a native call (which aborts the process)."""


@atexit.register
def _join_ending_threads() -> None:
    for thread in list(_ENDING):
        thread.join(timeout=10)


HOLD_LIMIT_S = 0.1
"""The longest a paused job waits at a `checkpoint` before it goes on by itself (the
rest of it unheld): the hold only has to cover a forward's kernel launches, and a job
must not pin a cache that its owner dropped without joining."""


class BackgroundWorker:
    """One long-lived thread that runs one job at a time, so driver calls overlap the
    GPU's work; `join` waits for the job and raises what it raised.

    At most one job is in flight: callers `join` before they `submit`. A job may mark
    a milestone part way (`reach`), which `wait_milestone` waits for without waiting for
    the rest, and be held between its driver calls (`pause`, `checkpoint`) until it is
    joined. The thread is a daemon; it references the cache only while a job runs;
    `stop` joins it.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._passed = threading.Event()    # the job's milestone reached, or the job over
        self._passed.set()
        self._milestone = True              # ... and which of the two
        self._running = threading.Event()   # cleared by `pause`: `checkpoint` blocks
        self._running.set()
        self.hold_limit_s = HOLD_LIMIT_S
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """True while a job runs."""
        return not self._idle.is_set()

    def submit(self, job: Callable[[], None], milestone: bool = False) -> None:
        """Run `job` on the thread (started on first use). With `milestone`, the job
        calls `reach` part way (`wait_milestone` waits for that); without, the job has
        none to reach and `wait_milestone` returns at once."""
        assert not self.busy and self._error is None, "join() before submit()"
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        self._milestone = not milestone
        self.resume()
        if milestone:
            self._passed.clear()
        self._idle.clear()
        self._jobs.put(job)

    def reach(self) -> None:
        """Called by the running job: what `wait_milestone` waits for is done."""
        self._milestone = True
        self._passed.set()

    def wait_milestone(self) -> bool:
        """Wait until the job in flight calls `reach` or ends; True if it reached it (the
        job may still run), False if it ended first (`join` then raises its error)."""
        self._passed.wait()
        return self._milestone

    def pause(self) -> None:
        """Hold the job in flight at its next `checkpoint` until `resume` or `join` (or
        `hold_limit_s` there)."""
        self._running.clear()

    def resume(self) -> None:
        """Let a paused job go on."""
        self._running.set()

    def checkpoint(self) -> None:
        """Called by the running job between its driver calls: block while paused, for
        at most `hold_limit_s` in all (then the hold is over)."""
        if not self._running.wait(self.hold_limit_s):
            self.resume()

    def join(self) -> None:
        """Wait for the job in flight (resumed if paused); raise its exception, once."""
        self.resume()
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        """Finish the job in flight and end the thread (its error is dropped). Called on
        the thread itself (a cache collected there), it only asks the thread to end."""
        self.resume()
        if self._thread is not None:
            self._jobs.put(None)
            if self._thread is not threading.current_thread():
                self._thread.join()
            else:
                _ENDING.add(self._thread)
            self._thread = None
        self._error = None

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as exc:  # handed to the caller at join()
                self._error = _without_frames(exc)
            finally:
                job = None  # the job may hold the cache: let it go while idle
                self._passed.set()
                self._idle.set()
