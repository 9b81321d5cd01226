"""Host virtual memory through libc: the same protocol as the CUDA backend, on Linux.

A reservation is an anonymous ``PROT_NONE`` mapping. Physical pages are extents of one
``memfd`` (a handle is the extent's byte offset), allocated with ``fallocate`` and given
back with ``fallocate(PUNCH_HOLE)``. Mapping places an extent ``MAP_FIXED|MAP_SHARED``
into the reservation (``MADV_DONTFORK``, so a forked child cannot touch the KV cache);
unmapping puts a ``PROT_NONE`` reservation back in its place. It is real virtual
memory, so the cache runs the same code path end to end on a machine without a GPU.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading

from vattn.errors import DriverError, OutOfPages

PROT_NONE, PROT_READ, PROT_WRITE = 0x0, 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x1, 0x2, 0x10, 0x20, 0x4000
MADV_DONTFORK = 10
MFD_CLOEXEC = 0x1
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2
MAP_FAILED = ctypes.c_void_p(-1).value
HOST_GRANULARITY = 4096
"""The host maps at the kernel's page size; the cache still defaults to 2 MiB pages."""

_OUT_OF_MEMORY = (errno.ENOMEM, errno.ENOSPC)


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.memfd_create.argtypes = [ctypes.c_char_p, ctypes.c_uint]
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    libc.ftruncate.argtypes = [ctypes.c_int, ctypes.c_long]
    return libc


def _meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise DriverError("read /proc/meminfo", "ENOENT", f"no {key} line")


class HostVirtualMemory:
    """The `VirtualMemory` protocol on Linux host memory."""

    name = "host"
    device = "cpu"
    granularity = HOST_GRANULARITY

    def __init__(self) -> None:
        if platform.system() != "Linux":
            raise DriverError("HostVirtualMemory", "ENOSYS", "the host backend needs Linux")
        self._fd = -1
        self._sizes: dict[int, int] = {}
        self._libc = _load_libc()
        self._lock = threading.Lock()
        self._fd = self._check_int("memfd_create", self._libc.memfd_create(b"vattn", MFD_CLOEXEC))
        self._file_bytes = 0
        self._free_extents: dict[int, list[int]] = {}

    def describe(self) -> dict[str, str]:
        return {"backend": "host", "device": platform.processor() or platform.machine(),
                "driver": f"Linux {platform.release()} (mmap + memfd)"}

    def memory_info(self) -> tuple[int, int]:
        return _meminfo_bytes("MemAvailable"), _meminfo_bytes("MemTotal")

    def reserve(self, size_bytes: int, alignment_bytes: int) -> int:
        alignment = max(alignment_bytes, HOST_GRANULARITY)
        span = size_bytes + alignment
        start = self._mmap("mmap(reserve)", None, span, PROT_NONE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        aligned = -(-start // alignment) * alignment
        if aligned > start:
            self._munmap(start, aligned - start)
        tail = start + span - (aligned + size_bytes)
        if tail:
            self._munmap(aligned + size_bytes, tail)
        return aligned

    def free(self, address: int, size_bytes: int) -> None:
        self._munmap(address, size_bytes)

    def create(self, size_bytes: int) -> int:
        with self._lock:
            extents = self._free_extents.setdefault(size_bytes, [])
            offset = extents.pop() if extents else self._file_bytes
            if offset == self._file_bytes:
                self._file_bytes += size_bytes
        if self._libc.fallocate(self._fd, 0, offset, size_bytes) != 0:
            code = ctypes.get_errno()
            self._forget_extent(offset, size_bytes)
            if code in _OUT_OF_MEMORY:
                raise OutOfPages(1, 0, "host memory")
            raise DriverError("fallocate", errno.errorcode.get(code, str(code)))
        self._sizes[offset] = size_bytes
        return offset

    def release(self, handle: int) -> None:
        if handle not in self._sizes:
            raise DriverError("fallocate(PUNCH_HOLE)", "EINVAL", f"no page {handle}")
        size = self._sizes.pop(handle)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if self._libc.fallocate(self._fd, mode, handle, size) != 0:
            self._sizes[handle] = size
            code = ctypes.get_errno()
            raise DriverError("fallocate(PUNCH_HOLE)", errno.errorcode.get(code, str(code)))
        self._forget_extent(handle, size)

    def map(self, address: int, size_bytes: int, handle: int) -> None:
        if self._sizes.get(handle) != size_bytes:
            raise DriverError("mmap(map)", "EINVAL",
                              f"handle {handle} is {self._sizes.get(handle)} bytes, "
                              f"asked to map {size_bytes}")
        self._mmap("mmap(map)", address, size_bytes, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_FIXED, self._fd, handle)
        if self._libc.madvise(address, size_bytes, MADV_DONTFORK) != 0:
            code = ctypes.get_errno()
            self.unmap(address, size_bytes)
            raise DriverError("madvise(DONTFORK)", errno.errorcode.get(code, str(code)))

    def set_access(self, address: int, size_bytes: int) -> None:
        """Host pages are mapped read-write already."""

    def unmap(self, address: int, size_bytes: int) -> None:
        self._mmap("mmap(unmap)", address, size_bytes, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0)

    def synchronize(self) -> None:
        """Host work is synchronous."""

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def _forget_extent(self, offset: int, size_bytes: int) -> None:
        with self._lock:
            self._free_extents.setdefault(size_bytes, []).append(offset)

    def _mmap(self, call: str, address: int | None, size: int, prot: int, flags: int,
              fd: int, offset: int) -> int:
        result = self._libc.mmap(address, size, prot, flags, fd, offset)
        if result is None or result == MAP_FAILED:
            code = ctypes.get_errno()
            if code == errno.ENOMEM:
                # Too many mappings (vm.max_map_count) or no address space left.
                raise OutOfPages(1, 0, "host mappings")
            raise DriverError(call, errno.errorcode.get(code, str(code)))
        return int(result)

    def _munmap(self, address: int, size: int) -> None:
        if self._libc.munmap(address, size) != 0:
            code = ctypes.get_errno()
            raise DriverError("munmap", errno.errorcode.get(code, str(code)))

    @staticmethod
    def _check_int(call: str, result: int) -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise DriverError(call, errno.errorcode.get(code, str(code)))
        return result
