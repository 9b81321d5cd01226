"""Sweep the decode kernel's tiling (tokens per tile, warps, stages, programs per SM) on
the shapes of `vattn bench decode`, GPU time from CUDA-graph replays over a cold L2.

With ``--token-major 32`` the K/V are the per-layer views of one
``[B, context, 32, Hkv, D]`` tensor each, the strides of the `token_major` layout. With
``--cache LAYOUT`` they are a `VirtualKVCache`'s own layers, built as `vattn bench
decode` builds them, with its lengths (unequal: its seed): where dense tensors land
moves their times by 11-12% (docs/benchmarks.md), the cache's do not.

Each configuration's output is checked against the default tiling's before it is timed.
Prints one Markdown table per shape (fastest first) and a summary of the best tiling
against the one a plain call launches with (`tiling_for` of the shape; timed too where
the grid lacks it); ``--json PATH`` keeps every timing.

    python3 benchmarks/tune_decode.py --json tune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from typing import Any

import torch

from vattn.bench import common
from vattn.bench.decode import Workload, layers_for_cold_l2
from vattn.kernels.decode import (
    Tiling,
    _sm_count,
    _split_kernel,
    check_inputs,
    default_tiling,
    launch,
    tiling_for,
)
from vattn.kernels.paged import paged_tiling, paged_tiling_for

# (name, batch, query heads, KV heads, head dim, context, equal lengths)
SHAPES = [("a-512", 1, 16, 2, 128, 512, True), ("a-1k", 1, 16, 2, 128, 1024, True),
          ("a-2k", 1, 16, 2, 128, 2048, True), ("a-4k", 1, 16, 2, 128, 4096, True),
          ("a-8k", 1, 16, 2, 128, 8192, True), ("a-16k", 1, 16, 2, 128, 16384, True),
          ("a-32k", 1, 16, 2, 128, 32768, True),
          ("a-64k", 1, 16, 2, 128, 65536, True), ("a-512-b2", 2, 16, 2, 128, 512, True),
          ("a-1k-b4", 4, 16, 2, 128, 1024, True), ("a-2k-b2", 2, 16, 2, 128, 2048, True),
          ("b-1-2k", 1, 32, 8, 128, 2048, True), ("b-1", 1, 32, 8, 128, 16384, True),
          ("b-4", 4, 32, 8, 128, 16384, True),
          ("b-2-unequal", 2, 32, 8, 128, 16384, False),
          ("b-4-unequal", 4, 32, 8, 128, 16384, False), ("b-8", 8, 32, 8, 128, 16384, True),
          ("b-16", 16, 32, 8, 128, 16384, True),
          ("b-8-unequal", 8, 32, 8, 128, 16384, False),
          ("b-16-unequal", 16, 32, 8, 128, 16384, False), ("b-32", 32, 32, 8, 128, 16384, True),
          ("b-32-unequal", 32, 32, 8, 128, 16384, False),
          ("a-16k-d256", 1, 16, 2, 256, 16384, True), ("b-8-d256", 8, 32, 8, 256, 16384, True),
          ("b-8-unequal-d256", 8, 32, 8, 256, 16384, False)]


def tilings(grid: str) -> list[Tiling]:
    """("The default" below is `default_tiling(128)`.) ``full``: tile tokens x warps x
    stages x programs per SM; ``runs``: the shortest run (tiles) for the two best of the
    full sweep; ``paged``: tile tokens x stages x programs per SM for the paged twin;
    ``reduction``: two tilings, each with the merge in the split launch and in a second
    launch; ``flat``: two tilings, each with a loop per request and with one flat loop
    (`Tiling.flat`), timed in the order A B B A so that a drift of the clock hits both
    alike (the faster of a tiling's two timings counts); ``pair``: the default and
    64-token tiles at two programs an SM, A B B A; ``layout``: the default and six
    neighbours of it, A B ... B A; ``pdl``: the default and 64-token tiles at two
    programs an SM, each with and without programmatic dependent launch, A B B A;
    ``short``: small tiles and many programs per SM (tile tokens x programs per SM x
    partials a merge program loads at once), the merge in a second launch, for case (a);
    ``tile``: the default at 128, 64, 32 and 16 tokens a tile, A B C D D C B A;
    ``short-tiles``: warps and stages around the 64- and 32-token tiles that
    `tiling_for` picks for small launches, A B ... B A; ``merge``: the default, and the
    default with 32 partials a merge program loads at once (the old merge), each with
    the merge where `merges_in_launch` puts it and in a second launch, A B B A;
    ``d256``: head dim 256's default (4 warps, two programs an SM), the 8-warp tiling
    it replaced (one program an SM, whose registers fit only one) and the same with
    runs for two (two waves), and two more 4-warp tilings, A B C D E E D C B A;
    ``rowcost``: the default and 64-token tiles at two programs an SM, each with runs of
    equal tiles and with a request's start counted as tiles (`Tiling.row_cost`: 1 and
    2 tiles of 128 tokens, 2 and 4 of 64), A B ... B A; ``paged-rowcost``: the paged
    twin's tiling with 0, 1 and 2 (with ``--paged``), A B C C B A; ``quick``: the
    default only."""
    if grid == "quick":
        return [default_tiling(128)]
    if grid == "paged-rowcost":
        around = [dataclasses.replace(paged_tiling(128), row_cost=c) for c in (0, 1, 2)]
        return around + around[::-1]
    if grid == "rowcost":
        wide = Tiling(block_n=64, num_warps=4, num_stages=3, programs_per_sm=2)
        around = [dataclasses.replace(t, row_cost=c)
                  for t, costs in ((default_tiling(128), (0, 1, 2)), (wide, (0, 2, 4)))
                  for c in costs]
        return around + around[::-1]
    if grid == "d256":
        eight = Tiling(block_n=32, num_warps=8, num_stages=2, programs_per_sm=1)
        near = [default_tiling(256), eight, dataclasses.replace(eight, programs_per_sm=2)]
        near += [Tiling(block_n=n, num_warps=4, num_stages=2, programs_per_sm=2)
                 for n in (32, 64)]
        return near + near[::-1]
    if grid == "tile":
        tiles = [dataclasses.replace(default_tiling(128), block_n=n) for n in (128, 64, 32, 16)]
        return tiles + tiles[::-1]
    if grid == "short-tiles":
        near = [Tiling(block_n=n, num_warps=w, num_stages=s, programs_per_sm=1)
                for n, w, s in ((64, 4, 3), (64, 4, 4), (64, 8, 3), (64, 4, 2), (32, 4, 3),
                                (32, 2, 3), (32, 4, 2), (32, 8, 3))]
        return near + near[::-1]
    if grid == "layout":
        around = [default_tiling(128)] + [
            Tiling(block_n=n, num_warps=w, num_stages=s, programs_per_sm=p)
            for n, w, s, p in ((64, 4, 3, 2), (64, 4, 4, 2), (128, 4, 2, 2), (64, 4, 3, 1),
                               (128, 8, 3, 1), (32, 4, 4, 4))]
        return around + around[::-1]
    if grid == "short":
        return [Tiling(block_n=n, num_warps=4, num_stages=3, programs_per_sm=p,
                       fused_reduction=False, merge_block=b)
                for n, p, b in itertools.product((32, 64, 128), (1, 2, 4), (32, 128))]
    if grid == "merge":
        plain = [default_tiling(128), dataclasses.replace(default_tiling(128), merge_block=32)]
        return [t for a in plain for t in (a, dataclasses.replace(a, fused_reduction=False),
                                           dataclasses.replace(a, fused_reduction=False), a)]
    if grid == "pdl":
        plain = [default_tiling(128), Tiling(block_n=64, num_warps=4, num_stages=3,
                                             programs_per_sm=2)]
        return [t for a in plain for t in (a, dataclasses.replace(a, pdl=False),
                                           dataclasses.replace(a, pdl=False), a)]
    if grid == "pair":
        a, b = default_tiling(128), Tiling(block_n=64, num_warps=4, num_stages=3,
                                           programs_per_sm=2)
        return [a, b, b, a]
    if grid == "flat":
        pairs = [(dataclasses.replace(t, flat=False, row_cost=0),
                  dataclasses.replace(t, flat=True, row_cost=0))
                 for t in (default_tiling(128), Tiling(block_n=64, num_warps=4,
                                                       num_stages=3, programs_per_sm=2))]
        return [t for a, b in pairs for t in (a, b, b, a)]
    if grid == "reduction":
        return [dataclasses.replace(t, fused_reduction=fused)
                for t in (default_tiling(128), Tiling(block_n=64, num_warps=4, num_stages=3,
                                                      programs_per_sm=2))
                for fused in (None, True, False)]
    if grid == "paged":
        return [Tiling(block_n=n, num_warps=4, num_stages=s, programs_per_sm=p)
                for n, s, p in itertools.product((16, 32, 64, 128), (2, 3), (1, 2))]
    if grid == "runs":
        return [Tiling(block_n=n, num_warps=4, num_stages=s, programs_per_sm=1,
                       min_blocks_per_run=m)
                for (n, s), m in itertools.product(((128, 3), (64, 4)), (1, 2, 4, 8, 16))]
    return [Tiling(block_n=n, num_warps=w, num_stages=s, programs_per_sm=p)
            for n, w, s, p in itertools.product((64, 128), (4, 8), (2, 3, 4), (1, 2, 4))]


def _name(t: Tiling) -> str:
    return (f"n{t.block_n} w{t.num_warps} s{t.num_stages} p{t.programs_per_sm} "
            f"m{t.min_blocks_per_run}"
            + {None: "", True: " fused", False: " two-launch"}[t.fused_reduction]
            + (" flat" if t.flat else "") + ("" if t.pdl else " no-pdl")
            + ("" if t.merge_block == 128 else f" merge{t.merge_block}")
            + (f" rowcost{t.row_cost}" if t.row_cost else ""))


def sweep(shape: tuple[Any, ...], configs: list[Tiling], repeats: int,
          block_size: int, token_major: int = 0,
          workspace_too: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """Time every tiling on one shape: the dense kernel, or with `block_size` the paged
    twin on the same K/V copied into shuffled blocks; with `token_major` layers, on
    layer views of token-major tensors. `workspace_too`: each fused tiling also with
    one zeroed workspace reused by every call (no memset per call). `seed` moves the
    draw of the inputs (and of unequal lengths) off the shape's own."""
    name, batch, num_q, num_kv, head_dim, context, equal = shape
    gen = torch.Generator(device="cuda").manual_seed(batch * 7 + context + 1000 * seed)
    lengths = (torch.full((batch,), context, device="cuda") if equal else
               torch.randint(1, context + 1, (batch,), device="cuda", generator=gen))
    lens = lengths.int()
    kv_bytes = 2 * int(lengths.sum()) * num_kv * head_dim * 2
    layers = layers_for_cold_l2(kv_bytes, 2)
    if token_major:
        if block_size or layers > token_major:
            raise SystemExit(f"--token-major {token_major}: needs the dense kernel and at "
                             f"least {layers} layers")
        whole = torch.empty(2, batch, context, token_major, num_kv, head_dim, device="cuda",
                            dtype=torch.bfloat16)
        kv = [whole[:, :, :, i] for i in range(layers)]   # only these layers are read
        for pair in kv:
            pair.copy_(torch.randn(pair.shape, device="cuda", generator=gen,
                                   dtype=torch.bfloat16))
    else:
        kv = [torch.randn(2, batch, context, num_kv, head_dim, device="cuda", generator=gen,
                          dtype=torch.bfloat16) for _ in range(layers)]
    q = torch.randn(batch, num_q, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    check_inputs(q, kv[0][0], kv[0][1], lens, None, None)

    expected = launch(q, kv[0][0], kv[0][1], lens, None, None, None, 0, batch, context,
                      None, None, None, default_tiling(head_dim)).float()
    table = None
    if block_size:
        per_row = context // block_size
        table = torch.randperm(batch * per_row, device="cuda", generator=gen).int()
        table = table.view(batch, per_row)
        for i, pair in enumerate(kv):
            blocks = torch.empty_like(pair).view(2, batch * per_row, block_size, num_kv,
                                                 head_dim)
            blocks[:, table.flatten().long()] = pair.reshape(blocks.shape)
            kv[i] = blocks

    def call(layer: int, tiling: Tiling, workspace: torch.Tensor | None = None) -> torch.Tensor:
        k, v = kv[layer]
        return launch(q, k, v, lens, None, None, table, block_size, k.shape[0], context,
                      None, None, None, tiling, workspace)

    workspace = torch.zeros(batch * num_kv, dtype=torch.int32, device="cuda")
    runs = [(t, None) for t in configs] + [
        (t, workspace) for t in configs if workspace_too and t.fused_reduction is not False]
    rows = []
    for tiling, space in runs:
        compiled = common.compiled_footprints(_split_kernel)
        got = call(0, tiling, space).float()
        footprint = common.newly_compiled(_split_kernel, compiled)
        error = ((got - expected).norm() / expected.norm()).item()
        if not error < 1e-2:
            raise AssertionError(f"{name} {tiling}: relative error {error} against default")
        seconds = common.median(common.graph_times(
            [functools.partial(call, layer, tiling=tiling, workspace=space)
             for layer in range(layers)], repeats))
        if space is not None and space.any():
            raise AssertionError(f"{name} {tiling}: the workspace was not left at zero")
        rows.append({"shape": name, "block": block_size or "dense",
                     "layout": "token_major" if token_major else "plain",
                     "tiling": _name(tiling) + (" workspace" if space is not None else ""),
                     "us": round(seconds * 1e6, 1),
                     "TB/s": round(kv_bytes / seconds / 1e12, 2),
                     "compiled": footprint or "before"})
    return rows


def sweep_cache(shape: tuple[Any, ...], configs: list[Tiling], repeats: int,
                layout: str, seed: int = 0) -> list[dict[str, Any]]:
    """`sweep` on the layers of a `VirtualKVCache` in `layout`, built as `vattn bench
    decode` builds it: case b with 32 layers and unequal lengths seeded by the batch
    (plus ``1000 * seed``: 0 is the bench's draw), case a with enough layers for a cold
    L2."""
    name, batch, num_q, num_kv, head_dim, context, equal = shape
    gen = torch.Generator().manual_seed(batch + 1000 * seed)
    lengths = ([context] * batch if equal else
               torch.randint(1, context + 1, (batch,), generator=gen).tolist())
    layers = (32 if name.startswith("b-") else
              layers_for_cold_l2(2 * context * num_kv * head_dim * 2, 4))
    w = Workload("cuda", layout, num_q, num_kv, head_dim, lengths, layers)
    try:
        q, lens, cache = w.q, w.lens, w.cache
        expected = launch(q, *cache.kv(0), lens, None, None, None, 0, batch, context, None,
                          None, None, default_tiling(head_dim)).float()
        workspace = torch.zeros(batch * num_kv, dtype=torch.int32, device="cuda")

        def call(layer: int, tiling: Tiling) -> torch.Tensor:
            return launch(q, *cache.kv(layer), lens, None, None, None, 0, batch, context,
                          None, None, None, tiling, workspace)

        rows = []
        for tiling in configs:
            error = ((call(0, tiling).float() - expected).norm() / expected.norm()).item()
            if not error < 1e-2:
                raise AssertionError(f"{name} {tiling}: relative error {error} against "
                                     f"default")
            seconds = common.median(common.graph_times(
                [functools.partial(call, layer, tiling) for layer in range(layers)],
                repeats))
            rows.append({"shape": name, "block": "dense", "layout": f"cache {layout}",
                         "tiling": _name(tiling), "us": round(seconds * 1e6, 1),
                         "TB/s": round(w.kv_bytes / seconds / 1e12, 2)})
        return rows
    finally:
        w.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--grid", choices=("full", "runs", "paged", "reduction", "flat",
                                           "pair", "layout", "pdl", "short", "merge", "tile",
                                           "short-tiles", "d256", "rowcost", "paged-rowcost",
                                           "quick"),
                        default="full")
    parser.add_argument("--allocations", type=int, default=1, metavar="N",
                        help="sweep each shape N times, on K/V allocated afresh each time "
                        "behind a spacer of another size (other addresses and pages)")
    parser.add_argument("--paged", type=int, default=0,
                        help="time the paged twin at this block size (0: the dense kernel)")
    parser.add_argument("--token-major", type=int, default=0, metavar="LAYERS",
                        help="K/V as layer views of [B, context, LAYERS, Hkv, D] tensors")
    parser.add_argument("--cache", choices=("per_layer", "token_major"), default=None,
                        help="time on a VirtualKVCache in this layout")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="sweep each shape of unequal lengths on N draws of them")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.cache and (args.paged or args.token_major or args.allocations > 1):
        raise SystemExit("--cache takes the dense kernel on the cache's own layers: "
                         "no --paged, --token-major or --allocations")
    common.require_cuda(torch.device("cuda"), "tune_decode")
    header = common.device_environment(torch.device("cuda"))
    print(common.header_line(header))
    configs = tilings(args.grid)
    sms = _sm_count(torch.device("cuda", torch.cuda.current_device()))
    wanted = args.shapes.split(",")
    rows: list[dict[str, Any]] = []
    summary = []
    if min(args.allocations, args.seeds) < 1:
        raise SystemExit(f"--allocations and --seeds must be >= 1, got {args.allocations} "
                         f"and {args.seeds}")
    for shape in (s for s in SHAPES if s[0] in wanted):
        _, batch, _, kv_heads, head_dim, context, equal = shape
        # What a plain call launches with: the baseline of the summary, timed if absent.
        default = (paged_tiling_for if args.paged else tiling_for)(
            head_dim, batch, kv_heads, context, sms)
        configs_here = configs if default in configs else [*configs, default]
        draws = 1 if equal else args.seeds      # equal lengths: one draw
        for seed in range(draws):
            timed = []
            for allocation in range(args.allocations):
                spacer = torch.empty((2 * allocation + 1) << 26, dtype=torch.uint8,
                                     device="cuda")
                if args.cache:
                    again = sweep_cache(shape, configs_here, args.repeats, args.cache, seed)
                else:
                    again = sweep(shape, configs_here, args.repeats, args.paged,
                                  args.token_major, args.grid == "reduction", seed)
                del spacer
                torch.cuda.empty_cache()
                for row in again:
                    row["allocation"] = allocation
                    row["seed"] = seed
                if args.allocations > 1:
                    print(f"\n{shape[0]}, allocation {allocation}\n" + common.markdown_table(
                        sorted(again, key=lambda r: r["us"])), flush=True)
                timed += again
            rows += timed
            best: dict[str, dict[str, Any]] = {}   # a tiling timed twice: its faster timing
            for row in timed:
                if row["tiling"] not in best or row["us"] < best[row["tiling"]]["us"]:
                    best[row["tiling"]] = row
            mine = sorted(best.values(), key=lambda r: r["us"])
            label = shape[0] + (f", seed {seed}" if draws > 1 else "")
            print(f"\n{label}\n" + common.markdown_table(mine[:8]), flush=True)
            base = next(r for r in mine if r["tiling"] == _name(default))
            summary.append({"shape": label, "default us": base["us"],
                            "best us": mine[0]["us"], "best": mine[0]["tiling"],
                            "default/best": f"{base['us'] / mine[0]['us']:.2f}"})
    print("\n" + common.markdown_table(summary))
    if args.json:
        common.write_json(args.json, {"environment": header, "rows": rows,
                                      "summary": summary})


if __name__ == "__main__":
    main()
