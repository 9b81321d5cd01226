"""The continuous-batching engine over vattn (CPU, float32, a tiny random Llama): every
request's tokens equal per-request `generate` on a `DynamicCache`, with requests
arriving mid-run, more requests than slots, prompts cut into chunks, and slots freed."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.test_transformers import VOCAB, tiny_llama  # noqa: E402
from vattn import InvalidArgument  # noqa: E402
from vattn.cli import main  # noqa: E402
from vattn.integrations.engine import Engine, Request  # noqa: E402


def reference(model: transformers.PreTrainedModel, request: Request) -> list[int]:
    ids = torch.tensor([request.prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=request.max_new_tokens,
                             past_key_values=transformers.DynamicCache(config=model.config))
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.host_kernels
@pytest.mark.parametrize("layout", ["token_major", "per_layer"])
def test_engine_outputs_equal_per_request_generate(layout: str) -> None:
    torch.manual_seed(4)
    model = tiny_llama("sdpa")
    gen = torch.Generator().manual_seed(9)
    shapes = [(5, 6), (41, 3), (1, 8), (23, 10), (70, 1), (16, 4)]   # prompt, new tokens
    requests = [Request(torch.randint(1, VOCAB, (n,), generator=gen).tolist(), m)
                for n, m in shapes]
    expected = [reference(model, r) for r in requests]
    engine = Engine(model, max_batch_size=3, max_cache_len=96, chunk_size=16, layout=layout,
                    page_size_bytes=64 << 10, debug_fill_nan=True)
    try:
        for request in requests[:3]:
            engine.add(request)
        waiting = requests[3:]
        mixed = 0
        while engine.busy or waiting:
            if waiting and engine.iterations % 3 == 2:
                engine.add(waiting.pop(0))
            decodes = sum(r.num_cached >= len(r.prompt) for r in engine.running)
            chunk = any(r.num_cached < len(r.prompt) for r in engine.running)
            mixed += bool(decodes and chunk)
            engine.step()
            assert len(engine.running) <= 3
        stats = engine.cache.cache.stats()
        assert stats.active_slots == 0 and len(engine.finished) == len(requests)
        assert mixed > 0, "no iteration mixed a prefill chunk with decodes"
        assert set(engine.cache.backends) == {"vattn-triton", "sdpa"}
    finally:
        engine.close()
    assert [r.output for r in requests] == expected


def test_engine_refuses_what_it_cannot_hold() -> None:
    model = tiny_llama("sdpa")
    engine = Engine(model, max_batch_size=1, max_cache_len=32, page_size_bytes=64 << 10)
    try:
        with pytest.raises(InvalidArgument, match="exceeds max_cache_len"):
            engine.add(Request([1] * engine.cache.cache.max_context_len, max_new_tokens=2))
        with pytest.raises(ValueError, match="needs a prompt"):
            Request([], max_new_tokens=3)
        assert not engine.busy and engine.step() == []
    finally:
        engine.close()
    with pytest.raises(InvalidArgument, match="chunk_size must be >= 1"):
        Engine(model, max_batch_size=1, max_cache_len=32, chunk_size=0)


@pytest.mark.host_kernels
def test_vattn_demo_runs_and_checks_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "cpu", "--requests", "4", "--max-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "outputs equal to DynamicCache + generate: 4/4 requests" in out
    assert "MiB mapped" in out and "tokens/s" in out


@pytest.mark.gpu
def test_vattn_demo_on_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--requests", "12", "--max-batch", "4", "--chunk", "256"]) == 0
    out = capsys.readouterr().out
    assert "outputs equal to DynamicCache + generate" in out
    assert "'vattn-triton'" in out


def test_a_request_that_cannot_fit_alone_is_an_error_not_a_hang() -> None:
    model = tiny_llama("sdpa")
    engine = Engine(model, max_batch_size=2, max_cache_len=4000, page_size_bytes=64 << 10,
                    memory_limit=4 * (64 << 10))
    try:
        engine.add(Request([3] * 3000, max_new_tokens=2))
        with pytest.raises(InvalidArgument, match="does not fit this cache even alone"):
            engine.step()
    finally:
        engine.close()
