"""`CacheConfig`: every argument of a `VirtualKVCache`, validated before anything is made."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.errors import InvalidArgument
from vattn.layout import LAYOUTS, Layout, LayoutName

MiB = 1 << 20
DEFAULT_PAGE_SIZE = 2 * MiB
DEFAULT_READ_SLACK = 256
"""Tokens kept mapped past every length: covers the widest tile a shipped kernel loads
past ``seqused_k`` (FlashAttention-3 reads up to 176)."""
DEFAULT_MEMORY_FRACTION = 0.9
"""Share of the device's free memory a cache may map when no `memory_limit` is given."""
DEFAULT_MIN_LOOKAHEAD = 256
"""Smallest default look-ahead, in tokens (see `CacheConfig.lookahead_tokens`)."""


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgument(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"`` or ``"cuda[:N]"`` as a torch device with its index filled in."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise InvalidArgument(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if not torch.cuda.is_available():
        raise InvalidArgument(f"device {device!r} asked for, but torch sees no CUDA device")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise InvalidArgument(
            f"device index must be in [0, {torch.cuda.device_count()}), got {index}")
    return torch.device("cuda", index)


@dataclass(slots=True, frozen=True)
class CacheConfig:
    """Shape and policy of one virtual KV cache."""

    num_layers: int
    """Transformer layers."""
    num_kv_heads: int
    """KV heads per layer."""
    head_dim: int
    """Elements per head."""
    dtype: torch.dtype
    """Element type of K and V (a floating type: fp16, bf16, fp32, fp8)."""
    max_batch_size: int
    """Slots: requests that can be active at once."""
    max_context_len: int
    """Tokens one slot can hold (padded up to whole pages, see `VirtualKVCache`)."""
    device: torch.device
    """``cpu`` (host backend) or ``cuda:N``."""
    layout: LayoutName = "token_major"
    """``token_major`` (default: one K and one V tensor for all layers, so a 2 MiB page
    holds a few tokens of every layer and a request wastes at most a page a tensor) or
    ``per_layer`` (vAttention's: a K and a V tensor per layer). docs/benchmarks.md has
    the measurements behind the default."""
    page_size_bytes: int = DEFAULT_PAGE_SIZE
    """Physical page size, a multiple of the backend's granularity."""
    memory_limit: int | None = None
    """Bytes of physical memory the cache may create; default a fraction of free memory."""
    read_slack: int = DEFAULT_READ_SLACK
    """Tokens kept mapped past each slot's target, for kernels that read whole tiles:
    FlashAttention-3 reads up to 176 past a length, `pod_attention` none (up to 63 with
    ``PodTiling(tma_shift=False)``), `decode_attention` and its paged twin none."""
    lookahead_tokens: int | None = None
    """Look-ahead: once a slot's target comes within this many tokens of its mapped
    capacity (less the read slack), the slot grows ahead of need to hold twice this many
    tokens past the target. The low and high water marks make the mapping come in
    few, large jobs: each job has a fixed cost on the serving loop. Default: a quarter
    of the tokens a page holds, at least 256 (256 for Llama-3-8B in both layouts: one
    page row every 1024 steps with ``per_layer``, 8-9 pages a tensor every 256 steps
    with ``token_major``)."""
    lookahead_pages_per_step: int = 64
    """Physical pages one step may map ahead of need (about 2 ms of driver work), so
    that many slots crossing a page boundary together are mapped over several steps."""
    debug_fill_nan: bool = False
    """Fill newly mapped pages with NaN, so a kernel reading past a length is caught."""
    pending_timeout_s: float = 5.0
    """How long a step waits for pages still fenced behind in-flight kernels."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_batch_size",
                     "max_context_len", "page_size_bytes"):
            _check_int(name, getattr(self, name), 1)
        _check_int("read_slack", self.read_slack, 0)
        if self.lookahead_tokens is not None:
            _check_int("lookahead_tokens", self.lookahead_tokens, 0)
        _check_int("lookahead_pages_per_step", self.lookahead_pages_per_step, 0)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise InvalidArgument(f"dtype must be a floating torch.dtype, got {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise InvalidArgument(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.memory_limit is not None:
            _check_int("memory_limit", self.memory_limit, self.page_size_bytes)
        if not isinstance(self.debug_fill_nan, bool):
            raise InvalidArgument(f"debug_fill_nan must be a bool, got {self.debug_fill_nan!r}")
        if not self.pending_timeout_s >= 0:
            raise InvalidArgument(
                f"pending_timeout_s must be >= 0, got {self.pending_timeout_s!r}")

    @property
    def lookahead(self) -> int:
        """`lookahead_tokens`, its default resolved."""
        if self.lookahead_tokens is not None:
            return self.lookahead_tokens
        return max(DEFAULT_MIN_LOOKAHEAD, self.make_layout().tokens_for_pages(1) // 4)

    def make_layout(self) -> Layout:
        """The pure arithmetic of this configuration."""
        return Layout(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype.itemsize,
                      self.max_batch_size, self.max_context_len, self.page_size_bytes,
                      self.layout)
