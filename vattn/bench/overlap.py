"""Decode iteration time with pages mapped up front, synchronously, or in the background.

vAttention Fig. 10: allocation overlapped with compute.

The decode-like loop, per layer: append the new token's K and V at each request's
position, FlashAttention-2 (torch's, varlen with ``seqused_k``) over the cache, and two
matmuls standing in for the MLP (Llama-3-8B shapes). Each iteration ends with a device
synchronisation, as a serving loop does when it reads the sampled tokens.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vattn.bench import common
from vattn.cache import VirtualKVCache
from vattn.config import resolve_device
from vattn.errors import InvalidArgument

HQ, HKV, D, HIDDEN, FFN = 32, 8, 128, 4096, 14336
MODES = ("premapped", "sync", "background", "background-late")
"""premapped: the baseline; sync: `step` before the forward; background: `step_async`
with the next forward's targets before this forward is enqueued; background-late: the
same call after it is enqueued, and ``wait(targets_only=True)`` before the next forward,
so the mapper thread runs while the host waits for the device rather than while it
launches, and look-ahead pages still mapping do not hold the next forward back."""
EXTRA_MODES = ("premapped-async",)
"""Diagnostic, not run by default: every page mapped up front and `step_async` called
as in background, so every call plans nothing: the cost of the calls alone."""


@dataclass(frozen=True)
class Case:
    """One decode workload."""

    name: str
    batch: int
    start: tuple[int, ...]
    """Each request's length at the first iteration."""
    iterations: int
    context: int


CASES = {
    # Fig. 10: batch 4 at 32K, the requests crossing pages at different steps.
    "a": Case("a: batch 4, 32K", 4, (28000, 28256, 28512, 28768), 3072, 32768),
    # Every request crossing a page boundary in the same steps.
    "b": Case("b: batch 32, together", 32, (3996,) * 32, 1100, 8192),
}


class DecodeLoop:
    """The stand-in model: one forward over `num_layers` layers on the cache."""

    def __init__(self, cache: VirtualKVCache, case: Case, device: torch.device) -> None:
        b = case.batch
        self.cache, self.case = cache, case
        self.slots = torch.arange(b, device=device)
        self.lens = torch.tensor(case.start, dtype=torch.int32, device=device)
        self.cu_q = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.cu_k = self.cu_q * cache.max_context_len
        self.q = torch.randn(b, HQ, D, device=device, dtype=torch.bfloat16)
        self.kv_new = torch.randn(2, b, HKV, D, device=device, dtype=torch.bfloat16)
        self.x = torch.randn(b, HIDDEN, device=device, dtype=torch.bfloat16)
        self.w1 = torch.randn(HIDDEN, FFN, device=device, dtype=torch.bfloat16) / 64
        self.w2 = torch.randn(FFN, HIDDEN, device=device, dtype=torch.bfloat16) / 128

    def forward(self) -> None:
        pos = self.lens.long()
        used = self.lens + 1
        for layer in range(self.cache.config.num_layers):
            k, v = self.cache.kv(layer)
            k[self.slots, pos] = self.kv_new[0]
            v[self.slots, pos] = self.kv_new[1]
            torch.ops.aten._flash_attention_forward(
                self.q, k.flatten(0, 1), v.flatten(0, 1), self.cu_q, self.cu_k, 1,
                self.cache.max_context_len, 0.0, False, False, seqused_k=used)
            (self.x @ self.w1) @ self.w2
        self.lens += 1


def prepare(cache: VirtualKVCache, case: Case, premapped: bool, precreate_bytes: int) -> None:
    """Create the pool (`precreate_bytes`; < 0: all the run maps), take every slot, and
    map the first forward's pages (premapped: the whole run's)."""
    first = {s: n + 1 for s, n in enumerate(case.start)}
    end = {s: n + case.iterations + 2 for s, n in enumerate(case.start)}
    cache.grow_pool(_loop_bytes(cache, end) if precreate_bytes < 0 else precreate_bytes)
    for _ in range(case.batch):
        cache.allocate()
    cache.step(end if premapped else first)


