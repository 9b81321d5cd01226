"""Probe: how fast each kind of `pod_attention` work runs with one program per SM.

The fused kernel puts one prefill and one decode program on each SM (two resident
programs, the most its registers allow). If either kind needs both program slots of an
SM to reach its own peak, one of each per SM runs each at about half speed, and fusing
gains nothing. This probe measures each kind with one slot taken: a spinner kernel
(hand-written PTX, loaded through the driver) holds one block on every SM, with enough
shared memory that only one program of the timed kernel fits beside it, and sleeps
(``nanosleep``, no loads, no math) while the timed kernel runs on another stream.

Per cell and kind (prefill only, decodes only, fused; and `decode_attention`, which runs
one program per SM anyway, as a control that the spinner itself costs nothing) it prints
the time alone and beside the spinner, and whether the timed kernel finished while the
spinner still held its slots (else the numbers mean nothing). If ``prefill@1`` and
``decode@1`` are near twice their times alone, ``max(prefill@1, decode@1)`` (what one of
each per SM could reach without interfering) is no better than the two run back to back.

    python3 benchmarks/probe_coresidency.py --json probe-coresidency.json
"""

from __future__ import annotations

import argparse
import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch
import triton
from cuda.bindings import driver as cu

from vattn.bench import common
from vattn.bench.pod import Cell
from vattn.driver.cuda import _check
from vattn.kernels import decode as decode_module
from vattn.kernels import decode_attention, pod_attention
from vattn.kernels import pod as pod_module

CELLS = [(2048, 16384, 8, 4096), (1024, 4096, 32, 16384), (512, 0, 64, 16384),
         (1024, 0, 8, 4096)]

SPINNER_PTX = b"""
.version 7.8
.target sm_90
.address_size 64

.visible .entry spin(.param .u64 duration_ns)
{
    .reg .u64 %d, %now, %end;
    .reg .pred %p;
    ld.param.u64 %d, [duration_ns];
    mov.u64 %now, %globaltimer;
    add.u64 %end, %now, %d;
WAIT:
    nanosleep.u32 2000;
    mov.u64 %now, %globaltimer;
    setp.lt.u64 %p, %now, %end;
    @%p bra WAIT;
    ret;
}
\0"""


