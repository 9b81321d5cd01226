"""A HF transformers `Cache` backed by one `VirtualKVCache`.

``model.generate(..., past_key_values=VAttentionCache(model.config, max_batch_size=4,
max_cache_len=4096, device="cuda", dtype=torch.bfloat16))`` runs Llama-family models
(transformers 5.x) with their K/V in vattn's virtual tensors. Each batch row gets a slot;
every layer writes its new tokens at its own offset (transformers 5 calls
``update(k, v, layer_idx)`` without cache positions) and returns ``[B, Hkv, L, D]``
views of the slots, with no copy where the rows' slots are ``0..B-1`` in order (a
fresh cache). Pages are mapped as the first layer of a forward sees the new length.

`reset`, `crop` and `reorder_cache` (beam search) are implemented: a reorder that
permutes the rows permutes their slots (no data moves), any other copies the K/V of the
rows that take another row's into their own slots. Operations that would reassign the
buffers are refused with `vattn.errors.Unsupported` (a `NotImplementedError`):
offloading, and growing or shrinking the batch in place.

Importing this module also registers the attention function ``"vattn"`` (with its mask
function: without one transformers passes no mask and padding would be ignored). With
``attn_implementation="vattn"`` decode runs `vattn.kernels.decode_attention` on the
cache itself (left padding as per-row start offsets), and a prefill chunk
`vattn.kernels.flash_attention` (SDPA with the mask where rows are padded).
`VAttentionCache.backends` counts which kernel ran.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vattn.cache import VirtualKVCache
from vattn.errors import InvalidArgument, Unsupported
from vattn.kernels import decode_attention, flash_attention

SOURCE = "_vattn_source"
"""The attribute naming the (cache, layer) a returned K/V view comes from."""


def cache_for(config: PreTrainedConfig, max_batch_size: int, max_cache_len: int,
              device: str | torch.device, dtype: torch.dtype,
              **cache_kwargs: Any) -> VirtualKVCache:
    """A `VirtualKVCache` shaped for a model's config (``num_hidden_layers``,
    ``num_key_value_heads``, ``head_dim`` or ``hidden_size // num_attention_heads``)."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    return VirtualKVCache(
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        dtype=dtype, max_batch_size=max_batch_size, max_context_len=max_cache_len,
        device=device, **cache_kwargs)