class ModeRun:
    """One mode's cache and loop, advanced a block of iterations at a time, so that
    several modes can take turns in one process (``--interleave``)."""

    def __init__(self, device: str, layout: str, case: Case, mode: str, layers: int,
                 precreate_bytes: int = 0) -> None:
        self.case, self.mode = case, mode
        # sync: on demand only (the Fig. 10 spikes); premapped: nothing to map, ever
        lookahead = None if mode.startswith("background") else 0
        premapped = mode.startswith("premapped")
        self.cache = VirtualKVCache(num_layers=layers, num_kv_heads=HKV, head_dim=D,
                                    dtype=torch.bfloat16, max_batch_size=case.batch,
                                    max_context_len=case.context, device=device,
                                    layout=layout,  # type: ignore[arg-type]
                                    lookahead_tokens=lookahead)
        try:
            cache = self.cache
            self.lens = list(case.start)
            prepare(cache, case, premapped, precreate_bytes)
            self.loop = DecodeLoop(cache, case, resolve_device(device))
            for _ in range(3):  # warm-up at the starting lengths (nothing appended twice)
                self.loop.forward()
                self.loop.lens -= 1
            torch.cuda.synchronize()
        except BaseException:
            self.cache.close()
            raise
        self.iteration: list[float] = []
        self.visible: list[float] = []
        self.work: list[bool] = []  # did this iteration's step plan pages (mapped meanwhile)?
        self.ahead = 0
        self._mapped = _capacity(self.cache, case.batch)
        self._created = self.cache.stats().pages_created

    @property
    def remaining(self) -> int:
        return self.case.iterations - len(self.iteration)

    def advance(self, count: int) -> None:
        """Run the next `count` iterations (fewer at the end); the caller freezes the GC."""
        cache, loop, mode = self.cache, self.loop, self.mode
        for _ in range(min(count, self.remaining)):
            start = time.perf_counter()
            lead = 1 if mode == "sync" else 2   # this forward's pages, or the next's
            targets = {s: n + lead for s, n in enumerate(self.lens)}
            if mode == "background-late":
                call = time.perf_counter()
                cache.wait(targets_only=True)   # this forward's pages (the last call's)
                waited = time.perf_counter() - call
                loop.forward()
                call = time.perf_counter()
                cache.step_async(targets)
                self.visible.append(waited + time.perf_counter() - call)
            else:
                call = time.perf_counter()
                if mode == "sync":
                    cache.step(targets)
                elif mode != "premapped":
                    cache.step_async(targets)
                self.visible.append(time.perf_counter() - call)
                loop.forward()
            torch.cuda.synchronize()
            self.iteration.append(time.perf_counter() - start)
            self.lens = [n + 1 for n in self.lens]
            now = _capacity(cache, self.case.batch)
            self.work.append(now != self._mapped)
            self._mapped = now
            if len(self.iteration) % 64 == 0:
                self.ahead = max(self.ahead, pages_ahead(cache, targets))

    def finish(self) -> dict[str, Any]:
        """Join the mapper, close the cache, return the timings."""
        try:
            self.cache.wait()
            page_mib = self.cache.layout.page_size_bytes / 2**20
            created = self.cache.stats().pages_created - self._created
        finally:
            self.cache.close()
        return {"iteration_s": self.iteration, "visible_s": self.visible, "work": self.work,
                "ahead_mib": self.ahead * page_mib, "created": created}


def run_mode(device: str, layout: str, case: Case, mode: str, layers: int,
             precreate_bytes: int = 0) -> dict[str, Any]:
    """Per-iteration times of one mode, all its iterations in a row."""
    runner = ModeRun(device, layout, case, mode, layers, precreate_bytes)
    try:
        with common.frozen_gc():
            runner.advance(case.iterations)
        return runner.finish()
    finally:
        runner.cache.close()    # idempotent; here for a failure before finish


