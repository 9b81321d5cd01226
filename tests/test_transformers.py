"""`VAttentionCache` in HF transformers on the CPU (host backend, float32): `generate`
gives exactly the tokens of `DynamicCache`, the K/V it holds are the same, and the
operations it refuses say so."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vattn import InvalidArgument  # noqa: E402
from vattn.errors import Unsupported  # noqa: E402
from vattn.integrations.transformers import VAttentionCache  # noqa: E402
from vattn.layout import LAYOUTS  # noqa: E402

VOCAB = 97


def tiny_llama(attn: str) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = attn
    return transformers.LlamaForCausalLM(config).eval()


def vattn_cache(model: transformers.PreTrainedModel, batch: int, layout: str = "token_major",
                max_cache_len: int = 200) -> VAttentionCache:
    return VAttentionCache(model.config, max_batch_size=batch, max_cache_len=max_cache_len,
                           device="cpu", dtype=torch.float32, layout=layout,
                           page_size_bytes=64 << 10, debug_fill_nan=True)


def left_padded(lengths: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :width - n] = 0
        ids[row, :width - n] = 0
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_matches_dynamic_cache(attn: str, layout: str) -> None:
    torch.manual_seed(3)
    model = tiny_llama(attn)
    gen = torch.Generator().manual_seed(11)
    ids, mask = left_padded([5, 17, 1], gen)
    ref_cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                             past_key_values=ref_cache)
        with vattn_cache(model, 3, layout) as cache:
            got = model.generate(ids, attention_mask=mask, max_new_tokens=20,
                                 do_sample=False, past_key_values=cache)
            assert torch.equal(got, ref)
            # The K/V transformers attended over are the ones vattn holds.
            assert cache.get_seq_length() == ref_cache.get_seq_length() == 17 + 19
            for layer in range(3):
                k, v = cache.cache.kv(layer)
                n = cache.get_seq_length()
                assert torch.equal(k[:3, :n].transpose(1, 2), ref_cache.layers[layer].keys)
                assert torch.equal(v[:3, :n].transpose(1, 2), ref_cache.layers[layer].values)
            assert cache.cache.stats().pages_mapped > 0


def test_reset_starts_a_new_batch_and_reorder_permutes_rows() -> None:
    torch.manual_seed(5)
    model = tiny_llama("sdpa")
    gen = torch.Generator().manual_seed(2)
    with vattn_cache(model, 4) as cache, torch.no_grad():
        ids, mask = left_padded([9, 4, 12], gen)
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                       past_key_values=cache)
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.cache.stats().active_slots == 0
        # A second batch, decoded by hand, rows reordered half-way (slots permuted, so
        # the views are gathered from slots out of order).
        ids, mask = left_padded([6, 6], gen)
        ref_cache = transformers.DynamicCache(config=model.config)
        caches = (ref_cache, cache)
        outs = [model(ids, attention_mask=mask, past_key_values=c) for c in caches]
        order = torch.tensor([1, 0])
        for c in caches:
            c.reorder_cache(order)
        step = outs[0].logits[order, -1:].argmax(-1)
        mask = torch.cat([mask[order], torch.ones_like(step)], 1)
        outs = [model(step, attention_mask=mask, past_key_values=c) for c in caches]
        assert not cache.in_order
        assert torch.allclose(outs[1].logits, outs[0].logits, atol=1e-5, rtol=0)


def test_refused_operations_and_bad_input_leave_the_cache_usable() -> None:
    torch.manual_seed(1)
    model = tiny_llama("sdpa")
    with vattn_cache(model, 2, max_cache_len=64) as cache, torch.no_grad():
        ids = torch.randint(1, VOCAB, (2, 8))
        model(ids, past_key_values=cache)
        assert issubclass(Unsupported, NotImplementedError)   # what transformers expects
        with pytest.raises(InvalidArgument, match="beam_idx must name one of the 2 rows"):
            cache.reorder_cache(torch.tensor([0, 2]))
        with pytest.raises(Unsupported, match="cannot expand"):
            cache.batch_repeat_interleave(2)
        with pytest.raises(Unsupported, match="offloading"):
            cache.layers[0].offload()
        with pytest.raises(InvalidArgument, match="holds 2 rows"):
            model(torch.randint(1, VOCAB, (3, 1)), past_key_values=cache)
        with pytest.raises(InvalidArgument, match="exceed max_cache_len"):
            model(torch.randint(1, VOCAB, (2, cache.cache.max_context_len)),
                  past_key_values=cache)
        with pytest.raises(InvalidArgument, match="the cache holds torch.float32"):
            cache.update(torch.randn(2, 2, 1, 16, dtype=torch.float64),
                         torch.randn(2, 2, 1, 16, dtype=torch.float64), 0)
        assert cache.get_seq_length() == 8
        cache.crop(-3)
        assert [layer.get_seq_length() for layer in cache.layers] == [5, 5, 5]
        out = model(torch.randint(1, VOCAB, (2, 1)), past_key_values=cache)
        assert not torch.isnan(out.logits).any() and cache.get_seq_length() == 6


def test_a_batch_larger_than_the_cache_is_refused_before_a_slot_is_taken() -> None:
    model = tiny_llama("sdpa")
    with vattn_cache(model, 2) as cache, torch.no_grad():
        with pytest.raises(InvalidArgument, match="the forward has 3 rows, the cache holds "
                                                  "at most 2"):
            model(torch.randint(1, VOCAB, (3, 4)), past_key_values=cache)
        assert cache.cache.stats().active_slots == 0 and not cache.rows


@pytest.mark.parametrize("options", [
    dict(num_beams=3), dict(num_beams=2, num_return_sequences=2),
    dict(prompt_lookup_num_tokens=3), dict(assistant="self")],
    ids=["beams", "beams-returned", "prompt-lookup", "assisted"])
def test_beam_search_and_assisted_generation_match_dynamic_cache(
        options: dict[str, object]) -> None:
    """Beam search reorders rows by copies (its first reorder is ``[0, 0, ...]``: every
    beam starts from the first); assisted steps crop the rejected draft tokens, and
    ``crop(0)`` (all accepted) keeps every token."""
    torch.manual_seed(8)
    model = tiny_llama("sdpa")
    options = dict(options)
    if options.pop("assistant", None):
        options["assistant_model"] = model
    # Repeating prompts, so that prompt lookup finds drafts and has some accepted.
    ids = torch.tensor([[5, 9, 13, 5, 9, 13, 5, 9, 13, 5]])
    mask = torch.ones_like(ids)
    rows = int(options.get("num_beams", 1))     # type: ignore[call-overload]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             past_key_values=transformers.DynamicCache(config=model.config),
                             **options)
        with vattn_cache(model, rows) as cache:
            got = model.generate(ids, attention_mask=mask, max_new_tokens=16,
                                 do_sample=False, past_key_values=cache, **options)
    assert torch.equal(got, ref)


def test_crop_zero_keeps_every_token() -> None:
    model = tiny_llama("sdpa")
    with vattn_cache(model, 1) as cache, torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 10)), past_key_values=cache)
        cache.crop(0)
        assert cache.get_seq_length() == 10
        cache.crop(-0)
        cache.crop(20)                  # the older form: keep at most 20
        assert cache.get_seq_length() == 10
        cache.crop(4)
        assert cache.get_seq_length() == 4


@pytest.mark.host_kernels
@pytest.mark.parametrize("lengths", [[7, 7], [5, 17, 1]])
def test_the_vattn_attention_function_runs_our_kernels(lengths: list[int]) -> None:
    torch.manual_seed(7)
    model = tiny_llama("sdpa")
    gen = torch.Generator().manual_seed(len(lengths))
    ids, mask = left_padded(lengths, gen)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             past_key_values=transformers.DynamicCache(config=model.config))
        model.config._attn_implementation = "vattn"
        with vattn_cache(model, len(lengths)) as cache:
            got = model.generate(ids, attention_mask=mask, max_new_tokens=10,
                                 do_sample=False, past_key_values=cache)
            backends = dict(cache.backends)
    assert torch.equal(got, ref)
    padded = len(set(lengths)) > 1
    # 3 layers: one prefill each, then 9 decode steps through the Triton kernel.
    assert backends == {"vattn-triton": 27, ("sdpa-masked" if padded else "sdpa"): 3}


def test_the_vattn_attention_function_needs_the_cache() -> None:
    model = tiny_llama("sdpa")
    model.config._attn_implementation = "vattn"
    with pytest.raises(InvalidArgument, match="needs past_key_values=VAttentionCache"):
        model(torch.randint(1, VOCAB, (1, 4)), use_cache=False)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "vattn"])
def test_bf16_llama_3_8b_heads_on_the_gpu(attn: str) -> None:
    """Llama-3-8B heads (32 / 8 / 128), 2 layers, bf16, left-padded batch: teacher-forced
    over a prefill and 8 decode steps, logits within a tolerance of `DynamicCache` +
    SDPA, and the same tokens wherever the reference's top-2 margin exceeds it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=4096, intermediate_size=4096, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to(device="cuda",
                                                     dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(1)
    ids, mask = left_padded([1500, 37, 1024], gen)
    ids, mask = ids.cuda(), mask.cuda()
    ref_cache = transformers.DynamicCache(config=config)
    cache = VAttentionCache(config, max_batch_size=3, max_cache_len=1600, device="cuda",
                            dtype=torch.bfloat16, debug_fill_nan=True)
    tolerance = 0.05
    try:
        step = ids
        for _ in range(9):
            with torch.no_grad():
                config._attn_implementation = "sdpa"
                ref = model(step, attention_mask=mask, past_key_values=ref_cache).logits[:, -1]
                config._attn_implementation = attn
                got = model(step, attention_mask=mask, past_key_values=cache).logits[:, -1]
            assert not torch.isnan(got).any()
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < tolerance, err
            top2 = ref.float().topk(2, dim=-1).values
            sure = (top2[:, 0] - top2[:, 1]) > tolerance * ref.float().abs().max()
            assert torch.equal(got.argmax(-1)[sure], ref.argmax(-1)[sure])
            step = ref.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(step)], 1)
        if attn == "vattn":
            assert cache.backends["vattn-triton"] == 2 * 8
    finally:
        config._attn_implementation = "sdpa"
        cache.close()
