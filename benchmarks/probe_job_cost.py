"""What does one mapper-thread job cost the decode loop it overlaps, and why?

The overlap loop of `vattn bench overlap` runs on a cache whose pages are all mapped
up front. Every other iteration, just before its forward is enqueued (where
`step_async` submits its job), a synthetic job goes to a `BackgroundWorker` and is
joined before the next iteration. The kinds take turns, so a drift of the host hits
all alike:

- ``none``: no job (the baseline); ``wake``: an empty job (thread wake-up alone);
- ``sleep``: a job that sleeps 2 ms (wake-up, then nothing that needs the GIL);
- ``spin``: a job that runs Python for 1 ms (holding the GIL between switches);
- ``map-py-N`` / ``unmap-py-N``: N pages mapped with set-access (unmapped, the next
  time), one driver call at a time as the mapper makes them; ``noaccess`` maps without
  set-access;
- ``map-slot-N``: the pages of the next page row of a slot, in the cache's own
  reservation (a slot no request uses), and ``map-spread-N`` the same pattern in a
  reservation of its own.

It prints, per kind, the median iteration time and its difference from ``none``, and
the median time the job took on the mapper thread. (The runs in docs/benchmarks.md, at
cb0e617 and f79d7ac, also had ``map-c-N`` kinds: the C helper of 078aebf, since
reverted.)

    python3 benchmarks/probe_job_cost.py --case a --layout per_layer --iterations 4000
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from vattn.bench import common
from vattn.bench.overlap import CASES, HKV, D, DecodeLoop, prepare
from vattn.cache import VirtualKVCache
from vattn.config import resolve_device
from vattn.mapper import BackgroundWorker

PAGE = 2 << 20


def map_runs_each(vm: Any, page: int, starts: list[int], counts: list[int],
                  handles: list[int]) -> None:
    """The calls `Mapper.map_runs` makes: a map per page, a set-access per run."""
    position = 0
    for start, count in zip(starts, counts, strict=True):
        for j in range(count):
            vm.map(start + j * page, page, handles[position + j])
        position += count
        vm.set_access(start, count * page)


def unmap_each(vm: Any, page: int, addresses: list[int]) -> None:
    for address in addresses:
        vm.unmap(address, page)


def jobs(vm: Any, base: int, sizes: list[int], handles: list[int], spread: list[int],
         in_cache: list[int]) -> dict[str, Callable[[], object]]:
    """The synthetic jobs by name; map and unmap kinds alternate per size and path.
    `spread` and `in_cache` are the page addresses of the ``spread`` and ``slot`` kinds."""
    out: dict[str, Callable[[], object]] = {
        "wake": lambda: None,
        "sleep": lambda: time.sleep(2e-3),
        "spin": functools.partial(_spin, 1e-3),
    }
    for n in sizes:
        addresses = [base + j * PAGE for j in range(n)]
        starts, counts = [base + j * PAGE for j in range(n)], [1] * n

        def map_py(n: int = n, starts: list[int] = starts, counts: list[int] = counts
                   ) -> None:
            map_runs_each(vm, PAGE, starts, counts, handles[:n])

        def unmap_py(n: int = n, addresses: list[int] = addresses) -> None:
            unmap_each(vm, PAGE, addresses)

        def map_noaccess(n: int = n, addresses: list[int] = addresses) -> None:
            for address, handle in zip(addresses, handles[:n], strict=True):
                vm.map(address, PAGE, handle)

        out[f"map-py-{n}"], out[f"unmap-py-{n}"] = map_py, unmap_py
        out[f"map-noaccess-{n}"], out[f"unmap-noaccess-{n}"] = map_noaccess, unmap_py
    for name, addresses in (("spread", spread), ("slot", in_cache)):
        n = len(addresses)

        def map_at(addresses: list[int] = addresses, n: int = n) -> None:
            map_runs_each(vm, PAGE, addresses, [1] * n, handles[:n])

        def unmap_at(addresses: list[int] = addresses, n: int = n) -> None:
            unmap_each(vm, PAGE, addresses)

        out[f"map-{name}-{n}"], out[f"unmap-{name}-{n}"] = map_at, unmap_at
    return out


def _spin(seconds: float) -> int:
    """Run Python (holding the GIL between switches) for `seconds`; returns the laps."""
    end, laps = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        laps += 1
    return laps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--case", default="a", choices=sorted(CASES))
    parser.add_argument("--layout", default="per_layer")
    parser.add_argument("--iterations", type=int, default=4000)
    parser.add_argument("--sizes", default="8,64")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    case = CASES[args.case]
    sizes = [int(s) for s in args.sizes.split(",")]
    with VirtualKVCache(num_layers=32, num_kv_heads=HKV, head_dim=D, dtype=torch.bfloat16,
                        max_batch_size=case.batch + 1, max_context_len=case.context,
                        device=device, layout=args.layout,
                        lookahead_tokens=0) as cache:
        case_run = type(case)(case.name, case.batch, case.start, args.iterations,
                              case.context)
        prepare(cache, case_run, premapped=True, precreate_bytes=-1)
        vm = cache._res.vm
        base = vm.reserve(max(sizes) * PAGE, PAGE)
        lay = cache.layout
        # The pages the next page row of a slot would take, in the cache's reservation
        # (slot `batch` is never allocated), and the same pattern in a reservation of
        # its own: one page a tensor, a tensor apart.
        count = max(sizes)
        per_tensor = max(1, count // lay.num_tensors)
        in_cache = [cache._res.mapper.base_address + lay.page_offset(t, case.batch, j)
                    for t in range(lay.num_tensors) for j in range(per_tensor)][:count]
        spread_bytes = in_cache[-1] - in_cache[0] + PAGE
        spread_base = vm.reserve(spread_bytes, PAGE)
        spread = [spread_base + (a - in_cache[0]) for a in in_cache]
        handles = [vm.create(PAGE) for _ in range(max(count, len(in_cache)))]
        kinds = jobs(vm, base, sizes, handles, spread, in_cache)
        # A map kind is always followed, at its next turn, by its unmap kind.
        schedule = ["none", "wake", "sleep", "spin"]
        for name in kinds:
            if name.startswith("map-"):
                schedule += [name, "un" + name]
        worker = BackgroundWorker("probe-mapper")
        loop = DecodeLoop(cache, case_run, device)
        for _ in range(3):
            loop.forward()
            loop.lens -= 1
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {k: [] for k in schedule}
        job_s: dict[str, list[float]] = {k: [] for k in schedule}
        turn = 0
        with common.frozen_gc():
            for i in range(args.iterations):
                start = time.perf_counter()
                kind = "none"
                if i % 2 == 0:
                    kind = schedule[turn % len(schedule)]
                    turn += 1
                    if kind != "none":
                        job = kinds[kind]

                        def timed(job: Callable[[], object] = job, kind: str = kind) -> None:
                            t0 = time.perf_counter()
                            job()
                            job_s[kind].append(time.perf_counter() - t0)

                        worker.submit(timed)
                loop.forward()
                torch.cuda.synchronize()
                worker.join()
                times[kind].append(time.perf_counter() - start)
        worker.stop()
        if schedule[(turn - 1) % len(schedule)].startswith("map-"):
            kinds["un" + schedule[(turn - 1) % len(schedule)]]()  # left mapped: undo
        vm.free(base, max(sizes) * PAGE)
        vm.free(spread_base, spread_bytes)
        for handle in handles:
            vm.release(handle)
    base_p50 = common.median(times["none"])
    print(f"case {case.name}, {args.layout}, {args.iterations} iterations, "
          f"{torch.cuda.get_device_name(device)}")
    print("| job | n | iteration p50 ms | vs none us | p90 ms | job p50 ms |")
    print("|---|---|---|---|---|---|")
    for kind in schedule:
        t = times[kind]
        if not t:
            continue
        p50 = common.median(t)
        job_ms = f"{common.median(job_s[kind]) * 1e3:.3f}" if job_s[kind] else "-"
        print(f"| {kind} | {len(t)} | {p50 * 1e3:.3f} | {(p50 - base_p50) * 1e6:+.0f} | "
              f"{common.percentile(t, 90) * 1e3:.3f} | {job_ms} |")
    if args.json:
        common.write_json(args.json, {"times": times, "job_s": job_s})


if __name__ == "__main__":
    main()