def run_interleaved(device: str, layout: str, case: Case, modes: list[str], layers: int,
                    precreate_bytes: int, block: int) -> dict[str, dict[str, Any]]:
    """Every mode's cache alive at once, the modes taking turns `block` iterations at a
    time: a slow drift of the host (seconds long) hits every mode alike."""
    runners: list[ModeRun] = []
    try:
        for mode in modes:
            runners.append(ModeRun(device, layout, case, mode, layers, precreate_bytes))
        with common.frozen_gc():
            while runners[0].remaining:
                for runner in runners:
                    runner.advance(block)
        return {runner.mode: runner.finish() for runner in runners}
    finally:
        for runner in runners:  # idempotent; here for a failure before every finish
            runner.cache.close()


def pages_ahead(cache: VirtualKVCache, targets: dict[int, int]) -> int:
    """`CacheStats.pages_ahead` for `targets` without the join that `stats()` makes: in
    the loop, a join would finish a mapper job off the clock."""
    lay, slack = cache.layout, cache.config.read_slack
    return lay.num_tensors * sum(
        max(0, lay.pages_for_tokens(cache.capacity(slot)) - lay.pages_for_tokens(n, slack))
        for slot, n in targets.items())


def _capacity(cache: VirtualKVCache, batch: int) -> int:
    """Tokens mapped over all slots: changes when a step plans pages."""
    return sum(cache.capacity(slot) for slot in range(batch))


