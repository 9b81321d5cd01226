"""Probe: how long each prefill tile and decode split of `pod_attention` takes, by what
ran beside it on its SM.

Each cell is launched with its trace (`pod_attention(trace=...)`: every program's start,
end, SM, kind and unit) four ways: prefill only, decodes only, and fused under each
policy given. A unit's time in a fused launch is divided by the same unit's time in the
launch of its kind alone, where the SM's other program was of its own kind. The ratios
are grouped by what shared the SM during the unit: mostly (>= 80% of its time) the
other kind, mostly its own kind, mostly nothing, or a mix. The medians answer: does a
prefill tile slow down beside a decode split, and a decode split beside a prefill
tile, and by how much. Each launch is traced 5 times; a unit's time is its median.

    python3 benchmarks/trace_pod.py --json trace-pod.json
"""

from __future__ import annotations

import argparse
import functools
from collections import defaultdict
from typing import Any

import torch

from vattn.bench import common
from vattn.bench.pod import Cell
from vattn.kernels import pod_attention, pod_units

CELLS = [(1024, 4096, 32, 16384), (1024, 16384, 64, 16384), (2048, 0, 32, 4096),
         (1024, 0, 32, 4096)]
KINDS = ("prefill", "decode")


def traced(cell: Cell, prefill: bool, decode: bool, policy: str,
           repeats: int) -> list[torch.Tensor]:
    """The traces of `repeats` launches (after one untraced warm-up)."""
    qp, qd = cell.qp if prefill else cell.qp[:0], cell.qd if decode else cell.qd[:0]
    lens, slots = (cell.lens, cell.slots) if decode else (cell.lens[:0], None)
    units = sum(pod_units(qp.shape[0], qp.shape[1], qd.shape[0], cell.k.shape[2],
                          cell.context))

    def run(trace: torch.Tensor | None) -> None:
        pod_attention(qp, qd, cell.k, cell.v, 0, cell.prefix if prefill else 0, lens, slots,
                      policy=policy, max_decode_len=cell.context, trace=trace)

    run(None)
    out = []
    for _ in range(repeats + 1):
        trace = torch.zeros(units, 5, dtype=torch.int64, device="cuda")
        run(trace)
        torch.cuda.synchronize()
        out.append(trace.cpu())
    return out[1:]


def unit_times(traces: list[torch.Tensor]) -> dict[tuple[int, int], float]:
    """(kind, unit) -> median time in us over the launches."""
    times: dict[tuple[int, int], list[float]] = defaultdict(list)
    for trace in traces:
        for start, end, _, kind, unit in trace.tolist():
            times[(kind, unit)].append((end - start) / 1e3)
    return {key: common.median(values) for key, values in times.items()}


def neighbours(trace: torch.Tensor) -> dict[tuple[int, int], str]:
    """(kind, unit) -> what shared its SM for >= 80% of its time: "other kind", "own
    kind", "nothing", or "mixed"."""
    by_sm: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    for start, end, sm, kind, unit in trace.tolist():
        by_sm[sm].append((start, end, kind, unit))
    found = {}
    for rows in by_sm.values():
        for start, end, kind, unit in rows:
            span = max(end - start, 1)
            share = [0, 0]
            for s2, e2, k2, u2 in rows:
                if (k2, u2) != (kind, unit):
                    share[k2] += max(0, min(end, e2) - max(start, s2))
            other, own = share[1 - kind] / span, share[kind] / span
            found[(kind, unit)] = ("other kind" if other >= 0.8 and own < 0.2 else
                                   "own kind" if own >= 0.8 and other < 0.2 else
                                   "nothing" if own + other < 0.2 else "mixed")
    return found


def probe(shape: tuple[int, int, int, int], policies: list[str],
          repeats: int) -> list[dict[str, Any]]:
    chunk, prefix, batch, context = shape
    cell = Cell(torch.device("cuda"), chunk, prefix, batch, context)
    alone = {**unit_times(traced(cell, True, False, "50:50", repeats)),
             **unit_times(traced(cell, False, True, "50:50", repeats))}
    rows = []
    for policy in policies:
        traces = traced(cell, True, True, policy, repeats)
        fused = unit_times(traces)
        where = neighbours(traces[len(traces) // 2])
        groups: dict[tuple[int, str], list[float]] = defaultdict(list)
        for key, t in fused.items():
            groups[(key[0], where[key])].append(t / alone[key])
        span = common.median([(t[:, 1].max() - t[:, 0].min()).item() / 1e3 for t in traces])
        for (kind, beside), ratios in sorted(groups.items()):
            rows.append({"cell": f"c{chunk} p{prefix} b{batch} x{context}", "policy": policy,
                         "launch us": round(span, 1), "kind": KINDS[kind], "beside": beside,
                         "units": len(ratios),
                         "time / alone (median)": round(common.median(ratios), 2),
                         "p10": round(sorted(ratios)[len(ratios) // 10], 2),
                         "p90": round(sorted(ratios)[len(ratios) * 9 // 10], 2)})
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="50:50,paired")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    emit = functools.partial(print, flush=True)
    header = common.script_header("trace_pod", emit)
    rows = common.tables_per_cell(CELLS, lambda shape: probe(
        shape, args.policies.split(","), args.repeats), emit)
    if args.json:
        common.write_json(args.json, {"environment": header, "rows": rows})


if __name__ == "__main__":
    main()
