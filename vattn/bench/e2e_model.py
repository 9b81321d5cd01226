"""The model code `vattn bench e2e` runs, the same for every KV backend: a Llama-shaped
decoder with random weights (RMSNorm, fused QKV, rotary, GQA, SwiGLU), one decode step
at a time, and the KV backends it is compared on.

Backends (all write the step's K/V, then attend over every row's tokens):

- ``vattn``: a `VirtualKVCache`; `append_kv` + `decode_attention` on its views; pages
  for the coming steps mapped with `step_async` before each step;
- ``static``: every row's ``Lmax`` preallocated (torch tensors), the same kernels;
- ``paged-<block>``: blocks of a pool behind a block table kept incrementally (a row
  crossing a block gets one new entry, as vLLM v1 does), the paged twin of our kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vattn.cache import VirtualKVCache
from vattn.kernels import append_kv, decode_attention, paged_decode_attention
from vattn.layout import LayoutName


@dataclass(slots=True, frozen=True)
class Shape:
    """A decoder's sizes."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int


MODELS = {
    "llama-3-8b": Shape(32, 4096, 32, 8, 128, 14336, 128256),
    "yi-6b": Shape(32, 4096, 32, 4, 128, 11008, 64000),
    "tiny": Shape(2, 64, 4, 2, 16, 96, 101),
}


class Decoder:
    """Random weights of `shape` (scaled so activations stay finite) and one decode step."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        s, self.shape = shape, shape

        def weight(*size: int) -> torch.Tensor:
            return (torch.randn(*size, device=device, generator=gen, dtype=torch.float32)
                    * size[0] ** -0.5).to(dtype)

        qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        self.embed = weight(s.vocab, s.hidden) * s.vocab ** 0.5
        self.layers = [(weight(s.hidden, qkv), weight(s.num_heads * s.head_dim, s.hidden),
                        weight(s.hidden, 2 * s.ffn), weight(s.ffn, s.hidden))
                       for _ in range(s.num_layers)]
        self.lm_head = weight(s.hidden, s.vocab)
        inv = 1.0 / 10000 ** (torch.arange(0, s.head_dim, 2, device=device) / s.head_dim)
        self.inv_freq = inv.float()

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, kv: Any) -> torch.Tensor:
        """Tokens ``[B]`` at `positions` ``[B]`` (int32, the rows' lengths before the
        step) through every layer; returns the greedy next tokens ``[B]``."""
        s = self.shape
        x = self.embed[tokens]
        angles = positions.float()[:, None] * self.inv_freq[None]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        for layer, (w_qkv, w_o, w_up, w_down) in enumerate(self.layers):
            qkv = _norm(x) @ w_qkv
            q, k, v = qkv.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                                 s.num_kv_heads * s.head_dim], dim=-1)
            q = _rotate(q.view(-1, s.num_heads, s.head_dim), cos, sin)
            k = _rotate(k.view(-1, s.num_kv_heads, s.head_dim), cos, sin)
            kv.append(layer, k, v.reshape(k.shape), positions)
            x = x + kv.attend(layer, q, positions).flatten(1) @ w_o
            gate, up = (_norm(x) @ w_up).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ w_down
        return (_norm(x) @ self.lm_head).argmax(-1)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    a, b = x[..., :half].float(), x[..., half:].float()
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1).to(x.dtype)


class ContiguousKV:
    """``static`` (preallocated tensors) or ``vattn`` (a `VirtualKVCache`): both hand our
    kernels ``[B, Lmax, Hkv, D]`` views."""

    def __init__(self, name: str, shape: Shape, batch: int, max_len: int,
                 device: torch.device, dtype: torch.dtype, layout: LayoutName = "per_layer",
                 **cache_kwargs: Any) -> None:
        self.name, self.cache = name, None
        if name == "vattn":
            self.cache = VirtualKVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim,
                                        dtype, batch, max_len, device, layout=layout,
                                        **cache_kwargs)
            for _ in range(batch):
                self.cache.allocate()
            self.tensors = [self.cache.kv(i) for i in range(shape.num_layers)]
        else:
            full = torch.empty(shape.num_layers, 2, batch, max_len, shape.num_kv_heads,
                               shape.head_dim, device=device, dtype=dtype)
            self.tensors = [(full[i, 0], full[i, 1]) for i in range(shape.num_layers)]

    def prepare(self, num_tokens: int) -> None:
        """Outside the timed steps: map (vattn) what rows of `num_tokens` need."""
        if self.cache is not None:
            self.cache.step(dict.fromkeys(range(self.tensors[0][0].shape[0]), num_tokens))

    def before_step(self, num_tokens: int) -> None:
        """Host work before a step that leaves rows at `num_tokens`: vattn maps the next
        step's pages in the background (joining the previous job)."""
        if self.cache is not None:
            self.cache.step_async(dict.fromkeys(range(self.tensors[0][0].shape[0]),
                                                num_tokens + 1))

    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kc, vc = self.tensors[layer]
        kc[:, :k.shape[1]] = k
        vc[:, :v.shape[1]] = v

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> None:
        kc, vc = self.tensors[layer]
        append_kv(kc, vc, k[:, None], v[:, None], positions)

    def attend(self, layer: int, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kc, vc = self.tensors[layer]
        return decode_attention(q, kc, vc, positions + 1)

    def held_bytes(self) -> int:
        """K/V memory held: vattn's mapped pages, or the whole static reservation."""
        if self.cache is not None:
            stats = self.cache.stats()
            return stats.pages_mapped * stats.page_size_bytes
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.tensors)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


