"""Sweep `pod_attention`'s tiling on a few hybrid batches of `vattn bench pod`: per
tiling, its two halves alone (prefill only, decodes only) and the fused launch under
each policy, GPU time from CUDA-graph replays, next to the best separate kernels of
each kind.

Each tiling's outputs are checked against the default tiling's before they are timed.

    python3 benchmarks/tune_pod.py --json tune-pod.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from typing import Any

import torch
import triton

from vattn.bench import common
from vattn.bench.pod import Cell
from vattn.kernels.pod import PodTiling, _pod_kernel, pod_attention, pod_split

# (chunk, prefix, decode batch, context): prefill-heavy, balanced, decode-heavy
CELLS = [(2048, 16384, 8, 4096), (1024, 4096, 32, 16384), (512, 0, 64, 16384),
         (1024, 0, 8, 4096)]


def tilings(grid: str, splits: tuple[int, ...] = (2048, 4096, 8192)) -> list[PodTiling]:
    """``full``: prefill K/V tile x decode K/V tile x stages, then the decode split, at
    64-token query blocks and 4 warps (8 warps and 128-token query blocks, uncapped,
    lose: one program per SM; ``wide`` caps them); ``stages``: the decode split's
    pipelining depth (1, 2, and the default 3); ``occupancy``: bulk-copied (TMA) tiles,
    and footprints capped so that three or four programs fit on an SM (32-token tiles,
    ``max_registers``);
    ``decode-tile``: 32- and 128-token decode tiles (128 also with 2 stages), at the
    split from the shape; ``shift``: TMA boxes that cross a length shifted back
    (`PodTiling.tma_shift`, the default) against copied whole; ``split``: decode splits
    of `splits` tokens (``--splits``; ``split=None`` picks one from the shape,
    `PodTiling.split_for`; 1024 was never more than 0.9% ahead of 2048 in the ``full``
    sweep); ``wide``: 8 warps, with 128-token query blocks, capped at 128 registers a
    thread so that two programs (16 warps) still fit on an SM, with 32-token prefill K/V
    tiles (64-token ones spill at that cap), 3 or 2 stages, 64- or 32-token decode
    tiles; ``quick``: the default only."""
    if grid == "quick":
        return [PodTiling()]
    if grid == "split":
        return [PodTiling(split=s) for s in splits]
    if grid == "decode-tile":
        return [PodTiling(decode_block_n=32), PodTiling(decode_block_n=128),
                PodTiling(decode_block_n=128, decode_stages=2)]
    if grid == "shift":
        return [PodTiling(tma=True, tma_shift=False), PodTiling(tma=True)]
    if grid == "occupancy":
        short = PodTiling(block_n=32, decode_block_n=32, tma=False)
        return [PodTiling(tma=False), PodTiling(tma=True), short,
                dataclasses.replace(short, max_registers=168),
                dataclasses.replace(short, max_registers=168, tma=True),
                dataclasses.replace(short, num_stages=2, max_registers=128),
                dataclasses.replace(short, num_stages=2, max_registers=128, tma=True)]
    if grid == "wide":
        wide = PodTiling(block_m=128, block_n=32, num_warps=8, max_registers=128)
        return [PodTiling(), wide, dataclasses.replace(wide, num_stages=2),
                dataclasses.replace(wide, decode_block_n=32)]
    if grid == "stages":
        return [PodTiling(decode_stages=1), PodTiling(decode_stages=2)]
    return [PodTiling(block_n=n, decode_block_n=nd, num_stages=st)
            for n, nd, st in ((64, 32, 3), (64, 64, 3), (64, 128, 3), (64, 128, 2),
                              (32, 64, 4), (32, 64, 3))] + [
        PodTiling(split=s) for s in (1024, 4096)]


def _name(t: PodTiling) -> str:
    return (f"m{t.block_m} n{t.block_n} nd{t.decode_block_n} s{t.split or 'auto'} "
            f"w{t.num_warps} "
            f"st{t.num_stages}" + (f" dst{t.decode_stages}" if t.decode_stages else "")
            + {None: "", True: " tma", False: " no-tma"}[t.tma]
            + (" shift" if t.tma_shift else "")
            + (f" r{t.max_registers}" if t.max_registers else ""))


def _graph_us(fn: Any, repeats: int) -> float:
    return round(common.median(common.graph_times([fn], repeats)) * 1e6, 1)


def sweep(cell_shape: tuple[int, int, int, int], configs: list[PodTiling],
          policies: list[str], repeats: int) -> list[dict[str, Any]]:
    chunk, prefix, batch, context = cell_shape
    cell = Cell(torch.device("cuda"), chunk, prefix, batch, context)
    base = {"cell": f"c{chunk} p{prefix} b{batch} x{context}",
            "split from the shape": pod_split(batch, cell.k.shape[2], context)}
    best_p = min((_graph_us(fn, repeats), name) for name, fn in cell.prefill_kernels().items())
    best_d = min((_graph_us(fn, repeats), name) for name, fn in cell.decode_kernels().items())
    ref_p, ref_d = (o.float() for o in pod_attention(
        cell.qp, cell.qd, cell.k, cell.v, 0, prefix, cell.lens, cell.slots))
    rows = []
    seen = set()
    for tiling in configs:
        # Splits at or past the cell's context all run one unit a decode: time the first.
        whole = tiling.split is not None and tiling.split >= context
        key = _name(tiling).replace(f" s{tiling.split} ", " s-whole ") if whole else _name(tiling)
        if key in seen:
            print(f"{base['cell']} {_name(tiling)}: as {key}, not timed again", flush=True)
            continue
        seen.add(key)
        compiled = common.compiled_footprints(_pod_kernel)
        try:
            got_p, got_d = pod_attention(cell.qp, cell.qd, cell.k, cell.v, 0, prefix,
                                         cell.lens, cell.slots, tiling=tiling,
                                         max_decode_len=context)
        except triton.runtime.errors.OutOfResources as exc:
            print(f"{base['cell']} {_name(tiling)}: {exc}", flush=True)
            continue
        for ref, got in ((ref_p, got_p), (ref_d, got_d)):
            error = ((got.float() - ref).norm() / ref.norm()).item()
            if not error < 1e-2:
                raise AssertionError(f"{base['cell']} {tiling}: relative error {error}")

        def prefill(t: PodTiling = tiling) -> object:
            return pod_attention(cell.qp, cell.qd[:0], cell.k, cell.v, 0, prefix,
                                 cell.lens[:0], tiling=t)

        def decode(t: PodTiling = tiling) -> object:
            return pod_attention(cell.qp[:0], cell.qd, cell.k, cell.v, 0, 0, cell.lens,
                                 cell.slots, tiling=t, max_decode_len=context)

        footprint = common.newly_compiled(_pod_kernel, compiled)
        print(f"{base['cell']} {_name(tiling)}: {footprint or 'compiled before'}", flush=True)
        t_p, t_d = _graph_us(prefill, repeats), _graph_us(decode, repeats)
        for named in policies:     # "partitioned:0.4": that share of SMs decode first
            policy, share = (named.split(":") if named.startswith("partitioned:")
                             else (named, ""))
            t_fused = dataclasses.replace(tiling, decode_sms=float(share)) if share else tiling

            def fused(t: PodTiling = t_fused, policy: str = policy) -> object:
                return pod_attention(cell.qp, cell.qd, cell.k, cell.v, 0, prefix, cell.lens,
                                     cell.slots, policy=policy, tiling=t,  # type: ignore[arg-type]
                                     max_decode_len=context)

            t_pod = _graph_us(fused, repeats)
            rows.append({**base, "tiling": _name(tiling), "policy": named, "pod us": t_pod,
                         "pod prefill us": t_p, "pod decode us": t_d,
                         "vs own halves": round((t_p + t_d) / t_pod, 3),
                         "own ideal": round((t_p + t_d) / max(t_p, t_d), 3),
                         "best prefill us": f"{best_p[0]} {best_p[1]}",
                         "best decode us": f"{best_d[0]} {best_d[1]}",
                         "vs serial": round((best_p[0] + best_d[0]) / t_pod, 3)})
    torch.cuda.empty_cache()
    return rows


def _cells(text: str | None) -> list[tuple[int, int, int, int]]:
    if text is None:
        return CELLS
    if text == "grid":
        return list(itertools.product((512, 1024, 2048), (0, 4096, 16384), (8, 32, 64),
                                      (4096, 16384)))
    cells = [tuple(int(v) for v in cell.split(":")) for cell in text.split(",")]
    if any(len(cell) != 4 for cell in cells):
        raise SystemExit(f"--cells: CHUNK:PREFIX:BATCH:CONTEXT,..., got {text!r}")
    return cells  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="full",
                        choices=("full", "stages", "occupancy", "shift", "split", "decode-tile",
                                 "wide", "quick"))
    parser.add_argument("--policies", default="proportional,50:50")
    parser.add_argument("--splits", default="2048,4096,8192",
                        help="--grid split: the decode splits timed, in tokens")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cells", default=None,
                        help="'grid' (every cell of `vattn bench pod`) or "
                             "CHUNK:PREFIX:BATCH:CONTEXT,...; default four cells")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        splits = tuple(int(v) for v in args.splits.split(","))
    except ValueError:
        splits = ()
    if not splits or any(s <= 0 for s in splits):
        raise SystemExit(f"--splits: positive token counts, got {args.splits!r}")
    emit = functools.partial(print, flush=True)
    header = common.script_header("tune_pod", emit)
    configs = tilings(args.grid, splits)
    if PodTiling() not in configs:
        configs.append(PodTiling())
    done: list[dict[str, Any]] = []

    def measure(shape: tuple[int, int, int, int]) -> list[dict[str, Any]]:
        rows = sorted(sweep(shape, configs, args.policies.split(","), args.repeats),
                      key=lambda r: r["pod us"])
        done.extend(rows)
        if args.json:   # after every cell, so that a run cut short keeps what it timed
            common.write_json(args.json, {"environment": header, "rows": done})
        return rows

    common.tables_per_cell(_cells(args.cells), measure, emit)


if __name__ == "__main__":
    main()
