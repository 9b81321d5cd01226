"""Where do the slow iterations of `vattn bench overlap` come from?

Runs one case and layout of the overlap loop in rounds (premapped, background, ...),
records per iteration when the step call returned, when the forward was enqueued and
when the device finished, and records every mapper-thread job (start, end, pages). It
then prints the slowest iterations of each round with the mapper jobs that overlapped
them, so a spike can be told apart as host-side (enqueueing took long), device-side
(enqueue normal, device slow) and with or without mapper work in flight.

    python3 benchmarks/diagnose_overlap.py --case a --layout token_major --rounds 2
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from vattn.bench import common
from vattn.bench.overlap import CASES, HKV, D, DecodeLoop, _loop_bytes
from vattn.cache import VirtualKVCache
from vattn.config import resolve_device


def run(device: str, layout: str, key: str, mode: str, iterations: int) -> dict[str, Any]:
    case = CASES[key]
    with VirtualKVCache(num_layers=32, num_kv_heads=HKV, head_dim=D, dtype=torch.bfloat16,
                        max_batch_size=case.batch, max_context_len=case.context,
                        device=device, layout=layout) as cache:  # type: ignore[arg-type]
        lens = list(case.start)
        end = {s: n + iterations + 2 for s, n in enumerate(lens)}
        cache.grow_pool(_loop_bytes(cache, end))
        for _ in range(case.batch):
            cache.allocate()
        cache.step(end if mode == "premapped" else {s: n + 1 for s, n in enumerate(lens)})
        jobs: list[tuple[float, float, int]] = []
        execute = cache._execute

        def traced(plan: Any, *args: Any) -> None:
            t0 = time.perf_counter()
            try:
                execute(plan, *args)
            finally:
                pages = sum(r.num_pages for r in plan.grow) * cache.layout.num_tensors
                jobs.append((t0, time.perf_counter(), pages))

        cache._execute = traced  # type: ignore[method-assign]
        loop = DecodeLoop(cache, case, resolve_device(device))
        for _ in range(3):
            loop.forward()
            loop.lens -= 1
        torch.cuda.synchronize()
        created = cache.stats().pages_created
        marks: list[tuple[float, float, float, float]] = []
        with common.frozen_gc():
            for _ in range(iterations):
                start = time.perf_counter()
                cache.step_async({s: n + 2 for s, n in enumerate(lens)})
                called = time.perf_counter()
                loop.forward()
                launched = time.perf_counter()
                torch.cuda.synchronize()
                marks.append((start, called, launched, time.perf_counter()))
                lens = [n + 1 for n in lens]
        cache.wait()
        created = cache.stats().pages_created - created
    return {"marks": marks, "jobs": jobs, "created_in_loop": created}


def report(label: str, r: dict[str, Any], top: int) -> None:
    marks, jobs = r["marks"], r["jobs"]
    it = [m[3] - m[0] for m in marks]
    launch = [m[2] - m[1] for m in marks]
    busy = [j for j in jobs if j[2] > 0]
    print(f"\n## {label}: p50 {common.median(it) * 1e3:.3f} ms, p99.9 "
          f"{common.percentile(it, 99.9) * 1e3:.3f} ms, max {max(it) * 1e3:.3f} ms; "
          f"enqueue p50 {common.median(launch) * 1e3:.3f} ms; mapper jobs {len(jobs)} "
          f"({len(busy)} mapping, {sum(j[2] for j in busy)} pages); "
          f"pages created in loop {r['created_in_loop']}")
    with_jobs = {i for i, m in enumerate(marks) for j in busy if j[0] < m[3] and j[1] > m[0]}
    if with_jobs:
        rest = [t for i, t in enumerate(it) if i not in with_jobs]
        print(f"iterations overlapping a mapping job: {len(with_jobs)}, p50 "
              f"{common.median([it[i] for i in with_jobs]) * 1e3:.3f} ms; others p50 "
              f"{common.median(rest) * 1e3:.3f} ms, p99.9 "
              f"{common.percentile(rest, 99.9) * 1e3:.3f} ms")
    print("| iter | ms | step us | enqueue ms | device wait ms | mapper jobs overlapping "
          "(start offset ms, ms, pages) |")
    print("|---|---|---|---|---|---|")
    for i in sorted(range(len(it)), key=it.__getitem__, reverse=True)[:top]:
        s, c, lch, e = marks[i]
        over = [f"({(j[0] - s) * 1e3:+.2f}, {(j[1] - j[0]) * 1e3:.2f}, {j[2]})"
                for j in jobs if j[0] < e and j[1] > s]
        print(f"| {i} | {it[i] * 1e3:.3f} | {(c - s) * 1e6:.0f} | {(lch - c) * 1e3:.3f} | "
              f"{(e - lch) * 1e3:.3f} | {' '.join(over) or '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--case", default="a", choices=sorted(CASES))
    parser.add_argument("--layout", default="token_major")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    iterations = args.iterations or CASES[args.case].iterations
    results = {}
    for round_ in range(args.rounds):
        for mode in ("premapped", "background"):
            label = f"{args.case} {args.layout} {mode} round {round_ + 1}"
            results[label] = run(args.device, args.layout, args.case, mode, iterations)
            report(label, results[label], args.top)
    if args.json:
        common.write_json(args.json, results)


if __name__ == "__main__":
    main()
