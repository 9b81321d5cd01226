"""Batched driver calls: the mapper's map and unmap loops in C, one foreign call a job.

Python releases the GIL around each call into the driver and takes it back afterwards;
between calls the mapper thread needs it. A 64-page job made call by call therefore
takes the GIL 128 times from the serving loop, which is launching kernels meanwhile,
and every handoff delays it. `batch.c` runs the whole loop (with its undo) in one call,
so the GIL changes hands once a job.

The helper is compiled on first use with the C compiler found on the machine (``$CC``,
``cc``, ``gcc`` or ``clang``; Triton needs one on every GPU machine too) into
``$VATTN_CACHE_DIR`` (default ``~/.cache/vattn``), and loaded with ctypes. It takes the
driver's entry points as function pointers, so it needs no CUDA headers or libraries to
build. Where it cannot be built, or with ``VATTN_NATIVE=0``, the backends make their
calls one by one from Python: the same results, a busier GIL.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from array import array
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from vattn.errors import DriverError

logger = logging.getLogger(__name__)

DISABLE_ENV = "VATTN_NATIVE"
"""Set to ``0`` to make every driver call from Python (for comparisons)."""
CACHE_ENV = "VATTN_CACHE_DIR"

_FAILED_CALL = {1: "map", 2: "set_access", 3: "unmap"}


class Library:
    """The loaded helper, or why there is none."""

    def __init__(self, dll: ctypes.CDLL | None, status: str) -> None:
        self.dll = dll
        self.status = status
        """``"native (<path>)"`` or ``"python (<reason>)"``, for reports."""


@functools.cache
def load() -> Library:
    """Build (once per source, compiler and machine) and load the helper."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return Library(None, f"python ({DISABLE_ENV}=0)")
    compiler = os.environ.get("CC") or next(
        (path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)
    if compiler is None:
        logger.info("no C compiler found: driver calls are made one by one from Python")
        return Library(None, "python (no C compiler found)")
    source = resources.files("vattn.driver").joinpath("batch.c").read_bytes()
    key = hashlib.sha256(source + compiler.encode() + sys.platform.encode()
                         + os.uname().machine.encode()).hexdigest()[:16]
    try:
        built = _build(compiler, source, f"vattn-batch-{key}.so")
        dll = ctypes.CDLL(str(built))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("could not build the batched driver calls (%s): they are made one "
                       "by one from Python", exc)
        return Library(None, f"python (build failed: {exc})")
    _declare(dll)
    return Library(dll, f"native ({built})")


def _build(compiler: str, source: bytes, name: str) -> Path:
    """Compile `source` into `name` in the cache folder unless it is there already; the
    library is written under a temporary name and renamed, so concurrent builds are
    safe."""
    for folder in _cache_folders():
        target = folder / name
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                c_file = Path(scratch) / "batch.c"
                c_file.write_bytes(source)
                built = Path(scratch) / name
                subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(built),
                                str(c_file)], check=True, capture_output=True, timeout=120)
                os.replace(built, target)
            return target
        except PermissionError:
            continue
    raise OSError("no writable cache folder")


def _cache_folders() -> list[Path]:
    if os.environ.get(CACHE_ENV):
        return [Path(os.environ[CACHE_ENV])]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(base) / "vattn", Path(tempfile.gettempdir()) / f"vattn-{os.getuid()}"]


def _declare(dll: ctypes.CDLL) -> None:
    p, size, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
    out_int, out_i64 = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int64)
    dll.vattn_map_runs.restype = ctypes.c_int
    dll.vattn_map_runs.argtypes = [p, p, p, p, size, p, p, i64, p, out_int, out_i64]
    dll.vattn_unmap_pages.restype = ctypes.c_int
    dll.vattn_unmap_pages.argtypes = [p, p, p, p, size, p, p, i64, out_int, out_i64]


class AccessDesc(ctypes.Structure):
    """``CUmemAccessDesc``: a ``CUmemLocation`` (type, id) and the access flags."""

    _fields_ = [("location_type", ctypes.c_int), ("location_id", ctypes.c_int),
                ("flags", ctypes.c_int)]


class BatchedCalls:
    """`map_runs` / `unmap_pages` of one backend through the helper.

    `entry_points` are the addresses of the backend's ``map(address, size, offset,
    handle, flags)``, ``set_access(address, size, desc, count)`` and ``unmap(address,
    size)`` functions (the CUDA driver's signatures, returning 0 on success);
    `access_desc` is the one descriptor every set-access call passes. `call_names` name
    the three calls and `code_name` a failure code in the `DriverError` raised.
    """

    def __init__(self, dll: ctypes.CDLL, entry_points: tuple[int, int, int],
                 access_desc: AccessDesc, call_names: tuple[str, str, str],
                 code_name: Callable[[int], str]) -> None:
        self._dll = dll
        self._entry = [ctypes.c_void_p(address) for address in entry_points]
        self._desc = access_desc  # kept alive: the helper reads it on every call
        self._names = dict(zip(("map", "set_access", "unmap"), call_names, strict=True))
        self._code_name = code_name

    def map_runs(self, page_bytes: int, starts: Sequence[int], counts: Sequence[int],
                 handles: Sequence[int]) -> None:
        """Map ``handles`` in order: run ``r`` is ``counts[r]`` pages from ``starts[r]``
        on, each made accessible as a whole. All or nothing."""
        assert sum(counts) == len(handles) and len(starts) == len(counts)
        starts_a, counts_a, handles_a = array("Q", starts), array("q", counts), array(
            "Q", handles)
        failed, undo = ctypes.c_int(), ctypes.c_int64()
        err = self._dll.vattn_map_runs(*self._entry, ctypes.byref(self._desc), page_bytes,
                                       _address(starts_a), _address(counts_a),
                                       len(counts_a), _address(handles_a),
                                       ctypes.byref(failed), ctypes.byref(undo))
        self._check(err, failed.value, undo.value)

    def unmap_pages(self, page_bytes: int, addresses: Sequence[int],
                    handles: Sequence[int]) -> None:
        """Unmap the page at each address (``handles`` are what is mapped there, for the
        undo). All or nothing: a failure maps back what the call had unmapped."""
        assert len(addresses) == len(handles)
        addresses_a, handles_a = array("Q", addresses), array("Q", handles)
        failed, undo = ctypes.c_int(), ctypes.c_int64()
        err = self._dll.vattn_unmap_pages(*self._entry, ctypes.byref(self._desc),
                                          page_bytes, _address(addresses_a),
                                          _address(handles_a), len(addresses_a),
                                          ctypes.byref(failed), ctypes.byref(undo))
        self._check(err, failed.value, undo.value)

    def _check(self, err: int, failed: int, undo_failures: int) -> None:
        if err == 0:
            return
        if undo_failures:
            logger.error("undo after a driver failure failed too (%d calls)", undo_failures)
        raise DriverError(self._names[_FAILED_CALL[failed]], self._code_name(err))


def _address(values: array) -> int:
    return values.buffer_info()[0]
