"""Where the time of a no-op `step_async` goes inside the decode loop (diagnostic).

Between two calls the forward pass and the device wait evict the allocator's objects
from the host's caches, so the first call of an iteration ("cold") costs several times
a second call right after it ("hot"). Each iteration times one probe twice, before the
forward pass, in rotation, the loop otherwise as `vattn bench overlap` runs it.

    python3 benchmarks/diagnose_noop.py b per_layer 900    # case b, 100 samples a probe
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Mapping

import torch

from vattn.bench import common
from vattn.bench.overlap import CASES, DecodeLoop
from vattn.cache import VirtualKVCache


def without_shortcuts(c: VirtualKVCache, targets: dict[int, int]) -> None:
    """The call as it was before its no-op shortcuts: the worker joined, the ABC check."""
    with c._lock:
        c._check_usable()
        c._res.worker.join()
        isinstance(targets, Mapping)
        plan = c._plan_step(targets, reap=False)
        if plan.empty and not c._res.pending:
            return


def main(key: str, layout: str, iters: int) -> None:
    case = CASES[key]
    with VirtualKVCache(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                        max_batch_size=case.batch, max_context_len=case.context,
                        device="cuda", layout=layout,  # type: ignore[arg-type]
                        lookahead_tokens=0) as c:
        for _ in range(case.batch):
            c.allocate()
        lens = list(case.start)
        c.step({s: n + iters + 4 for s, n in enumerate(lens)})
        loop = DecodeLoop(c, case, torch.device("cuda"))
        for _ in range(3):
            loop.forward()
            loop.lens -= 1
        torch.cuda.synchronize()
        idx = c._index
        probes: dict[str, Callable[[dict[int, int]], object]] = {
            "step_async": c.step_async,
            "without shortcuts": lambda t: without_shortcuts(c, t),
            "index.fits": lambda t: idx.fits,
            "fits[0]": lambda t: idx.fits[0] + 1,
            "sum(fits)": lambda t: sum(idx.fits),
            "isinstance Mapping": lambda t: isinstance(t, Mapping),
            "needed": lambda t: idx.needed(t, c._check_active),
            "capacity(0)": lambda t: c.capacity(0),
            "empty": lambda t: None,
        }
        names = list(probes)
        cold: dict[str, list[float]] = {k: [] for k in names}
        hot: dict[str, list[float]] = {k: [] for k in names}
        with common.frozen_gc():
            for i in range(iters):
                targets = {s: n + 2 for s, n in enumerate(lens)}
                name = names[i % len(names)]
                probe = probes[name]
                t0 = time.perf_counter()
                probe(targets)
                t1 = time.perf_counter()
                probe(targets)
                hot[name].append(time.perf_counter() - t1)
                cold[name].append(t1 - t0)
                loop.forward()
                torch.cuda.synchronize()
                for s in range(case.batch):   # as bench overlap does after each iteration
                    c.capacity(s)
                lens = [n + 1 for n in lens]
    print(f"case {key} {layout}: cold median / p90, hot median (us)")
    for k in names:
        xs = sorted(cold[k])
        print(f"  {k:20s} {statistics.median(xs) * 1e6:7.2f} {xs[len(xs) * 9 // 10] * 1e6:7.2f}"
              f"  hot {statistics.median(hot[k]) * 1e6:6.2f}  n={len(xs)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