class PagedKV:
    """``paged-<block>``: a block pool per layer behind one block table ``[B, max
    blocks]``, extended on the host as rows cross blocks (one entry a crossing)."""

    def __init__(self, block: int, shape: Shape, batch: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.name, self.block = f"paged-{block}", block
        per_row = -(-max_len // block)
        self.pool = [torch.empty(2, batch * per_row, block, shape.num_kv_heads,
                                 shape.head_dim, device=device, dtype=dtype)
                     for _ in range(shape.num_layers)]
        self.free = list(range(batch * per_row - 1, -1, -1))
        self.table = torch.zeros(batch, per_row, dtype=torch.int32, device=device)
        self.num_blocks = [0] * batch
        self.rows = torch.arange(batch, device=device)

    def prepare(self, num_tokens: int) -> None:
        self.before_step(num_tokens - 1)

    def before_step(self, num_tokens: int) -> None:
        """Blocks for every row to hold `num_tokens` + 1; only new entries are copied."""
        need = -(-(num_tokens + 1) // self.block)
        new: list[tuple[int, int, int]] = []
        for row, have in enumerate(self.num_blocks):
            new += [(row, j, self.free.pop()) for j in range(have, need)]
            self.num_blocks[row] = max(have, need)
        if new:
            # One host-to-device copy of (flat index, block id) pairs, from pinned memory
            # and without a stream sync, as a serving engine ships its table deltas.
            per_row = self.table.shape[1]
            pairs = torch.tensor([(r * per_row + j, i) for r, j, i in new], dtype=torch.int64)
            if self.table.is_cuda:
                pairs = pairs.pin_memory()
            pairs = pairs.to(self.table.device, non_blocking=True)
            self.table.view(-1)[pairs[:, 0]] = pairs[:, 1].to(torch.int32)

    def fill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows' first tokens ``[B, n, Hkv, D]`` into their blocks (`prepare` first)."""
        batch, n = k.shape[:2]
        count = -(-n // self.block)
        ids = self.table[:, :count].flatten().long()
        for i, t in enumerate((k, v)):
            padded = torch.zeros(batch, count * self.block, *t.shape[2:], dtype=t.dtype,
                                 device=t.device)
            padded[:, :n] = t
            self.pool[layer][i, ids] = padded.view(batch * count, self.block, *t.shape[2:])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> None:
        pos = positions.long()
        blocks = self.table[self.rows, pos // self.block].long()
        self.pool[layer][0, blocks, pos % self.block] = k
        self.pool[layer][1, blocks, pos % self.block] = v

    def attend(self, layer: int, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kb, vb = self.pool[layer]
        return paged_decode_attention(q, kb, vb, self.table, positions + 1)

    def held_bytes(self) -> int:
        """K/V memory held: the whole block pool, preallocated as a paged server does."""
        return sum(p.numel() * p.element_size() for p in self.pool)

    def close(self) -> None:
        self.pool.clear()