def _join_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds as one run: iterations appended, the largest look-ahead."""
    return {"iteration_s": [t for r in rounds for t in r["iteration_s"]],
            "visible_s": [t for r in rounds for t in r["visible_s"]],
            "work": [w for r in rounds for w in r["work"]],
            "ahead_mib": max(r["ahead_mib"] for r in rounds),
            "created": sum(r["created"] for r in rounds)}


def _loop_bytes(cache: VirtualKVCache, end: dict[int, int]) -> int:
    """Physical memory the whole run maps, look-ahead included: created up front, as a
    server grows its pool at start-up (creating pages while kernels run disturbs them).

    A slot that grows goes to twice the look-ahead past its target (the high water
    mark), so its last growth can reach ``end + 2 * lookahead`` tokens plus the slack.
    """
    lay, config = cache.layout, cache.config
    slack = config.read_slack + 2 * config.lookahead
    pages = sum(lay.pages_for_tokens(n, slack) + 1 for n in end.values())
    return pages * lay.num_tensors * lay.page_size_bytes


def summarize(layout: str, case: Case, mode: str, r: dict[str, Any],
              base: dict[str, Any] | None) -> dict[str, Any]:
    it, vis = r["iteration_s"], r["visible_s"]
    worked = [t for t, w in zip(it, r["work"], strict=True) if w]
    # The iteration after each mapping one: where a job that outlasts its own iteration
    # (background-late) shows.
    after = [it[i + 1] for i, w in enumerate(r["work"][:-1]) if w]
    slowest = sorted(range(len(it)), key=it.__getitem__)[-max(1, len(it) // 1000):]
    row = {"case": case.name, "layout": layout, "mode": mode,
           "p50 ms": round(common.median(it) * 1e3, 3),
           "p99 ms": round(common.percentile(it, 99) * 1e3, 3),
           "p99.9 ms": round(common.percentile(it, 99.9) * 1e3, 3),
           "max ms": round(max(it) * 1e3, 2),
           "alloc visible p50 us": round(common.median(vis) * 1e6, 1),
           "alloc visible max us": round(max(vis) * 1e6, 1),
           "MiB ahead (max)": "-" if mode.startswith("premapped") else round(r["ahead_mib"]),
           "pages created in loop": r["created"],
           "iters mapping": len(worked),
           "their p50 ms": round(common.median(worked) * 1e3, 3) if worked else "-",
           "next p50 ms": round(common.median(after) * 1e3, 3) if after else "-",
           "slowest 0.1% mapping": f"{sum(r['work'][i] for i in slowest)}/{len(slowest)}"}
    if base is not None:
        b = base["iteration_s"]
        row["p50 vs base"] = f"{common.median(it) / common.median(b) - 1:+.1%}"
        row["p99.9 vs base"] = (
            f"{common.percentile(it, 99.9) / common.percentile(b, 99.9) - 1:+.1%}")
    else:
        row["p50 vs base"] = row["p99.9 vs base"] = "-"
    return row


def plot(path: str, series: dict[str, list[float]], title: str) -> None:
    plt = common.pyplot()

    fig, ax = plt.subplots(figsize=(10, 4))
    for label, times in series.items():
        ax.plot([t * 1e3 for t in times], label=label, linewidth=0.8)
    ax.set_xlabel("decode iteration (rounds one after another)")
    ax.set_ylabel("iteration time (ms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda[:N]")
    parser.add_argument("--cases", default="a,b", help="comma-separated: a, b")
    parser.add_argument("--layouts", default="per_layer,token_major")
    parser.add_argument("--layers", type=common.positive_int, default=32)
    parser.add_argument("--iterations", type=common.positive_int, default=None,
                        help="override per case")
    parser.add_argument("--rounds", type=common.positive_int, default=2,
                        help="runs of every mode, interleaved; percentiles pool them")
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="keep every mode's cache alive and let the modes take turns N "
                        "iterations at a time, each round (0: one mode after another)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {', '.join(MODES + EXTRA_MODES)}; the "
                        "first is the baseline")
    parser.add_argument("--precreate-gib", type=float, default=-1.0,
                        help="physical memory created before the loop (default: all the "
                        "run maps, as a server grows its pool at start-up; 0: create on "
                        "demand)")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--plot", default=None, help="PNG prefix: PREFIX-<case>-<layout>.png")


def run(args: argparse.Namespace, device: str, emit: Callable[[str], None]) -> int:
    """Run the benchmark; `emit` shows each finished part (the CLI prints it)."""
    if args.rounds < 1:
        raise InvalidArgument(f"--rounds must be >= 1, got {args.rounds}")
    if args.interleave < 0:
        raise InvalidArgument(f"--interleave must be >= 0, got {args.interleave}")
    unknown = set(args.modes.split(",")) - set(MODES + EXTRA_MODES)
    if unknown:
        raise InvalidArgument(f"--modes: unknown {sorted(unknown)}; choose from "
                              f"{', '.join(MODES + EXTRA_MODES)}")
    dev = resolve_device(device)
    common.require_cuda(dev, "overlap")
    header = common.device_environment(dev)
    emit(common.header_line(header))
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    detail: dict[str, Any] = {}     # per iteration, for attributing the slow ones
    for key in args.cases.split(","):
        case = CASES[key]
        if args.iterations:
            case = Case(case.name, case.batch, case.start, args.iterations, case.context)
        for layout in args.layouts.split(","):
            modes = args.modes.split(",")
            precreate = -1 if args.precreate_gib < 0 else int(args.precreate_gib * 2**30)
            rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for _ in range(args.rounds):     # modes interleaved: they share host noise
                if args.interleave:
                    done_round = run_interleaved(device, layout, case, modes, args.layers,
                                                 precreate, args.interleave)
                    for m in modes:
                        rounds[m].append(done_round[m])
                    continue
                for m in modes:
                    rounds[m].append(run_mode(device, layout, case, m, args.layers, precreate))
            results = {m: _join_rounds(rounds[m]) for m in modes}
            done = len(rows)
            for mode in modes:
                base = None if mode == modes[0] else results[modes[0]]
                rows.append(summarize(layout, case, mode, results[mode], base))
            emit(common.markdown_table(rows[done:]))    # shown as each part finishes
            raw[f"{key}-{layout}"] = {m: results[m]["iteration_s"] for m in modes}
            detail[f"{key}-{layout}"] = {m: {"visible_s": results[m]["visible_s"],
                                             "work": results[m]["work"]} for m in modes}
            if args.plot:
                plot(f"{args.plot}-{key}-{layout}.png", raw[f"{key}-{layout}"],
                     f"{case.name}, {layout}, {args.layers} layers")
    emit("\n" + common.markdown_table(rows))
    if args.json:
        common.write_json(args.json, {"environment": header, "rows": rows, "raw": raw,
                                      "detail": detail})
    return 0