class SlotLayer(CacheLayerMixin):
    """What the layers of vattn's transformers caches share: one model layer of the
    owner's `VirtualKVCache` (``owner.cache``), nothing allocated lazily."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: Any, layer: int) -> None:
        super().__init__()
        self.owner, self.layer = owner, layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def get_max_length(self) -> int:
        return int(self.owner.cache.max_context_len)


class VAttentionLayer(SlotLayer):
    """One model layer's view of the shared `VirtualKVCache`."""

    is_croppable = True

    def __init__(self, owner: VAttentionCache, layer: int) -> None:
        super().__init__(owner, layer)
        self.num_tokens = 0
        """Tokens this layer has written in every row (rows share one length)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, Hkv, T, D]`` new K/V after this layer's tokens; return the rows'
        ``[B, Hkv, L, D]`` K/V so far."""
        first, count = self.num_tokens, key_states.shape[-2]
        self.owner.reserve(key_states, first + count)
        k, v = self.owner.cache.kv(self.layer)
        rows = self.owner.rows
        if self.owner.in_order:
            k[:len(rows), first:first + count] = key_states.transpose(1, 2)
            v[:len(rows), first:first + count] = value_states.transpose(1, 2)
        else:
            index = self.owner.row_slots
            k[index, first:first + count] = key_states.transpose(1, 2)
            v[index, first:first + count] = value_states.transpose(1, 2)
        self.num_tokens = first + count
        self.is_initialized = True
        keys, values = self.owner.view(k, self.num_tokens), self.owner.view(v, self.num_tokens)
        setattr(keys, SOURCE, (self.owner, self.layer))       # for the "vattn" attention
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_tokens

    def reset(self) -> None:
        self.num_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Done once for all layers by `VAttentionCache.reorder_cache`."""

    def crop(self, tokens_to_remove: int) -> None:
        """As transformers' layers: a negative value drops that many tokens, 0 none, a
        positive one (the older form) keeps at most that many."""
        tokens_to_remove = int(tokens_to_remove)    # generate may pass a 0-d tensor
        if tokens_to_remove == 0:       # generate's assisted steps pass -0
            return
        keep = (self.num_tokens + tokens_to_remove if tokens_to_remove < 0
                else min(tokens_to_remove, self.num_tokens))
        self.num_tokens = max(0, keep)

    def offload(self) -> None:
        raise Unsupported("VAttentionCache keeps K/V in mapped device pages; "
                                  "offloading is not supported")

    def prefetch(self) -> None:
        self.offload()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise Unsupported("VAttentionCache cannot expand its batch in place; "
                                  "allocate the expanded batch up front instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise Unsupported("VAttentionCache cannot drop rows in place; free their "
                                  "slots with a new cache per batch instead")


class VAttentionCache(Cache):
    """A transformers `Cache` whose K/V live in one `VirtualKVCache`.

    Args:
        config: the model's config (``num_hidden_layers``, ``num_key_value_heads``,
            ``head_dim`` or ``hidden_size // num_attention_heads``).
        max_batch_size: rows it can hold (slots).
        max_cache_len: tokens a row can hold (prompt, padding and new tokens).
        device, dtype: of the model's K/V.
        **cache_kwargs: passed to `VirtualKVCache` (``layout``, ``page_size_bytes``,
            ``memory_limit``, ``debug_fill_nan``, ...).

    Example::

        cache = VAttentionCache(model.config, max_batch_size=2, max_cache_len=2048,
                                device="cuda", dtype=torch.bfloat16)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        cache.close()
    """

    def __init__(self, config: PreTrainedConfig, max_batch_size: int, max_cache_len: int,
                 device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                 **cache_kwargs: Any) -> None:
        self.cache = cache_for(config, max_batch_size, max_cache_len, device, dtype,
                               **cache_kwargs)
        self.rows: list[int] = []
        """The slot of each batch row."""
        self.row_slots = torch.empty(0, dtype=torch.int32, device=self.cache.device)
        self.in_order = True
        self.num_tokens_mapped = 0
        """The target every row's slot was last stepped to."""
        self.backends: Counter[str] = Counter()
        """Calls of the ``"vattn"`` attention function, by the kernel that ran."""
        self.slot_layers = [VAttentionLayer(self, i) for i in range(self.cache.config.num_layers)]
        super().__init__(layers=list(self.slot_layers))

    # The rows, their slots and their pages.

    def reserve(self, key_states: torch.Tensor, num_tokens: int) -> None:
        """Give every row a slot (the first update) and map ``num_tokens`` for each."""
        batch = key_states.shape[0]
        if key_states.dtype != self.cache.config.dtype:
            raise InvalidArgument(f"the model's K/V are {key_states.dtype}, the cache holds "
                                  f"{self.cache.config.dtype}")
        if num_tokens > self.cache.max_context_len:
            raise InvalidArgument(f"{num_tokens} tokens a row exceed max_cache_len "
                                  f"{self.cache.max_context_len}")
        if not self.rows:
            if batch > self.cache.config.max_batch_size:
                raise InvalidArgument(f"the forward has {batch} rows, the cache holds at "
                                      f"most {self.cache.config.max_batch_size} "
                                      f"(max_batch_size)")
            slots = []
            try:
                for _ in range(batch):
                    slots.append(self.cache.allocate())
            except BaseException:
                for slot in slots:
                    self.cache.free(slot)
                raise
            self._set_rows(slots)
        elif batch != len(self.rows):
            raise InvalidArgument(f"this cache holds {len(self.rows)} rows, the forward has "
                                  f"{batch}; reset() it for a new batch")
        if num_tokens > self.num_tokens_mapped:
            self.cache.step(dict.fromkeys(self.rows, num_tokens))
            self.num_tokens_mapped = num_tokens

    def view(self, t: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The rows' first `num_tokens` of a ``[slots, Lmax, Hkv, D]`` tensor, as
        ``[B, Hkv, L, D]``: a view when the rows hold slots ``0..B-1`` in order."""
        if self.in_order:
            return t[:len(self.rows), :num_tokens].transpose(1, 2)
        return t[self.row_slots, :num_tokens].transpose(1, 2)

    def _set_rows(self, slots: list[int]) -> None:
        self.rows = slots
        self.row_slots = torch.tensor(slots, dtype=torch.int32, device=self.cache.device)
        self.in_order = slots == list(range(len(slots)))

    # transformers' Cache API.

    def reset(self) -> None:
        """Free every row's slot; the next forward starts a new batch."""
        for slot in self.rows:
            self.cache.free(slot)
        self._set_rows([])
        self.num_tokens_mapped = 0
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` takes row ``beam_idx[i]``'s K/V (beam search). A permutation of the
        rows permutes their slots (no data moves); otherwise the rows that take another
        row's K/V get a copy of its tokens in their own slots, in every layer."""
        order = [int(i) for i in beam_idx.tolist()]
        if not self.rows:           # nothing written yet, as transformers' own layers
            return
        if len(order) != len(self.rows) or not all(0 <= i < len(self.rows) for i in order):
            raise InvalidArgument(f"beam_idx must name one of the {len(self.rows)} rows for "
                                  f"each row, got {order}")
        if sorted(order) == list(range(len(self.rows))):
            self._set_rows([self.rows[i] for i in order])
            return
        moved = [row for row, source in enumerate(order) if source != row]
        device = self.cache.device
        dst = torch.tensor([self.rows[row] for row in moved], device=device)
        src = torch.tensor([self.rows[order[row]] for row in moved], device=device)
        for layer, state in enumerate(self.slot_layers):
            n = state.num_tokens
            if n:
                for t in self.cache.kv(layer):
                    t[dst, :n] = t[src, :n]         # the source gathered first

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
        """The ``"vattn"`` attention of `query` ``[B, Hq, Lq, D]`` over the rows' slots;
        `attention_mask` is `sdpa_mask`'s boolean ``[B, 1, Lq, L]`` (None: no padding).
        Padding must be on the left (as `generate` pads decoder-only models)."""
        k, v = self.cache.kv(layer)
        batch, _, num_q, _ = query.shape
        lengths = torch.full((batch,), key.shape[-2], dtype=torch.int32, device=query.device)
        if num_q == 1:
            # Left padding: a row attends from its first unmasked token.
            starts = (None if attention_mask is None else
                      attention_mask[:, 0, -1].int().argmax(-1).int())
            out = decode_attention(query[:, :, 0], k, v, lengths, self.row_slots, starts,
                                   softmax_scale=scaling)
            self.backends["vattn-triton"] += 1
            return out[:, None]
        if attention_mask is None:
            result = flash_attention(query.transpose(1, 2), k, v, lengths, self.row_slots,
                                     causal=True, softmax_scale=scaling)
            self.backends[result.backend] += 1
            return result.out
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
        self.backends["sdpa-masked"] += 1
        return out.transpose(1, 2)

    def close(self) -> None:
        """Release the virtual cache (its views dangle afterwards)."""
        self.cache.close()

    def __enter__(self) -> VAttentionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def vattn_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention function ``"vattn"``: `query` ``[B, Hq, Lq, D]``, `key` /
    `value` what the vattn cache's `update` returned; the cache that returned them
    computes the attention on its own tensors (`VAttentionCache.attend`,
    `vattn.integrations.engine.PackedCache.attend`). Returns ``[B, Lq, Hq, D]``."""
    source = getattr(key, SOURCE, None)
    if source is None:
        raise InvalidArgument("attn_implementation='vattn' needs "
                              "past_key_values=VAttentionCache(...)")
    if dropout:
        raise InvalidArgument(f"the vattn attention function has no dropout, got {dropout}")
    owner, layer = source
    return owner.attend(layer, query, key, value, attention_mask, scaling), None


AttentionInterface.register("vattn", vattn_attention)
AttentionMaskInterface.register("vattn", sdpa_mask)
