"""Decode attention on the virtual cache against torch's kernels and a paged twin.

Shapes (issue 5):

- (a) the Flash-Decoding micro-benchmark: batch 1, 16 query heads, 2 KV heads, head
  dim 128, context 512..64K; time against ``KV bytes / read bandwidth + the two-launch
  floor`` measured in the same run;
- (b) Llama-3-8B heads (32/8/128) at 16K context, batch 1..32, equal and unequal lengths
  (uniform in [1, 16K], seeded); KV read rate against the read bandwidth.

Every call reads a cold L2: calls rotate over layers whose KV together exceeds it
several times. The calls are captured in one CUDA graph and timed by replaying it, so
host overhead (Python checks, launches) is not counted: GPU time per call, median.

Kernels: ``vattn-triton`` (both layouts); ``torch-fa2`` (varlen, ``seqused_k``) and
``flash-attn`` / ``flash-attn-3`` when installed, through `flash_attention`; ``sdpa``
(equal lengths only: it has no per-request lengths); the paged twin of our kernel at
blocks 16 and 128 (the same data, copied into shuffled blocks).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch

from vattn.bench import common
from vattn.cache import VirtualKVCache
from vattn.config import resolve_device
from vattn.errors import InvalidArgument

L2_COLD_BYTES = 256 << 20       # KV read per rotation: several times any L2 of today
Call = Callable[[], object]


def read_bandwidth(device: torch.device) -> float:
    """Bytes per second read by the faster of a bf16 sum and a copy (half its traffic)
    over 4 GiB: the HBM read rate a kernel can hope for."""
    x = torch.randn(1 << 31, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    nbytes = x.numel() * 2
    summed = common.median(common.cuda_times([lambda: x.sum()], 20))
    copied = common.median(common.cuda_times([lambda: y.copy_(x)], 20))
    return max(nbytes / summed, 2 * nbytes / copied)


def launch_floor(device: torch.device) -> float:
    """Our two launches with nothing to read (every length zero), in seconds of GPU time
    (replayed from a CUDA graph, as the kernels are timed)."""
    from vattn.kernels import decode_attention

    k = torch.randn(1, 64, 2, 128, device=device, dtype=torch.bfloat16)
    q = torch.randn(1, 16, 128, device=device, dtype=torch.bfloat16)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    return common.median(common.graph_times([lambda: decode_attention(q, k, k, zero)] * 64,
                                            20))


class Workload:
    """A cache filled with random K/V at given lengths, and the kernels to time on it."""

    def __init__(self, device: str, layout: str, num_q: int, num_kv: int, head_dim: int,
                 lengths: list[int], num_layers: int) -> None:
        batch, context = len(lengths), max(lengths)
        self.cache = VirtualKVCache(num_layers=num_layers, num_kv_heads=num_kv,
                                    head_dim=head_dim, dtype=torch.bfloat16,
                                    max_batch_size=batch, max_context_len=context,
                                    device=device, layout=layout)  # type: ignore[arg-type]
        slots = [self.cache.allocate() for _ in range(batch)]
        self.cache.step(dict(zip(slots, lengths, strict=True)))
        for layer in range(num_layers):
            for t in self.cache.kv(layer):
                for slot, n in zip(slots, lengths, strict=True):
                    t[slot, :n].normal_()
        dev = resolve_device(device)
        self.lengths, self.context = lengths, context
        self.lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
        self.q = torch.randn(batch, num_q, head_dim, device=dev, dtype=torch.bfloat16)
        self.kv_bytes = 2 * sum(lengths) * num_kv * head_dim * 2

    def calls(self, kernel: Callable[[int], object]) -> list[Call]:
        return [functools.partial(kernel, layer)
                for layer in range(self.cache.config.num_layers)]

    def kernels(self, equal: bool, paged_blocks: tuple[int, ...]) -> dict[str, list[Call]]:
        from vattn.kernels import available_backends, decode_attention, flash_attention
        from vattn.kernels.flash import Backend

        cache, q, lens = self.cache, self.q, self.lens
        out: dict[str, list[Call]] = {}
        # One workspace for every call, as a serving loop keeps one (no memset a call).
        space = torch.zeros(q.shape[0] * cache.config.num_kv_heads, dtype=torch.int32,
                            device=q.device)

        def ours(layer: int) -> torch.Tensor:
            return decode_attention(q, *cache.kv(layer), lens, workspace=space)

        def adapter(layer: int, backend: Backend) -> torch.Tensor:
            return flash_attention(q[:, None], *cache.kv(layer), lens, backend=backend).out

        out["vattn-triton"] = self.calls(ours)
        for backend in available_backends(q.device):
            if backend != "sdpa":
                out[backend] = self.calls(functools.partial(adapter, backend=backend))
        if equal:
            n = self.context

            def sdpa(layer: int) -> torch.Tensor:
                k, v = cache.kv(layer)
                return torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None], k[:, :n].transpose(1, 2), v[:, :n].transpose(1, 2),
                    enable_gqa=True)

            out["sdpa"] = self.calls(sdpa)
        for block_size in paged_blocks:
            out[f"paged-{block_size}"] = self.paged(block_size)
        return out

    def paged(self, block_size: int) -> list[Call]:
        """Our kernel behind a block table: the first layers (enough for a cold L2) copied
        into shuffled blocks (a last block's tokens past the length are random; the
        kernel masks them)."""
        from vattn.kernels import paged_decode_attention

        layers = min(self.cache.config.num_layers, layers_for_cold_l2(self.kv_bytes, 2))
        per_row = [-(-n // block_size) for n in self.lengths]
        order = torch.randperm(sum(per_row), generator=torch.Generator().manual_seed(7))
        table = torch.zeros(len(self.lengths), max(per_row), dtype=torch.int32)
        first = 0
        for row, count in enumerate(per_row):
            table[row, :count] = order[first:first + count]
            first += count
        table = table.to(self.q.device)
        space = torch.zeros(len(self.lengths) * self.cache.config.num_kv_heads,
                            dtype=torch.int32, device=self.q.device)    # as `kernels` does
        calls: list[Call] = []
        for layer in range(layers):
            pair = []
            for t in self.cache.kv(layer):
                blocks = torch.randn(sum(per_row), block_size, *t.shape[2:], dtype=t.dtype,
                                     device=t.device)
                for row, (count, n) in enumerate(zip(per_row, self.lengths, strict=True)):
                    rows = blocks[table[row, :count].long()]     # a copy; slot == row
                    rows.flatten(0, 1)[:n] = t[row, :n]
                    blocks[table[row, :count].long()] = rows
                pair.append(blocks)
            calls.append(functools.partial(paged_decode_attention, self.q, pair[0], pair[1],
                                           table, self.lens, workspace=space))
        return calls

    def close(self) -> None:
        self.cache.close()


def layers_for_cold_l2(kv_bytes_per_layer: int, at_least: int) -> int:
    """Layers to rotate over so that one rotation reads `L2_COLD_BYTES` (at most 512)."""
    return max(at_least, min(512, -(-L2_COLD_BYTES // max(1, kv_bytes_per_layer))))


def measure(w: Workload, equal: bool, paged_blocks: tuple[int, ...], repeats: int,
            bandwidth: float, floor: float, base: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, calls in w.kernels(equal, paged_blocks).items():
        seconds = common.median(common.graph_times(calls, repeats))
        model = w.kv_bytes / bandwidth + floor
        rows.append({**base, "kernel": name, "us": round(seconds * 1e6, 1),
                     "TB/s": round(w.kv_bytes / seconds / 1e12, 2),
                     "of read bw": f"{w.kv_bytes / seconds / bandwidth:.0%}",
                     "vs model": f"{seconds / model:.2f}x"})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda[:N]")
    parser.add_argument("--cases", default="a,b", help="comma-separated: a, b")
    parser.add_argument("--layouts", default="per_layer,token_major")
    parser.add_argument("--contexts", type=common.positive_ints,
                        default="512,1024,2048,4096,8192,16384,32768,65536",
                        help="case a")
    parser.add_argument("--batches", type=common.positive_ints, default="1,2,4,8,16,32",
                        help="case b")
    parser.add_argument("--paged-blocks", type=common.positive_ints, default="16,128")
    parser.add_argument("--repeats", type=common.positive_int, default=50)
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--plot", default=None, help="PNG prefix: PREFIX-<case>.png")


def run(args: argparse.Namespace, device: str, emit: Callable[[Any], None]) -> int:
    """Run the benchmark; `emit` shows each finished part (the CLI prints it)."""
    dev = resolve_device(device)
    common.require_cuda(dev, "decode")
    if args.repeats < 1:
        raise InvalidArgument(f"--repeats must be >= 1, got {args.repeats}")
    header = common.device_environment(dev)
    bandwidth, floor = read_bandwidth(dev), launch_floor(dev)
    header.update({"read bandwidth TB/s": f"{bandwidth / 1e12:.2f}",
                   "two-launch floor us": f"{floor * 1e6:.1f}"})
    emit(common.header_line(header))
    blocks = tuple(int(b) for b in args.paged_blocks.split(",") if b)
    rows: list[dict[str, Any]] = []
    cases = args.cases.split(",")
    for layout in args.layouts.split(","):
        if "a" in cases:
            for context in (int(c) for c in args.contexts.split(",")):
                layers = layers_for_cold_l2(2 * context * 2 * 128 * 2, 4)
                w = Workload(device, layout, 16, 2, 128, [context], layers)
                try:
                    rows += measure(w, True, blocks, args.repeats, bandwidth, floor,
                                    {"case": "a", "layout": layout, "batch": 1,
                                     "context": context, "lengths": "equal"})
                finally:
                    w.close()
        if "b" in cases:
            for batch in (int(b) for b in args.batches.split(",")):
                gen = torch.Generator().manual_seed(batch)
                for equal in (True, False):
                    lengths = ([16384] * batch if equal else
                               torch.randint(1, 16385, (batch,), generator=gen).tolist())
                    w = Workload(device, layout, 32, 8, 128, lengths, 32)
                    try:
                        rows += measure(w, equal, blocks, args.repeats, bandwidth, floor,
                                        {"case": "b", "layout": layout, "batch": batch,
                                         "context": 16384,
                                         "lengths": "equal" if equal else "unequal"})
                    finally:
                        w.close()
    emit("\n" + common.markdown_table(rows))
    if args.json:
        common.write_json(args.json, {"environment": header, "rows": rows})
    if args.plot:
        plot(args.plot, rows, bandwidth, floor)
    return 0


def plot(prefix: str, rows: list[dict[str, Any]], bandwidth: float, floor: float) -> None:
    """PREFIX-a.png: time against context (case a); PREFIX-b.png: read rate against batch,
    equal and unequal lengths side by side (case b). A colour per kernel, a line style
    per layout."""
    plt = common.pyplot()

    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kernels)}
    styles = {"per_layer": "-", "token_major": "--"}
    for case, x_key, y_key in (("a", "context", "us"), ("b", "batch", "TB/s")):
        mine = [r for r in rows if r["case"] == case]
        panels = [p for p in ("equal", "unequal") if any(r["lengths"] == p for r in mine)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
        for ax, lengths in zip(axes[0], panels, strict=True):
            for layout in dict.fromkeys(r["layout"] for r in mine):
                for kernel in kernels:
                    pts = [r for r in mine if (r["layout"], r["kernel"], r["lengths"])
                           == (layout, kernel, lengths)]
                    if pts:
                        ax.plot([r[x_key] for r in pts], [r[y_key] for r in pts], "o",
                                linestyle=styles.get(layout, ":"), color=colours[kernel],
                                label=f"{kernel}, {layout}", markersize=3)
            if case == "a":
                xs = sorted({r["context"] for r in mine})
                ax.plot(xs, [(2 * x * 2 * 128 * 2 / bandwidth + floor) * 1e6 for x in xs],
                        "k:", label="KV bytes / read bw + floor")
                ax.set_yscale("log")
            else:
                ax.axhline(bandwidth / 1e12, color="k", linestyle=":", label="read bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
            ax.set_ylabel(y_key)
            ax.set_title(f"case {case}, {lengths} lengths")
            ax.legend(fontsize=6)
        fig.tight_layout()
        common.save_figure(fig, f"{prefix}-{case}.png")
        plt.close(fig)
