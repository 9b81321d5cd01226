"""Probe: where the time of mapping 2 MiB pages goes (raw driver loops, threads).

Run on a GPU: python benchmarks/probe_map.py. Prints us per page for each variant.
"""

from __future__ import annotations

import threading
import time

import torch

from vattn.driver.cuda import CudaVirtualMemory

PAGE = 2 << 20
N_TENSORS, N_SLOTS, N_PAGES = 64, 32, 4     # Llama-3-8B per_layer, 4096 tokens a slot
SLOT_STRIDE = 32 * PAGE


def main() -> None:
    torch.cuda.init()
    vm = CudaVirtualMemory(0)
    total = N_TENSORS * N_SLOTS * N_PAGES
    handles = [vm.create(PAGE) for _ in range(total)]
    size = N_TENSORS * N_SLOTS * SLOT_STRIDE
    base = vm.reserve(size, PAGE)

    def addr(t: int, s: int, p: int) -> int:
        return base + (t * N_SLOTS + s) * SLOT_STRIDE + p * PAGE

    def map_tensors(tensors: range, per_page_access: bool) -> None:
        for t in tensors:
            for s in range(N_SLOTS):
                start = addr(t, s, 0)
                for p in range(N_PAGES):
                    vm.map(start + p * PAGE, PAGE, handles[(t * N_SLOTS + s) * N_PAGES + p])
                    if per_page_access:
                        vm.set_access(start + p * PAGE, PAGE)
                if not per_page_access:
                    vm.set_access(start, N_PAGES * PAGE)

    def map_slot_major() -> None:
        for s in range(N_SLOTS):
            for t in range(N_TENSORS):
                start = addr(t, s, 0)
                for p in range(N_PAGES):
                    vm.map(start + p * PAGE, PAGE, handles[(t * N_SLOTS + s) * N_PAGES + p])
                vm.set_access(start, N_PAGES * PAGE)

    def unmap_all() -> float:
        t0 = time.perf_counter()
        for t in range(N_TENSORS):
            for s in range(N_SLOTS):
                for p in range(N_PAGES):
                    vm.unmap(addr(t, s, p), PAGE)
        return time.perf_counter() - t0

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def threaded(n: int) -> None:
        chunks = [range(i, N_TENSORS, n) for i in range(n)]
        threads = [threading.Thread(target=map_tensors, args=(c, False)) for c in chunks]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    def map_only() -> None:
        for t in range(N_TENSORS):
            for s in range(N_SLOTS):
                start = addr(t, s, 0)
                for p in range(N_PAGES):
                    vm.map(start + p * PAGE, PAGE, handles[(t * N_SLOTS + s) * N_PAGES + p])

    def access_only() -> None:
        for t in range(N_TENSORS):
            for s in range(N_SLOTS):
                vm.set_access(addr(t, s, 0), N_PAGES * PAGE)


    rows = []
    for name, fn in [("map + access per run of 4", lambda: map_tensors(range(N_TENSORS), False)),
                     ("map + access per page", lambda: map_tensors(range(N_TENSORS), True)),
                     ("slot-major order", map_slot_major),
                     ("2 threads", lambda: threaded(2)),
                     ("4 threads", lambda: threaded(4)),
                     ("8 threads", lambda: threaded(8))]:
        for rep in range(3):
            t = timed(fn)
            u = unmap_all()
            rows.append((name, rep, t / total * 1e6, total * PAGE / t / 2**30, u / total * 1e6))
    t_map = timed(map_only)
    t_acc = timed(access_only)
    u = unmap_all()
    per_run = t_acc / (N_TENSORS * N_SLOTS) * 1e6
    rows.append(("map only / access us per run", 0, t_map / total * 1e6, per_run,
                 u / total * 1e6))
    print("| variant | rep | us/page | GiB/s | unmap us/page |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} |")
    for h in handles:
        vm.release(h)
    vm.free(base, size)
    vm.close()


if __name__ == "__main__":
    main()
