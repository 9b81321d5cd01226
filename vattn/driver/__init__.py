"""Virtual-memory backends: `cuda` (CUDA driver VMM API) and `host` (Linux mmap/memfd)."""

from __future__ import annotations

import torch

from vattn.driver.base import VirtualMemory
from vattn.driver.host import HostVirtualMemory

__all__ = ["HostVirtualMemory", "VirtualMemory", "open_backend"]


def open_backend(device: torch.device) -> VirtualMemory:
    """The backend for a resolved torch device (``cpu`` or ``cuda:N``)."""
    if device.type == "cuda":
        from vattn.driver.cuda import CudaVirtualMemory

        # torch creates the primary context the backend shares.
        torch.cuda.init()
        return CudaVirtualMemory(device.index or 0)
    return HostVirtualMemory()
