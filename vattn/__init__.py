"""vattn: a KV cache in contiguous virtual memory, physical pages mapped on demand.

Public API: `VirtualKVCache` (with `CacheStats`), and the errors `VattnError`,
`OutOfPages`, `OutOfSlots`, `InvalidArgument`, `Unsupported`, `DriverError`.
"""

from vattn.cache import VirtualKVCache
from vattn.errors import (
    DriverError,
    InvalidArgument,
    OutOfPages,
    OutOfSlots,
    Unsupported,
    VattnError,
)
from vattn.stats import CacheStats

__all__ = [
    "CacheStats",
    "DriverError",
    "InvalidArgument",
    "OutOfPages",
    "OutOfSlots",
    "Unsupported",
    "VattnError",
    "VirtualKVCache",
]
__version__ = "0.1.0"
