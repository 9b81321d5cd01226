"""`vattn demo`: continuous batching of a HF Llama over vattn, checked against
transformers' own `DynamicCache`.

On a CPU a tiny random-weight Llama built from `LlamaConfig` (float32, no download); on
a GPU a larger one (Llama-3-8B heads, 4 layers, bf16). Requests of random lengths
arrive over the run, more than there are slots; the engine prints throughput and the
memory mapped as it goes, then every request's tokens are compared with
``model.generate`` on a `DynamicCache` (exact on the CPU; on a GPU, bf16 kernels may
break near-ties of random weights differently, and the count of requests that match is
reported).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from vattn.bench import common
from vattn.config import resolve_device
from vattn.errors import InvalidArgument, VattnError

MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "llama-3-8b-4l": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda[:N]")
    parser.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="default: tiny on a CPU, llama-3-8b-4l on a GPU")
    parser.add_argument("--requests", type=common.positive_int, default=None, help="default 6 / 64")
    parser.add_argument("--max-batch", type=common.positive_int, default=None,
                        help="slots; default 3 / 16")
    parser.add_argument("--chunk", type=common.positive_int, default=None,
                        help="prefill chunk; 16 / 512")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the comparison with DynamicCache")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, device: str, emit: Callable[[Any], None]) -> int:
    dev = resolve_device(device)
    cpu = dev.type == "cpu"
    if cpu:     # before triton is first imported (transformers imports it)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import transformers
    except ImportError as exc:
        raise VattnError("vattn demo needs transformers: pip install 'vattn[transformers]'"
                         ) from exc

    from vattn.integrations.engine import Engine, Request

    num_requests = args.requests or (6 if cpu else 64)
    max_batch = args.max_batch or (3 if cpu else 16)
    chunk = args.chunk or (16 if cpu else 512)
    if min(num_requests, max_batch, chunk) < 1:
        raise InvalidArgument("--requests, --max-batch and --chunk must be >= 1")
    name = args.model or ("tiny" if cpu else "llama-3-8b-4l")
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(**MODELS[name], max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    dtype = torch.float32 if cpu else torch.bfloat16
    model = transformers.LlamaForCausalLM(config).eval()
    torch.nn.Module.to(model, device=dev, dtype=dtype)
    gen = torch.Generator().manual_seed(args.seed)
    prompt_max, new_max = (60, 12) if cpu else (3000, 64)
    requests = [Request(torch.randint(1, config.vocab_size, (int(n),), generator=gen).tolist(),
                        int(m))
                for n, m in zip(torch.randint(1, prompt_max, (num_requests,), generator=gen),
                                torch.randint(1, new_max, (num_requests,), generator=gen),
                                strict=True)]
    emit(f"model {name} ({dtype}, {config.num_hidden_layers} layers) on {dev}; "
         f"{num_requests} requests, {max_batch} slots, prefill chunk {chunk}")
    engine = Engine(model, max_batch_size=max_batch, max_cache_len=prompt_max + new_max + 8,
                    chunk_size=chunk)
    try:
        start = time.perf_counter()
        for request in requests[:num_requests // 2]:        # half at once, the rest later
            engine.add(request)
        arrived = num_requests // 2
        while arrived < num_requests or engine.busy:
            if arrived < num_requests and engine.iterations % 2 == 0:
                engine.add(requests[arrived])
                arrived += 1
            engine.step()
            if engine.iterations % 10 == 0 or not engine.busy:
                stats = engine.cache.cache.stats()
                mib = stats.pages_mapped * stats.page_size_bytes / 2**20
                tokens = sum(len(r.output) for r in requests)
                emit(f"iteration {engine.iterations:4d}: {len(engine.running)} running, "
                     f"{len(engine.waiting)} waiting, {len(engine.finished)} done, "
                     f"{tokens / (time.perf_counter() - start):8.1f} tokens/s, "
                     f"{mib:8.1f} MiB mapped")
        emit(f"{sum(len(r.output) for r in requests)} tokens in "
             f"{time.perf_counter() - start:.2f} s, {engine.iterations} iterations; "
             f"attention calls: {dict(engine.cache.backends)}")
    finally:
        engine.close()
    if args.no_check:
        return 0
    matched = 0
    with torch.no_grad():
        for request in requests:
            ids = torch.tensor([request.prompt], device=dev)
            ref = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=request.max_new_tokens, do_sample=False,
                                 past_key_values=transformers.DynamicCache(config=config))
            matched += ref[0, ids.shape[1]:].tolist() == request.output
    emit(f"outputs equal to DynamicCache + generate: {matched}/{num_requests} requests")
    return 0 if matched == num_requests or not cpu else 1