class Spinner:
    """One 32-thread block per SM, each holding `shared_bytes` of shared memory while it
    sleeps for a given time."""

    def __init__(self) -> None:
        module = _check("cuModuleLoadData", cu.cuModuleLoadData(SPINNER_PTX))
        self.fn = _check("cuModuleGetFunction", cu.cuModuleGetFunction(module, b"spin"))
        dev = _check("cuCtxGetDevice", cu.cuCtxGetDevice())
        attr = cu.CUdevice_attribute

        def get(what: cu.CUdevice_attribute) -> int:
            return int(_check("cuDeviceGetAttribute", cu.cuDeviceGetAttribute(what, dev)))

        self.sms = get(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        self.sm_bytes = get(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)
        self.block_max = get(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        self.reserved = get(attr.CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK)
        _check("cuFuncSetAttribute", cu.cuFuncSetAttribute(
            self.fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            self.block_max))
        prefer_max_shared(self.fn)

    def leave_one(self, program_bytes: int) -> int:
        """Shared memory for a spinner block that leaves room for one program of
        `program_bytes` on its SM, not two."""
        left = program_bytes + self.reserved + 4096        # room for one, with a margin
        return max(0, min(self.block_max, self.sm_bytes - self.reserved - left))

    def launch(self, stream: torch.cuda.Stream, shared_bytes: int, ns: int) -> None:
        _check("cuLaunchKernel", cu.cuLaunchKernel(
            self.fn, self.sms, 1, 1, 32, 1, 1, shared_bytes, cu.CUstream(stream.cuda_stream),
            ((ns,), (ctypes.c_uint64,)), 0))


def prefer_max_shared(fn: Any) -> None:
    """Ask for the largest shared-memory carveout, so that the spinner and the timed
    kernel can share an SM's configuration."""
    _check("cuFuncSetAttribute", cu.cuFuncSetAttribute(
        fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100))


def compiled(jit: Any) -> list[Any]:
    """Every compiled variant of a Triton kernel on the current device."""
    device = triton.runtime.driver.active.get_current_device()
    return list(jit.device_caches[device][0].values())


def footprint(jits: list[Any]) -> tuple[int, int]:
    """(shared bytes, registers a thread) of the largest compiled variant; each variant
    is asked for the largest carveout."""
    kernels = [k for jit in jits for k in compiled(jit)]
    for k in kernels:
        prefer_max_shared(cu.CUfunction(k.function))
    return max(k.metadata.shared for k in kernels), max(k.n_regs for k in kernels)


def timed_beside(spinner: Spinner, fn: Callable[[], object], spin_bytes: int | None,
                 reps: int, rounds: int) -> tuple[float, bool]:
    """Median us per call of `fn` (a CUDA graph of `reps` calls), alone (`spin_bytes`
    None) or while the spinner holds `spin_bytes` on every SM; and whether every round
    finished before the spinner let go."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    side, main = torch.cuda.Stream(), torch.cuda.current_stream()
    times, held = [], True
    for _ in range(rounds + 1):                             # the first round warms up
        origin, start, end, spin_end = (torch.cuda.Event(enable_timing=True)
                                        for _ in range(4))
        origin.record(main)
        if spin_bytes is not None:
            with torch.cuda.stream(side):
                side.wait_event(origin)
                spinner.launch(side, spin_bytes, 200_000_000)  # 200 ms: far longer
                spin_end.record(side)
            torch.cuda._sleep(100_000)       # let every spinner block take its SM first
        start.record(main)
        graph.replay()
        end.record(main)
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
        if spin_bytes is not None:
            held = held and origin.elapsed_time(end) < origin.elapsed_time(spin_end)
    return common.median(times[1:]), held


def probe(spinner: Spinner, shape: tuple[int, int, int, int], reps: int,
          rounds: int) -> list[dict[str, Any]]:
    chunk, prefix, batch, context = shape
    cell = Cell(torch.device("cuda"), chunk, prefix, batch, context)
    kinds: dict[str, tuple[Callable[[], object], list[Any]]] = {
        "prefill": (lambda: pod_attention(cell.qp, cell.qd[:0], cell.k, cell.v, 0, prefix,
                                          cell.lens[:0]), [pod_module._pod_kernel]),
        "decode": (lambda: pod_attention(cell.qp[:0], cell.qd, cell.k, cell.v, 0, 0,
                                         cell.lens, cell.slots, max_decode_len=context),
                   [pod_module._pod_kernel]),
        "fused": (cell.pod("50:50"), [pod_module._pod_kernel]),
        "decode_attention": (lambda: decode_attention(cell.qd, cell.k, cell.v, cell.lens,
                                                      cell.slots),
                             [decode_module._split_kernel, decode_module._reduce_kernel]),
    }
    rows: list[dict[str, Any]] = []
    for kind, (fn, jits) in kinds.items():
        fn()
        torch.cuda.synchronize()
        shared, regs = footprint([j for j in jits if compiled(j)])
        spin_bytes = spinner.leave_one(shared)
        alone, _ = timed_beside(spinner, fn, None, reps, rounds)
        small, small_held = timed_beside(spinner, fn, 0, reps, rounds)
        one, one_held = timed_beside(spinner, fn, spin_bytes, reps, rounds)
        rows.append({"cell": f"c{chunk} p{prefix} b{batch} x{context}", "kind": kind,
                     "shared KiB": round(shared / 1024, 1), "regs": regs,
                     "spinner KiB": round(spin_bytes / 1024, 1),
                     "alone us": round(alone, 1),
                     "beside small spinner us": round(small, 1),
                     "one slot us": round(one, 1),
                     "one slot / alone": round(one / alone, 2),
                     "held": "yes" if small_held and one_held else "NO"})
    by = {r["kind"]: r for r in rows}
    p1, d1 = by["prefill"]["one slot us"], by["decode"]["one slot us"]
    p, d = by["prefill"]["alone us"], by["decode"]["alone us"]
    rows.append({**dict.fromkeys(rows[0], "-"), "cell": rows[0]["cell"],
                 "kind": "prefill + decode vs max(each @1)",
                 "alone us": round(p + d, 1), "one slot us": round(max(p1, d1), 1),
                 "one slot / alone": round(max(p1, d1) / (p + d), 2)})
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="calls in one timed graph")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    emit = functools.partial(print, flush=True)
    header = common.script_header("probe_coresidency", emit)
    torch.zeros(1, device="cuda")             # torch's context, current on this thread
    spinner = Spinner()
    emit(f"SMs {spinner.sms}, shared memory an SM {spinner.sm_bytes} B, a block at most "
          f"{spinner.block_max} B, reserved a block {spinner.reserved} B")
    rows = common.tables_per_cell(CELLS, lambda shape: probe(spinner, shape, args.reps,
                                                             args.rounds), emit)
    if args.json:
        common.write_json(args.json, {"environment": header, "rows": rows})


if __name__ == "__main__":
    main()
