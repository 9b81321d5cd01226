"""A small continuous-batching engine that drives a HF transformers model over vattn.

transformers' own continuous batching is tied to its paged cache; this loop is the vattn
equivalent. Each iteration packs the tokens of one forward into a single row: one token
for every request that is decoding, plus at most one chunk of a prompt (chunked
prefill). `PackedCache` writes each token's K/V into its request's slot at its position,
and the ``"vattn"`` attention function runs `decode_attention` for the decodes and
`flash_attention` for the chunk, on the cache itself::

    iteration   [ r0 | r1 | r2 | r3 chunk of 64 ]   one forward, one row of 67 tokens
                  decodes      prefill chunk

Requests arrive (`Engine.add`) and finish (after ``max_new_tokens``); slots are
allocated when a request starts and freed when it ends. Pages for the next iteration
are mapped with `VirtualKVCache.step_async` while the model runs. Greedy decoding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

from vattn.errors import InvalidArgument
from vattn.integrations.transformers import SOURCE, SlotLayer, cache_for
from vattn.kernels import decode_attention, flash_attention


@dataclass(slots=True)
class Request:
    """A prompt to complete greedily."""

    prompt: list[int]
    """Token ids, at least one."""
    max_new_tokens: int
    """Tokens to generate, at least one."""
    output: list[int] = field(default_factory=list)
    """Generated tokens, filled in by the engine."""
    slot: int = -1
    """The cache slot while the request runs."""
    num_cached: int = 0
    """Tokens whose K/V are in the cache."""

    def __post_init__(self) -> None:
        if not self.prompt or self.max_new_tokens < 1:
            raise ValueError(f"a request needs a prompt and max_new_tokens >= 1, got "
                             f"{len(self.prompt)} tokens and {self.max_new_tokens}")

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


@dataclass(slots=True, frozen=True)
class Piece:
    """One request's tokens in a packed forward."""

    slot: int
    first: int
    """Position of the first token."""
    num_tokens: int


class PackedLayer(SlotLayer):
    """One layer of `PackedCache`: writes a packed forward's K/V into the slots."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`key_states` ``[1, Hkv, N, D]``: token ``i`` goes to its piece's slot and
        position. Returns the new states themselves, tagged for the attention."""
        k, v = self.owner.cache.kv(self.layer)
        slots, positions = self.owner.token_slots, self.owner.token_positions
        k[slots, positions] = key_states[0].transpose(0, 1)
        v[slots, positions] = value_states[0].transpose(0, 1)
        setattr(key_states, SOURCE, (self.owner, self.layer))
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0          # the packed attention needs no mask

    def get_seq_length(self) -> int:
        return 0                        # positions come with each forward


class PackedCache(Cache):
    """A transformers `Cache` for packed forwards over a `VirtualKVCache`: `plan` says
    which request each token belongs to, then ``model(input_ids [1, N], position_ids
    [1, N], past_key_values=cache)`` with ``attn_implementation="vattn"``."""

    def __init__(self, config: PreTrainedConfig, max_batch_size: int, max_cache_len: int,
                 device: str | torch.device, dtype: torch.dtype, **cache_kwargs: Any) -> None:
        self.cache = cache_for(config, max_batch_size, max_cache_len, device, dtype,
                               **cache_kwargs)
        self.pieces: list[Piece] = []
        self.backends: Counter[str] = Counter()
        """Attention calls by the kernel that ran."""
        super().__init__(layers=[PackedLayer(self, i)
                                 for i in range(self.cache.config.num_layers)])

    def plan(self, pieces: Sequence[Piece]) -> torch.Tensor:
        """Set the next forward's pieces, in token order; return its ``[1, N]`` position
        ids. The slots must already hold ``first + num_tokens`` tokens mapped."""
        dev = self.cache.device
        self.pieces = list(pieces)
        slots = [p.slot for p in pieces for _ in range(p.num_tokens)]
        positions = [p.first + i for p in pieces for i in range(p.num_tokens)]
        self.token_slots = torch.tensor(slots, dtype=torch.long, device=dev)
        self.token_positions = torch.tensor(positions, dtype=torch.long, device=dev)
        # Each piece's first token in the packed row.
        self.offsets = [0]
        for p in pieces:
            self.offsets.append(self.offsets[-1] + p.num_tokens)
        decodes = [i for i, p in enumerate(pieces) if p.num_tokens == 1]
        self.decode_tokens = torch.tensor([self.offsets[i] for i in decodes], dtype=torch.long,
                                          device=dev)
        self.decode_slots = torch.tensor([pieces[i].slot for i in decodes], dtype=torch.int32,
                                         device=dev)
        self.decode_lengths = torch.tensor([pieces[i].first + 1 for i in decodes],
                                           dtype=torch.int32, device=dev)
        self.chunks = [(self.offsets[i], self.offsets[i + 1],
                        torch.tensor([p.first + p.num_tokens], dtype=torch.int32, device=dev),
                        torch.tensor([p.slot], dtype=torch.int32, device=dev))
                       for i, p in enumerate(pieces) if p.num_tokens > 1]
        return self.token_positions[None]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
        """`query` ``[1, Hq, N, D]`` of the planned pieces; returns ``[1, N, Hq, D]``."""
        k, v = self.cache.kv(layer)
        q = query[0].transpose(0, 1)                     # [N, Hq, D]
        out = torch.empty_like(q)
        if len(self.decode_tokens):
            rows = self.decode_tokens
            out[rows] = decode_attention(q[rows], k, v, self.decode_lengths, self.decode_slots,
                                         softmax_scale=scaling)
            self.backends["vattn-triton"] += 1
        for first, last, lengths, slots in self.chunks:
            result = flash_attention(q[first:last][None], k, v, lengths, slots, causal=True,
                                     softmax_scale=scaling)
            out[first:last] = result.out[0]
            self.backends[result.backend] += 1
        return out[None]

    def close(self) -> None:
        self.cache.close()


