"""`vattn bench pod`: fused prefill + decode attention (`pod_attention`) against the two
kernels run back to back and on two CUDA streams at once, on Sarathi-like hybrid
batches: one prefill chunk (512 / 1024 / 2048 tokens over a cached prefix of 0..16K)
plus a decode batch (8..64 requests at 4K..16K context), Llama-3-8B heads (32 / 8 /
128), bf16.

The baselines use the best kernel of each kind measured in the same cell: for the
prefill, our Triton prefill (`pod_attention` with no decodes) or `flash_attention`
through each FlashAttention present; for the decodes, `decode_attention` or
`flash_attention`. The headline baseline picks among ours and FlashAttention-2 (torch's
or the flash-attn package's); where FlashAttention-3 is present, a second baseline
that may pick it is timed too (its speedups carry a ``(with FA3)`` suffix). Per cell:
the times, POD's speedups and the fraction of the ideal ``(t_prefill + t_decode) /
max(t_prefill, t_decode)`` it reaches. POD is told the decodes' longest length
(``max_decode_len``, as a serving engine's scheduler knows it). On a GPU every time is
a CUDA-graph replay (no host overhead in any of them); on a CPU the same code runs one
tiny cell through the Triton interpreter.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vattn.bench import common
from vattn.config import resolve_device
from vattn.errors import InvalidArgument

if TYPE_CHECKING:
    from vattn.kernels.flash import Backend
    from vattn.kernels.pod import Policy

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vattn.kernels.pod import POLICIES

    parser.add_argument("--device", default=None, help="cuda[:N] (cpu: one tiny cell)")
    parser.add_argument("--chunks", default="512,1024,2048")
    parser.add_argument("--prefixes", default="0,4096,16384")
    parser.add_argument("--batches", default="8,32,64", help="decode requests")
    parser.add_argument("--contexts", default="4096,16384", help="decode context")
    parser.add_argument("--policy", choices=POLICIES, default="50:50")
    parser.add_argument("--repeats", type=common.positive_int, default=20)
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--plot", default=None, help="PNG: heat map of POD's speedups")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise InvalidArgument(f"--{name} must be comma-separated ints, got {text!r}") from exc
    if not values or min(values) < (0 if name == "prefixes" else 1):
        raise InvalidArgument(f"--{name} needs values >= {0 if name == 'prefixes' else 1}, "
                              f"got {text!r}")
    return values


class Cell:
    """One hybrid batch: the cache (slot 0 the prefill's, 1..B the decodes'), queries,
    and every way of computing its attention."""

    def __init__(self, device: torch.device, chunk: int, prefix: int, batch: int,
                 context: int, heads: int = HEADS, kv_heads: int = KV_HEADS,
                 head_dim: int = HEAD_DIM, seed: int = 0) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
        lmax = max(prefix + chunk, context)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, generator=gen).to(dtype)

        self.k, self.v = rand(batch + 1, lmax, kv_heads, head_dim), rand(
            batch + 1, lmax, kv_heads, head_dim)
        self.qp, self.qd = rand(chunk, heads, head_dim), rand(batch, heads, head_dim)
        self.prefix, self.chunk, self.context = prefix, chunk, context
        self.lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.slots = torch.arange(1, batch + 1, dtype=torch.int32, device=device)
        self.prefill_len = torch.tensor([prefix + chunk], dtype=torch.int32, device=device)
        self.prefill_slot = torch.zeros(1, dtype=torch.int32, device=device)

    def prefill_kernels(self) -> dict[str, Callable[[], object]]:
        from vattn.kernels import flash_attention, pod_attention

        kernels: dict[str, Callable[[], object]] = {
            "vattn-triton": lambda: pod_attention(self.qp, self.qd[:0], self.k, self.v, 0,
                                                  self.prefix, self.lens[:0])}
        for name in _flash_backends(self.qp.device):
            kernels[name] = functools.partial(
                flash_attention, self.qp[None], self.k, self.v, self.prefill_len,
                slots=self.prefill_slot, causal=True, backend=name)
        return kernels

    def decode_kernels(self) -> dict[str, Callable[[], object]]:
        from vattn.kernels import decode_attention, flash_attention

        kernels: dict[str, Callable[[], object]] = {
            "vattn-triton": lambda: decode_attention(self.qd, self.k, self.v, self.lens,
                                                     self.slots)}
        for name in _flash_backends(self.qd.device):
            kernels[name] = functools.partial(
                flash_attention, self.qd[:, None], self.k, self.v, self.lens,
                slots=self.slots, causal=True, backend=name)
        return kernels

    def pod(self, policy: Policy) -> Callable[[], object]:
        from vattn.kernels import pod_attention

        return lambda: pod_attention(self.qp, self.qd, self.k, self.v, 0, self.prefix,
                                     self.lens, self.slots, policy=policy,
                                     max_decode_len=self.context)


def _flash_backends(device: torch.device) -> list[Backend]:
    """The FlashAttention backends to time: every one present (on a CPU, SDPA; on a GPU
    SDPA is left out, a loop over requests)."""
    from vattn.kernels import available_backends

    found = available_backends(device)
    return [b for b in found if b != "sdpa"] if device.type == "cuda" else found


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        return common.median(common.graph_times([fn], repeats))
    return common.median(common.host_times(fn, repeats, warmup=1))


def back_to_back(prefill: Callable[[], object],
                 decode: Callable[[], object]) -> Callable[[], object]:
    return lambda: (prefill(), decode())


def two_streams(prefill: Callable[[], object], decode: Callable[[], object],
                device: torch.device) -> Callable[[], object]:
    """Both kernels at once: the decode on a side stream forked from and joined to the
    current one (on a CPU, one after the other)."""
    if device.type != "cuda":
        return back_to_back(prefill, decode)
    side = torch.cuda.Stream(device)

    def run() -> None:
        main = torch.cuda.current_stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            decode()
        prefill()
        main.wait_stream(side)
    return run


def measure(cell: Cell, device: torch.device, policy: Policy, repeats: int,
            base: dict[str, Any]) -> dict[str, Any]:
    """Every way of computing `cell`, timed; the best prefill and decode kernels of each
    baseline set make its back-to-back and two-stream baselines."""
    prefill_fns, decode_fns = cell.prefill_kernels(), cell.decode_kernels()
    prefills = {name: _time(fn, device, repeats) for name, fn in prefill_fns.items()}
    decodes = {name: _time(fn, device, repeats) for name, fn in decode_fns.items()}
    t_pod = _time(cell.pod(policy), device, repeats)
    row: dict[str, Any] = {**base}
    timed: dict[tuple[str, str], tuple[float, float]] = {}
    for suffix, allowed in (("", lambda n: n != "flash-attn-3"), (" (with FA3)", None)):
        if allowed is None and "flash-attn-3" not in prefills:
            break
        p_name = min(filter(allowed, prefills), key=prefills.__getitem__)
        d_name = min(filter(allowed, decodes), key=decodes.__getitem__)
        if (p_name, d_name) not in timed:
            p_fn, d_fn = prefill_fns[p_name], decode_fns[d_name]
            timed[p_name, d_name] = (_time(back_to_back(p_fn, d_fn), device, repeats),
                                     _time(two_streams(p_fn, d_fn, device), device, repeats))
        t_serial, t_streams = timed[p_name, d_name]
        t_p, t_d = prefills[p_name], decodes[d_name]
        ideal = (t_p + t_d) / max(t_p, t_d)
        row.update({
            f"prefill kernel{suffix}": p_name, f"decode kernel{suffix}": d_name,
            f"prefill us{suffix}": _us(t_p), f"decode us{suffix}": _us(t_d),
            f"back-to-back us{suffix}": _us(t_serial),
            f"two streams us{suffix}": _us(t_streams)})
        if not suffix:
            row["pod us"] = _us(t_pod)
        row.update({
            f"vs back-to-back{suffix}": round(t_serial / t_pod, 3),
            f"vs two streams{suffix}": round(t_streams / t_pod, 3),
            f"ideal{suffix}": round(ideal, 3),
            f"of ideal{suffix}": (round((t_serial / t_pod - 1) / (ideal - 1), 3)
                                  if ideal > 1 else "-")})
    return row


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Geometric means and minima of POD's speedups over the grid (against each
    baseline set present)."""
    out: dict[str, float] = {}
    for key in ("vs back-to-back", "vs two streams", "vs back-to-back (with FA3)",
                "vs two streams (with FA3)"):
        values = [r[key] for r in rows if key in r]
        if not values:
            continue
        out[f"geomean {key}"] = round(math.exp(sum(map(math.log, values)) / len(values)), 3)
        out[f"min {key}"] = min(values)
    return out


