"""End-to-end decode throughput on KV backends compared (vAttention Fig. 9a).

Yi-6B- and Llama-3-8B-shaped decoders (random weights, bf16, all layers), every request
starting at `--context` tokens (the cache filled directly: the figure is about decode),
batch 1..32, `--steps` decode steps. The same model code (`e2e_model.Decoder`) runs on
each backend: ``vattn`` (virtual cache, our kernels), ``static`` (every row's maximum
preallocated, the same kernels), ``paged-16`` / ``paged-128`` (block tables kept
incrementally, the paged twin of our kernel); ``hf-static`` is transformers' own Llama
with its StaticCache and SDPA, eager. On a GPU our backends' step is captured in a CUDA
graph (host work between replays: vattn's `step_async`, the block-table entries), and
GPU time per step is reported beside tokens/s so host overhead shows. The vattn backend
uses `--layout` (``per_layer`` by default: the static backend's strides); `--repeats`
interleaves rounds of every backend and reports the median and the spread.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vattn.bench import common
from vattn.config import resolve_device
from vattn.errors import InvalidArgument, VattnError

if TYPE_CHECKING:
    from vattn.bench.e2e_model import Decoder, Shape
    from vattn.layout import LayoutName

BACKENDS = ("vattn", "static", "paged-16", "paged-128", "hf-static")
MODEL_NAMES = ("llama-3-8b", "yi-6b", "tiny")   # e2e_model.MODELS, imported lazily (kernels)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda[:N]")
    parser.add_argument("--models", default=None,
                        help=f"of {MODEL_NAMES}; default yi-6b,llama-3-8b (tiny on a CPU)")
    parser.add_argument("--batches", type=common.positive_ints, default=None,
                        help="default 1,2,4,8,16,32 (1,2 on a CPU)")
    parser.add_argument("--context", type=common.positive_int, default=None,
                        help="default 16384 (256)")
    parser.add_argument("--steps", type=common.positive_int, default=None, help="default 256 (8)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--layout", choices=("per_layer", "token_major"), default="per_layer",
                        help="the vattn backend's layout; per_layer gives the kernels the "
                             "static backend's strides (token_major: every layer's K of a "
                             "token together, a larger token stride)")
    parser.add_argument("--repeats", type=common.positive_int, default=1,
                        help="rounds of every backend, interleaved; tokens/s is the median "
                             "and 'spread' (max - min) / median is the noise band")
    parser.add_argument("--no-graph", action="store_true", help="eager steps on a GPU too")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="PNG: tokens/s per batch, a panel a model")


def make_kv(name: str, shape: Shape, batch: int, max_len: int, device: torch.device,
            dtype: torch.dtype, layout: LayoutName = "per_layer") -> Any:
    from vattn.bench.e2e_model import ContiguousKV, PagedKV

    if name in ("vattn", "static"):
        return ContiguousKV(name, shape, batch, max_len, device, dtype, layout=layout)
    if name.startswith("paged-"):
        return PagedKV(int(name.split("-")[1]), shape, batch, max_len, device, dtype)
    raise InvalidArgument(f"unknown backend {name!r}; known: {BACKENDS}")


def decode(decoder: Decoder, kv: Any, batch: int, context: int, steps: int, graph: bool,
           seed: int = 1) -> tuple[list[list[int]], float, float]:
    """Fill `context` random tokens a row, then `steps` greedy steps. Returns the tokens
    (one list a step), wall seconds per step and GPU seconds per step (0 eager)."""
    s, dev = decoder.shape, decoder.embed.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    kv.prepare(context + 1)
    for layer in range(s.num_layers):
        k, v = (torch.randn(batch, context, s.num_kv_heads, s.head_dim, device=dev,
                            generator=gen).to(decoder.embed.dtype) for _ in range(2))
        kv.fill(layer, k, v)
    tokens = torch.randint(0, s.vocab, (batch,), device=dev, generator=gen)
    positions = torch.full((batch,), context, dtype=torch.int32, device=dev)

    def step() -> None:
        tokens.copy_(decoder.step(tokens, positions, kv))
        positions.add_(1)

    out: list[list[int]] = []
    run: Callable[[], None] = step
    if graph:
        step()                                  # compile and allocate outside the capture
        out.append(tokens.tolist())
        kv.before_step(context + 1)
        torch.cuda.synchronize()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step()
        # Capturing ran nothing: the rows are still at context + 1.
        run = captured.replay
    done, events = len(out), []
    start = time.perf_counter()
    for i in range(done, steps):
        kv.before_step(context + i + 1)
        if graph:
            pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            pair[0].record()
            run()
            pair[1].record()
            events.append(pair)
        else:
            run()
        out.append(tokens.tolist() if not graph else [])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / max(1, steps - done)
    gpu = common.median([a.elapsed_time(b) / 1e3 for a, b in events]) if events else 0.0
    return out, wall, gpu


def hf_static(shape: Shape, batch: int, context: int, steps: int,
              device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """transformers' Llama with its StaticCache (filled to `context`) and SDPA, eager:
    wall seconds per step, and 0 GPU seconds (not captured)."""
    try:
        import transformers
    except ImportError as exc:
        raise VattnError("backend hf-static needs transformers: pip install "
                         "'vattn[transformers]' (or leave it out of --backends)") from exc

    config = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=context + steps + 8)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).eval()
    torch.nn.Module.to(model, dtype=dtype)
    cache = transformers.StaticCache(config=config, max_cache_len=context + steps + 1)
    cache.early_initialization(batch, shape.num_kv_heads, shape.head_dim, dtype, device)
    layer: Any
    for layer in cache.layers:          # StaticLayer: keys/values [B, Hkv, Lmax, D]
        layer.keys[:, :, :context].normal_()
        layer.values[:, :, :context].normal_()
        layer.cumulative_length.fill_(context)
    tokens = torch.randint(0, shape.vocab, (batch, 1), device=device)
    with torch.no_grad():
        start = 0.0
        for i in range(steps):
            if i == 1:                          # the first step compiles and allocates
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            position = torch.full((batch, 1), context + i, device=device)
            logits = model(input_ids=tokens, position_ids=position,
                           past_key_values=cache, use_cache=True).logits
            tokens = logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del model, cache
    return (time.perf_counter() - start) / max(1, steps - 1), 0.0


def run(args: argparse.Namespace, device: str, emit: Callable[[Any], None]) -> int:
    dev = resolve_device(device)
    cpu = dev.type == "cpu"
    args.models = args.models or ("tiny" if cpu else "yi-6b,llama-3-8b")
    args.batches = args.batches or ("1,2" if cpu else "1,2,4,8,16,32")
    args.context = args.context or (256 if cpu else 16384)
    args.steps = args.steps or (8 if cpu else 256)
    if args.steps < 2 or args.context < 1 or args.repeats < 1:
        raise InvalidArgument(f"--steps must be >= 2, --context and --repeats >= 1, got "
                              f"{args.steps}, {args.context} and {args.repeats}")
    backends = [b for b in args.backends.split(",") if b]
    for name in backends:
        if name not in BACKENDS:
            raise InvalidArgument(f"unknown backend {name!r}; known: {BACKENDS}")
    models = [m for m in args.models.split(",") if m]
    for name in models:
        if name not in MODEL_NAMES:
            raise InvalidArgument(f"unknown model {name!r}; known: {MODEL_NAMES}")
    from vattn.bench.e2e_model import MODELS, Decoder

    header = common.device_environment(dev)
    emit(common.header_line(header))
    emit(f"vattn backend layout: {args.layout}")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    graph = dev.type == "cuda" and not args.no_graph
    rows: list[dict[str, Any]] = []
    for model_name in models:
        shape = MODELS[model_name]
        decoder = Decoder(shape, dev, dtype)
        for batch in (int(b) for b in args.batches.split(",") if b):
            base = {"model": model_name, "batch": batch, "context": args.context}
            walls: dict[str, list[float]] = {name: [] for name in backends}
            gpus: dict[str, list[float]] = {name: [] for name in backends}
            out_of_memory: set[str] = set()
            held: dict[str, int] = {}
            for rnd in range(args.repeats):
                # Rounds rotate the order, so no backend always runs first or last.
                for name in backends[rnd % len(backends):] + backends[:rnd % len(backends)]:
                    result = (None if name in out_of_memory else
                              _measure(name, decoder, batch, args, dev, dtype, graph))
                    if result is None:
                        out_of_memory.add(name)
                        walls[name].clear()
                        continue
                    walls[name].append(result[0])
                    gpus[name].append(result[1])
                    held[name] = result[2]
            batch_rows = [_row(base, name, walls[name], gpus[name], held.get(name, 0))
                          for name in backends]
            _ratios(batch_rows)
            emit(common.markdown_table(batch_rows))
            rows += batch_rows
    emit("\n" + common.markdown_table(rows))
    if args.json:
        common.write_json(args.json, {"environment": header, "vattn_layout": args.layout,
                                      "rows": rows})
    if args.plot:
        plot(args.plot, rows)
    return 0


def _measure(name: str, decoder: Decoder, batch: int, args: argparse.Namespace,
             dev: torch.device, dtype: torch.dtype, graph: bool
             ) -> tuple[float, float, int] | None:
    """One backend's wall and GPU seconds per step and the K/V bytes it held at the end
    (0: not measured), or None when it ran out of memory."""
    try:
        if name == "hf-static":
            return *hf_static(decoder.shape, batch, args.context, args.steps, dev, dtype), 0
        kv = make_kv(name, decoder.shape, batch, args.context + args.steps + 1, dev, dtype,
                     args.layout)
        try:
            _, wall, gpu = decode(decoder, kv, batch, args.context, args.steps, graph)
            held = kv.held_bytes()
        finally:
            kv.close()
        return wall, gpu, held
    except torch.OutOfMemoryError:
        return None
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _row(base: dict[str, Any], name: str, walls: list[float], gpus: list[float],
         held: int) -> dict[str, Any]:
    if not walls:
        return {**base, "backend": name, "tokens/s": "OOM", "spread": "-", "step us": "-",
                "GPU us": "-", "KV MiB": "-"}
    rates = [base["batch"] / w for w in walls]
    rate, gpu = common.median(rates), common.median(gpus)
    return {**base, "backend": name, "tokens/s": round(rate, 1),
            "spread": f"{(max(rates) - min(rates)) / rate:.1%}" if len(rates) > 1 else "-",
            "step us": round(common.median(walls) * 1e6, 1),
            "GPU us": round(gpu * 1e6, 1) if gpu else "-",
            "KV MiB": round(held / 2**20, 1) if held else "-"}


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each backend's tokens/s over vattn's, in the same (model, batch)."""
    ours = next((r["tokens/s"] for r in rows if r["backend"] == "vattn"), None)
    for row in rows:
        rate = row["tokens/s"]
        row["vattn / it"] = (f"{ours / rate:.2f}x" if isinstance(ours, float)
                             and isinstance(rate, float) else "-")


def plot(path: str, rows: list[dict[str, Any]]) -> None:
    """Tokens/s against batch, a line a backend, a panel a model (like Fig. 9a)."""
    plt = common.pyplot()

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model and isinstance(r["tokens/s"], float)]
        for backend in dict.fromkeys(r["backend"] for r in mine):
            pts = [r for r in mine if r["backend"] == backend]
            ax.plot([r["batch"] for r in pts], [r["tokens/s"] for r in pts], "-o",
                    label=backend, markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{model}, context {mine[0]['context'] if mine else '?'}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)