class Engine:
    """Continuous batching of greedy requests over a `PackedCache`.

    Args:
        model: a HF causal LM (Llama family); its config's ``_attn_implementation``
            is ``"vattn"`` until `close`.
        max_batch_size: requests running at once (slots).
        max_cache_len: tokens a request can hold (prompt plus output).
        chunk_size: prompt tokens prefilled per iteration, beside the decodes.
        **cache_kwargs: passed to `VirtualKVCache`.

    Example::

        engine = Engine(model, max_batch_size=8, max_cache_len=4096, chunk_size=256)
        engine.add(Request(prompt_ids, max_new_tokens=64))
        while engine.busy:
            engine.step()
    """

    def __init__(self, model: PreTrainedModel, max_batch_size: int, max_cache_len: int,
                 chunk_size: int = 256, **cache_kwargs: Any) -> None:
        if chunk_size < 1:
            raise InvalidArgument(f"chunk_size must be >= 1, got {chunk_size}")
        param = next(model.parameters())
        self.model, self.chunk_size = model, chunk_size
        self.cache = PackedCache(model.config, max_batch_size, max_cache_len, param.device,
                                 param.dtype, **cache_kwargs)
        self._attn_before = model.config._attn_implementation
        model.config._attn_implementation = "vattn"
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.iterations = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        total = len(request.prompt) + request.max_new_tokens
        if total > self.cache.cache.max_context_len:
            raise InvalidArgument(f"a request of {len(request.prompt)} + "
                                  f"{request.max_new_tokens} tokens exceeds max_cache_len "
                                  f"{self.cache.cache.max_context_len}")
        self.waiting.append(request)

    def step(self) -> list[Request]:
        """One forward: every running request decodes a token, and the oldest request
        still in its prompt prefills a chunk. Returns the requests that finished.

        A request is admitted when its whole length fits the free pages; the growth of
        requests already running is not reserved, so a tight memory limit can still
        raise `OutOfPages` here (nothing changed: call again after freeing memory)."""
        vm = self.cache.cache
        while self.waiting and vm.can_allocate(self._tokens_needed(self.waiting[0])):
            request = self.waiting.pop(0)
            request.slot = vm.allocate()
            self.running.append(request)
        if self.waiting and not self.running:
            raise InvalidArgument(f"a request of {self._tokens_needed(self.waiting[0])} "
                                  f"tokens does not fit this cache even alone (memory "
                                  f"limit {vm.stats().memory_limit_bytes} bytes)")
        pieces, owners = self._schedule()
        if not pieces:
            return []
        vm.step({p.slot: p.first + p.num_tokens for p in pieces})
        # The next iteration's pages while this forward runs: a decode's next token, the
        # next chunk of a prompt.
        vm.step_async({p.slot: min(p.first + p.num_tokens + self._next_count(r, p),
                                   self._tokens_needed(r))
                       for r, p in zip(owners, pieces, strict=True)})
        ids = torch.tensor([[t for r, p in zip(owners, pieces, strict=True)
                             for t in self._tokens(r, p)]], device=vm.device)
        positions = self.cache.plan(pieces)
        with torch.no_grad():
            logits = self.model(input_ids=ids, position_ids=positions,
                                past_key_values=self.cache, use_cache=True).logits[0]
        done = []
        for request, piece, end in zip(owners, pieces, self.cache.offsets[1:], strict=True):
            request.num_cached = piece.first + piece.num_tokens
            if request.num_cached >= len(request.prompt):      # its last prompt token ran
                request.output.append(int(logits[end - 1].argmax()))
            if request.done:
                done.append(request)
        for request in done:
            self.running.remove(request)
            vm.free(request.slot)
            self.finished.append(request)
        self.iterations += 1
        return done

    def _schedule(self) -> tuple[list[Piece], list[Request]]:
        pieces, owners = [], []
        prefilled = False
        for request in self.running:
            if request.num_cached >= len(request.prompt):
                pieces.append(Piece(request.slot, request.num_cached, 1))
                owners.append(request)
            elif not prefilled:
                count = min(self.chunk_size, len(request.prompt) - request.num_cached)
                pieces.append(Piece(request.slot, request.num_cached, count))
                owners.append(request)
                prefilled = True
        return pieces, owners

    def _next_count(self, request: Request, piece: Piece) -> int:
        """Tokens the request's next forward will add, after this piece."""
        left = len(request.prompt) - piece.first - piece.num_tokens
        return min(self.chunk_size, left) if left > 0 else 1

    @staticmethod
    def _tokens_needed(request: Request) -> int:
        """The most a request holds: its prompt and every output token but the last
        (whose K/V is never written)."""
        return len(request.prompt) + request.max_new_tokens - 1

    @staticmethod
    def _tokens(request: Request, piece: Piece) -> list[int]:
        if piece.num_tokens == 1 and piece.first >= len(request.prompt):
            return [request.output[piece.first - len(request.prompt)]]
        return request.prompt[piece.first:piece.first + piece.num_tokens]

    def close(self) -> None:
        """Release the cache and give the model back its attention implementation."""
        self.model.config._attn_implementation = self._attn_before
        self.cache.close()
