"""Pure layout arithmetic: where every page of every slot lives in the reservation.

No torch, no driver: integers in, integers out.

The reservation of one cache, in bytes::

    | anchor page | tensor 0 | tensor 1 | ... | tensor T-1 |
                  |<- max_batch_size * slot_stride_bytes ->|
                  | slot 0 | slot 1 | ... | slot B-1 |
                           |<- slot_stride_bytes = pages_per_slot * page ->|

``per_layer``: T = 2 * num_layers tensors, tensor ``2 * layer + kv`` is
``[B, Lmax, Hkv, D]``. ``token_major``: T = 2 tensors ``[B, Lmax, num_layers, Hkv, D]``
(kv = 0 is K, 1 is V). The anchor page stays mapped for the cache's lifetime so that
the first byte of the exported range is always backed (DESIGN.md, Views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

LayoutName = Literal["per_layer", "token_major"]
LAYOUTS: tuple[LayoutName, ...] = ("per_layer", "token_major")


@dataclass(slots=True, frozen=True)
class Layout:
    """Shape of the virtual KV cache; every derived quantity is a property."""

    num_layers: int
    """Transformer layers, each with one K and one V."""
    num_kv_heads: int
    """KV heads per layer (Hkv)."""
    head_dim: int
    """Elements per head (D)."""
    dtype_bytes: int
    """Bytes per element (2 for fp16/bf16)."""
    max_batch_size: int
    """Number of slots (B)."""
    requested_context_len: int
    """Tokens a slot must hold at least; padded up to `max_context_len`."""
    page_size_bytes: int
    """Physical page size: the unit of mapping."""
    kind: LayoutName = "per_layer"
    """``per_layer`` (vAttention's) or ``token_major`` (all layers of a token together)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype_bytes",
                     "max_batch_size", "requested_context_len", "page_size_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.kind!r}")

    @property
    def num_tensors(self) -> int:
        """Virtual tensors in the reservation (each K and each V is one)."""
        return 2 * self.num_layers if self.kind == "per_layer" else 2

    @property
    def token_bytes(self) -> int:
        """Bytes one token occupies in one tensor (its sequence stride)."""
        per_head = self.num_kv_heads * self.head_dim * self.dtype_bytes
        return per_head if self.kind == "per_layer" else per_head * self.num_layers

    @property
    def max_context_len(self) -> int:
        """The requested context rounded up so that a slot is a whole number of pages."""
        step = self.page_size_bytes // math.gcd(self.page_size_bytes, self.token_bytes)
        return -(-self.requested_context_len // step) * step

    @property
    def slot_stride_bytes(self) -> int:
        """Bytes between slot b and slot b + 1 (== max_context_len * token_bytes)."""
        return self.max_context_len * self.token_bytes

    @property
    def pages_per_slot(self) -> int:
        """Pages that back a full slot in one tensor."""
        return self.slot_stride_bytes // self.page_size_bytes

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one virtual tensor (all slots)."""
        return self.max_batch_size * self.slot_stride_bytes

    @property
    def anchor_bytes(self) -> int:
        """The always-mapped page at the start of the reservation."""
        return self.page_size_bytes

    @property
    def reservation_bytes(self) -> int:
        """Virtual address space the cache reserves."""
        return self.anchor_bytes + self.num_tensors * self.tensor_bytes

    def tensor_offset(self, tensor: int) -> int:
        """Byte offset of virtual tensor `tensor` in the reservation."""
        return self.anchor_bytes + tensor * self.tensor_bytes

    def page_offset(self, tensor: int, slot: int, page: int) -> int:
        """Byte offset of page `page` of `slot` in virtual tensor `tensor`."""
        return (self.tensor_offset(tensor) + slot * self.slot_stride_bytes
                + page * self.page_size_bytes)

    def pages_for_tokens(self, num_tokens: int, read_slack: int = 0) -> int:
        """Pages per tensor a slot needs to hold `num_tokens` plus `read_slack` tokens
        (capped at the slot)."""
        covered = min(num_tokens + read_slack, self.max_context_len)
        return -(-covered * self.token_bytes // self.page_size_bytes)

    def tokens_for_pages(self, num_pages: int) -> int:
        """Whole tokens that `num_pages` pages per tensor hold."""
        return num_pages * self.page_size_bytes // self.token_bytes