def run(args: argparse.Namespace, device: str, emit: Callable[[Any], None]) -> int:
    from vattn.kernels import pod_split

    dev = resolve_device(device)
    if args.repeats < 1:
        raise InvalidArgument(f"--repeats must be >= 1, got {args.repeats}")
    grid = [(c, p, b, x) for c in _ints(args.chunks, "chunks")
            for p in _ints(args.prefixes, "prefixes") for b in _ints(args.batches, "batches")
            for x in _ints(args.contexts, "contexts")]
    shape: dict[str, int] = {}
    if dev.type != "cuda":      # the interpreter: one tiny cell, small heads
        grid, shape = [(24, 40, 3, 70)], dict(heads=4, kv_heads=2, head_dim=32)
    header = common.device_environment(dev)
    emit(common.header_line(header))
    emit(f"policy: {args.policy}; {len(grid)} cells")
    rows: list[dict[str, Any]] = []
    for chunk, prefix, batch, context in grid:
        cell = Cell(dev, chunk, prefix, batch, context, **shape)
        base = {"chunk": chunk, "prefix": prefix, "decode batch": batch, "context": context,
                "decode split": pod_split(batch, cell.k.shape[2], context, device=dev)}
        rows.append(measure(cell, dev, args.policy, args.repeats, base))
        emit(common.markdown_table(rows[-1:]))
        del cell
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    totals = summary(rows)
    emit("\n" + common.markdown_table(rows))
    emit(common.markdown_table([totals]))
    if args.json:
        common.write_json(args.json, {"environment": header, "policy": args.policy,
                                      "rows": rows, "summary": totals})
    if args.plot:
        plot(args.plot, rows)
    return 0


def plot(path: str, rows: list[dict[str, Any]]) -> None:
    """Two heat maps (over back-to-back, over two streams): a row per (chunk, prefix), a
    column per (decode batch, context)."""
    plt = common.pyplot()

    ys = list(dict.fromkeys((r["chunk"], r["prefix"]) for r in rows))
    xs = list(dict.fromkeys((r["decode batch"], r["context"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(1.1 * len(xs) + 6, 0.45 * len(ys) + 2),
                             squeeze=False)
    for ax, key in zip(axes[0], ("vs back-to-back", "vs two streams"), strict=True):
        grid = [[math.nan] * len(xs) for _ in ys]
        for r in rows:
            grid[ys.index((r["chunk"], r["prefix"]))][xs.index((r["decode batch"],
                                                                r["context"]))] = r[key]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.8, vmax=1.4, aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(xs)), [f"b{b}\n{c // 1024}K" if c >= 1024 else f"b{b}\n{c}"
                                       for b, c in xs], fontsize=7)
        ax.set_yticks(range(len(ys)), [f"chunk {c}, prefix {p}" for c, p in ys], fontsize=7)
        ax.set_title(f"POD speedup {key}")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)
