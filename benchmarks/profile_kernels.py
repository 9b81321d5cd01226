"""Probe: one launch of each kernel whose gap issues 5 and 6 leave open, for Nsight
Compute to read the hardware counters of.

Every kernel is run (compiled, warmed) first; then one launch of each, in the order
printed, is bracketed by ``cudaProfilerStart`` / ``cudaProfilerStop``, so that
``ncu --profile-from-start off`` profiles exactly those:

- ``pod``: the balanced cell of the traces (chunk 1024 over a 4K prefix, 32 decodes at
  16K): the prefill half alone, the decode half alone, fused under ``50:50`` and
  ``paired``, and `decode_attention` on the same decodes;
- ``decode``: `decode_attention` at batch 8, unequal lengths (the bench's), on a
  `per_layer` and on a `token_major` cache (2 layers: ncu saves and restores memory);
- ``short``: `decode_attention` in case (a) (batch 1, 16 / 2 heads, head dim 128) at
  512, 4K, 8K, 16K and 64K tokens on a `per_layer` cache: its split and merge launches.

    ncu --profile-from-start off --clock-control none --section WarpStateStats \\
        python3 benchmarks/profile_kernels.py pod decode
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch

from vattn.bench.decode import Workload
from vattn.bench.pod import Cell
from vattn.kernels import decode_attention, pod_attention
from vattn.kernels.pod import Policy


def pod_launches() -> list[tuple[str, Callable[[], object]]]:
    """The launches (their closures hold the cell)."""
    cell = Cell(torch.device("cuda"), 1024, 4096, 32, 16384)

    def fused(policy: Policy) -> Callable[[], object]:
        return lambda: pod_attention(cell.qp, cell.qd, cell.k, cell.v, 0, cell.prefix,
                                     cell.lens, cell.slots, policy=policy,
                                     max_decode_len=cell.context)

    return [
        ("pod: prefill half alone", lambda: pod_attention(
            cell.qp, cell.qd[:0], cell.k, cell.v, 0, cell.prefix, cell.lens[:0])),
        ("pod: decode half alone", lambda: pod_attention(
            cell.qp[:0], cell.qd, cell.k, cell.v, 0, 0, cell.lens, cell.slots,
            max_decode_len=cell.context)),
        ("pod: fused 50:50", fused("50:50")),
        ("pod: fused paired", fused("paired")),
        ("pod: decode_attention on the same decodes", lambda: decode_attention(
            cell.qd, cell.k, cell.v, cell.lens, cell.slots)),
    ]


def decode_launches() -> tuple[list[tuple[str, Callable[[], object]]], list[Workload]]:
    lengths = torch.randint(1, 16385, (8,), generator=torch.Generator().manual_seed(8))
    found: list[tuple[str, Callable[[], object]]] = []
    kept = []
    for layout in ("per_layer", "token_major"):
        w = Workload("cuda", layout, 32, 8, 128, lengths.tolist(), 2)
        space = torch.zeros(8 * 8, dtype=torch.int32, device="cuda")
        found.append((f"decode b8 unequal, {layout}",
                      functools.partial(decode_attention, w.q, *w.cache.kv(1), w.lens,
                                        workspace=space)))
        kept.append(w)
    return found, kept


def short_launches() -> tuple[list[tuple[str, Callable[[], object]]], list[Workload]]:
    found: list[tuple[str, Callable[[], object]]] = []
    kept = []
    for context in (512, 4096, 8192, 16384, 65536):
        w = Workload("cuda", "per_layer", 16, 2, 128, [context], 2)
        space = torch.zeros(2, dtype=torch.int32, device="cuda")
        found.append((f"decode case a, {context} tokens",
                      functools.partial(decode_attention, w.q, *w.cache.kv(1), w.lens,
                                        workspace=space)))
        kept.append(w)
    return found, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("subjects", nargs="+", choices=("pod", "decode", "short"))
    args = parser.parse_args()
    launches: list[tuple[str, Callable[[], object]]] = []
    workloads: list[Workload] = []
    for subject in args.subjects:
        if subject == "pod":
            launches += pod_launches()
        else:
            found, kept = decode_launches() if subject == "decode" else short_launches()
            launches += found
            workloads += kept
    for _, fn in launches:          # compile and warm, unprofiled
        fn()
        fn()
    torch.cuda.synchronize()
    cudart = torch.cuda.cudart()
    cudart.cudaProfilerStart()
    for i, (name, fn) in enumerate(launches):
        print(f"profiled launch {i}: {name}", flush=True)
        fn()
        torch.cuda.synchronize()
    cudart.cudaProfilerStop()
    for w in workloads:
        w.close()


if __name__ == "__main__":
    main()
