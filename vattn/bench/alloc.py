"""Allocation bandwidth per page size: the raw driver loop, vattn's step, the mapper thread.

vAttention Table 7. For each page size a cache is built with that page size, and the
same pages are mapped three ways:

- **raw:** the driver calls `step` makes (pooled handles, one map per page, one
  set-access per run of a slot's pages in a tensor, tensors in ascending address
  order), straight on the backend, with no vattn code in between;
- **sync:** `VirtualKVCache.step`, with the handles in the cache's pool;
- **background:** `step_async` then `wait` (the mapper thread, hand-off included).

Create-included figures (the handles created in the timed call) come separately, and a
demand model sets what a decode workload needs against what the device delivers.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from vattn.bench import common
from vattn.cache import VirtualKVCache
from vattn.config import resolve_device
from vattn.driver import open_backend
from vattn.driver.base import VirtualMemory
from vattn.errors import InvalidArgument
from vattn.layout import Layout

MiB, GiB = 1 << 20, 1 << 30
PATHS = ("raw", "sync", "background")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelShape:
    """The KV shape of a model."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def token_bytes(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


MODELS = {
    "llama-3-8b": ModelShape("llama-3-8b", 32, 8, 128, torch.bfloat16),
    "yi-6b": ModelShape("yi-6b", 32, 4, 128, torch.bfloat16),
    "yi-34b": ModelShape("yi-34b", 60, 8, 128, torch.bfloat16),
}


class RawLoop:
    """The driver calls of one `step` that maps `pages_per_run` pages to each of `batch`
    slots in every tensor of `layout`, on its own reservation and handles.

    `close` undoes whatever is left (mapped pages, handles, the reservation), so a
    failure part way leaks nothing.
    """

    def __init__(self, vm: VirtualMemory, layout: Layout, batch: int,
                 pages_per_run: int) -> None:
        self.vm, self.page = vm, layout.page_size_bytes
        self.size = layout.reservation_bytes
        self.base = vm.reserve(self.size, self.page)
        # Runs in the order `Mapper.map_runs` makes them: tensor by tensor, slot by slot.
        self.runs = [(self.base + layout.page_offset(t, s, 0), pages_per_run)
                     for t in range(layout.num_tensors) for s in range(batch)]
        self.num_pages = len(self.runs) * pages_per_run
        self.handles: list[int] = []
        self.mapped: list[int] = []

    def create(self) -> float:
        """Create one handle per page; returns the seconds it took."""
        start = time.perf_counter()
        for _ in range(self.num_pages - len(self.handles)):
            self.handles.append(self.vm.create(self.page))
        return time.perf_counter() - start

    def map(self) -> float:
        """Map every page and set access per run; returns the seconds it took."""
        vm, page, handles, mapped = self.vm, self.page, iter(self.handles), self.mapped
        start = time.perf_counter()
        for first, count in self.runs:
            for j in range(count):
                vm.map(first + j * page, page, next(handles))
                mapped.append(first + j * page)
            vm.set_access(first, count * page)
        return time.perf_counter() - start

    def unmap(self) -> float:
        """Unmap every page, one call each (as vattn does); returns the seconds."""
        start = time.perf_counter()
        while self.mapped:
            self.vm.unmap(self.mapped[-1], self.page)
            self.mapped.pop()
        return time.perf_counter() - start

    def release(self) -> float:
        start = time.perf_counter()
        while self.handles:
            self.vm.release(self.handles[-1])
            self.handles.pop()
        return time.perf_counter() - start

    def close(self) -> None:
        try:
            self.unmap()
            self.release()
        finally:
            self.vm.free(self.base, self.size)


@dataclass(frozen=True)
class Workload:
    """`batch` requests growing from empty to `tokens` in one step."""

    model: ModelShape
    layout: str
    page_size_bytes: int
    batch: int
    tokens: int

    def cache(self, device: str) -> VirtualKVCache:
        m = self.model
        return VirtualKVCache(num_layers=m.num_layers, num_kv_heads=m.num_kv_heads,
                              head_dim=m.head_dim, dtype=m.dtype, max_batch_size=self.batch,
                              max_context_len=self.tokens, device=device,
                              layout=self.layout,  # type: ignore[arg-type]
                              page_size_bytes=self.page_size_bytes, read_slack=0,
                              lookahead_tokens=0)

    def layout_of(self) -> Layout:
        m = self.model
        return Layout(m.num_layers, m.num_kv_heads, m.head_dim, m.dtype.itemsize, self.batch,
                      self.tokens, self.page_size_bytes, self.layout)  # type: ignore[arg-type]

    def bytes_mapped(self) -> int:
        lay = self.layout_of()
        return lay.pages_for_tokens(self.tokens, 0) * lay.num_tensors * self.batch \
            * self.page_size_bytes


def bandwidth(device: str, w: Workload, repeats: int, advance: Callable[[], None],
              sync: Callable[[], None]) -> dict[str, Any]:
    """Time the three paths on workload `w`, repeats interleaved so that they share the
    machine's state; create-included first, then pooled."""
    cache = w.cache(device)
    vm = open_backend(resolve_device(device))
    raw: RawLoop | None = None
    try:
        lay = cache.layout
        pages_per_run = lay.pages_for_tokens(w.tokens, 0)
        raw = RawLoop(vm, lay, w.batch, pages_per_run)
        targets = dict.fromkeys(range(w.batch), w.tokens)
        created: dict[str, list[float]] = {p: [] for p in PATHS}
        pooled: dict[str, list[float]] = {p: [] for p in PATHS}
        unmap: list[float] = []

        def vattn_step(path: str, release: bool) -> float:
            slots = [cache.allocate() for _ in range(w.batch)]
            start = time.perf_counter()
            if path == "sync":
                cache.step(targets)
            else:
                cache.step_async(targets)
                cache.wait()
            seconds = time.perf_counter() - start
            mapped = cache.stats().pages_mapped
            assert mapped == raw.num_pages, f"{path} mapped {mapped}, raw {raw.num_pages}"
            for slot in slots:
                cache.free(slot)
            sync()          # the free fences complete: trim unmaps everything now
            cache.trim(release=release)
            assert cache.stats().pages_pending == 0
            return seconds

        with common.frozen_gc():
            for _ in range(min(3, repeats)):
                created["raw"].append(raw.create() + raw.map())
                raw.unmap()
                raw.release()
                for path in PATHS[1:]:
                    created[path].append(vattn_step(path, release=True))
                advance()
            raw.create()
            cache.grow_pool(raw.num_pages * lay.page_size_bytes)
            for _ in range(repeats):
                pooled["raw"].append(raw.map())
                unmap.append(raw.unmap())
                for path in PATHS[1:]:
                    pooled[path].append(vattn_step(path, release=False))
                advance()
        num_pages = raw.num_pages
    finally:
        try:
            if raw is not None:
                raw.close()
        finally:
            vm.close()
            cache.close()
    nbytes = num_pages * w.page_size_bytes
    t = {p: common.median(pooled[p]) for p in PATHS}
    c = {p: common.median(created[p]) for p in PATHS}
    row: dict[str, Any] = {"layout": w.layout, "page MiB": w.page_size_bytes // MiB,
                           "pages": num_pages, "MiB": nbytes // MiB}
    row.update({f"{p} GiB/s": round(nbytes / GiB / t[p], 1) for p in PATHS})
    for path, key in (("sync", "sync/raw"), ("background", "bg/raw")):
        # Bandwidth ratio of each repeat's pair (timed back to back), then the median.
        ratios = [r / v for r, v in zip(pooled["raw"], pooled[path], strict=True)]
        row[key] = f"{common.median(ratios):.1%}"
    row["vattn us/page"] = round((t["sync"] - t["raw"]) / num_pages * 1e6, 2)
    row.update({f"{p} create incl.": round(nbytes / GiB / c[p], 1) for p in PATHS})
    row["raw unmap GiB/s"] = round(nbytes / GiB / common.median(unmap), 1)
    return row


def latency(device: str, page_size_bytes: int, count: int) -> dict[str, Any]:
    """Median microseconds of one call of each kind, one page at a time."""
    vm = open_backend(resolve_device(device))
    page = page_size_bytes
    base = vm.reserve(count * page, page)
    times: dict[str, list[float]] = {c: [] for c in ("create", "map", "set-access", "unmap",
                                                     "release")}
    handles: list[int] = []
    mapped: list[int] = []

    def timed(kind: str, call: Callable[..., object], *args: int) -> Any:
        start = time.perf_counter()
        result = call(*args)
        times[kind].append(time.perf_counter() - start)
        return result

    try:
        with common.frozen_gc():
            for _ in range(count):
                handles.append(timed("create", vm.create, page))
            for i, handle in enumerate(handles):
                timed("map", vm.map, base + i * page, page, handle)
                mapped.append(base + i * page)
                timed("set-access", vm.set_access, base + i * page, page)
            while mapped:
                timed("unmap", vm.unmap, mapped[-1], page)
                mapped.pop()
            while handles:
                timed("release", vm.release, handles[-1])
                handles.pop()
    finally:
        try:
            for address in mapped:
                vm.unmap(address, page)
            for handle in handles:
                vm.release(handle)
            vm.free(base, count * page)
        finally:
            vm.close()
    row: dict[str, Any] = {"page MiB": page // MiB, "calls": count}
    row.update({f"{kind} us": round(common.median(t) * 1e6, 1) for kind, t in times.items()})
    return row


def demand(model: ModelShape, batch: int, iteration_ms: float,
           measured: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `batch` requests decoding one token per `iteration_ms` need, per layout and
    page size, against the sync bandwidth measured for them.

    On average decode needs ``batch * token_bytes`` per iteration whatever the layout.
    The layouts differ in the burst: when every request crosses a page boundary in the
    same iteration, each needs a page in every tensor at once (2 per layer with
    `per_layer`, 2 with `token_major`).
    """
    need = batch * model.token_bytes / (iteration_ms / 1e3)
    rows = []
    for m in measured:
        layout = Layout(model.num_layers, model.num_kv_heads, model.head_dim,
                        model.dtype.itemsize, 1, 1, m["page MiB"] * MiB, m["layout"])
        delivered = m["sync GiB/s"] * GiB
        burst = batch * layout.num_tensors * m["page MiB"] * MiB
        rows.append({"layout": m["layout"], "page MiB": m["page MiB"],
                     "need GiB/s": round(need / GiB, 3),
                     "delivered GiB/s": m["sync GiB/s"],
                     "headroom": f"{delivered / need:.0f}x",
                     "tokens a page": layout.tokens_for_pages(1),
                     "burst MiB": burst // MiB,
                     "burst ms": round(burst / delivered * 1e3, 2),
                     "of an iteration": f"{burst / delivered * 1e3 / iteration_ms:.0%}"})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda[:N]")
    parser.add_argument("--page-mib", default="2,4,8,16,32",
                        help="comma-separated page sizes, MiB")
    parser.add_argument("--layouts", default="per_layer,token_major")
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(MODELS),
                        help="KV shape (overridden field by field by the options below)")
    parser.add_argument("--layers", type=common.positive_int, default=None)
    parser.add_argument("--kv-heads", type=common.positive_int, default=None)
    parser.add_argument("--head-dim", type=common.positive_int, default=None)
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--batch", type=common.positive_int, default=None,
                        help="requests mapped per step (default: 4 on cuda, 2 on cpu)")
    parser.add_argument("--tokens", type=common.positive_int, default=None,
                        help="tokens each request maps (default: 4096 on cuda, 256 on cpu)")
    parser.add_argument("--repeats", type=common.positive_int, default=None,
                        help="pooled repeats per path (default: 15 on cuda, 3 on cpu)")
    parser.add_argument("--latency-calls", type=common.positive_int, default=32,
                        help="single-page calls timed per kind and page size")
    parser.add_argument("--max-gib", type=common.positive_float, default=None,
                        help="skip cases that would hold more (default: half the free device "
                        "memory on cuda, 1 GiB on cpu)")
    parser.add_argument("--decode-batch", type=common.positive_int, default=32,
                        help="demand model: requests decoding together")
    parser.add_argument("--iteration-ms", type=common.positive_float, default=10.0,
                        help="demand model: time of one decode iteration")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--plot", default=None, help="write a PNG of GiB/s vs page size here")


def _model(args: argparse.Namespace) -> ModelShape:
    base = MODELS[args.model]
    custom = (args.layers, args.kv_heads, args.head_dim, args.dtype) != (None,) * 4
    return ModelShape(
        f"{base.name} (custom)" if custom else base.name,
        args.layers or base.num_layers, args.kv_heads or base.num_kv_heads,
        args.head_dim or base.head_dim, DTYPES[args.dtype] if args.dtype else base.dtype)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise InvalidArgument(f"--{name} must be > 0, got {value}")


def _table(title: str, rows: Sequence[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for key in rows[0] if rows else ():
        table.add_column(key, justify="left" if key in ("layout", "model") else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A transient progress bar on stderr; yields `advance(description)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bench alloc", total=total)
        yield lambda what: bar.update(task, advance=1, description=what)


def plot(path: str, rows: Sequence[dict[str, Any]], title: str) -> None:
    plt = common.pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layout in dict.fromkeys(r["layout"] for r in rows):
        mine = [r for r in rows if r["layout"] == layout]
        sizes = [r["page MiB"] for r in mine]
        for path_, style in zip(PATHS, ("-o", "-s", "-^"), strict=True):
            ax.plot(sizes, [r[f"{path_} GiB/s"] for r in mine], style,
                    label=f"{path_}, {layout}")
        ax.plot(sizes, [r["sync create incl."] for r in mine], ":x",
                label=f"sync create incl., {layout}")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["page MiB"] for r in rows})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("page size (MiB)")
    ax.set_ylabel("GiB/s mapped")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)


def run(args: argparse.Namespace, device: str, emit: Callable[[Any], None]) -> int:
    """Run the benchmark; `emit` shows the header and each table (rich renderables)."""
    dev = resolve_device(device)
    model = _model(args)
    on_cuda = dev.type == "cuda"
    batch = args.batch if args.batch is not None else (4 if on_cuda else 2)
    tokens = args.tokens if args.tokens is not None else (4096 if on_cuda else 256)
    repeats = args.repeats if args.repeats is not None else (15 if on_cuda else 3)
    for name, value in (("batch", batch), ("tokens", tokens), ("repeats", repeats),
                        ("latency-calls", args.latency_calls),
                        ("decode-batch", args.decode_batch),
                        ("iteration-ms", args.iteration_ms), ("layers", model.num_layers),
                        ("kv-heads", model.num_kv_heads), ("head-dim", model.head_dim)):
        _positive(name, value)
    try:
        sizes = [int(s) * MiB for s in args.page_mib.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise InvalidArgument(f"--page-mib takes comma-separated integers > 0, got "
                              f"{args.page_mib!r}")
    layouts = args.layouts.split(",")
    workloads = [Workload(model, lay, size, batch, tokens) for size in sizes
                 for lay in layouts]
    for w in workloads:         # bad layouts and sizes fail here, before any work
        try:
            w.layout_of()
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    vm = open_backend(dev)
    try:
        header = common.environment(vm.describe())
        free = vm.memory_info()[0]
        granularity = vm.granularity
    finally:
        vm.close()
    for size in sizes:
        if size % granularity:
            raise InvalidArgument(f"page size {size // MiB} MiB is not a multiple of the "
                                  f"device granularity ({granularity} bytes)")
    budget = int(args.max_gib * GiB) if args.max_gib else (
        int(0.5 * free) if on_cuda else min(GiB, free // 4))
    header.update({"model": model.name, "batch": str(batch), "tokens": str(tokens),
                   "repeats": str(repeats)})
    emit(common.header_line(header))
    rows, skipped, lat = [], [], []
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    steps = len(workloads) * (min(3, repeats) + repeats) + len(sizes)
    with _progress(steps) as advance:
        for w in workloads:
            what = f"{w.layout}, {w.page_size_bytes // MiB} MiB pages"
            need = 2 * w.bytes_mapped()       # the cache's pool and the raw loop's handles
            if need > budget:
                skipped.append(f"{what}: needs {need / GiB:.1f} GiB, over the "
                               f"{budget / GiB:.1f} GiB budget (--max-gib)")
                for _ in range(min(3, repeats) + repeats):
                    advance(what)
                continue
            rows.append(bandwidth(device, w, repeats, functools.partial(advance, what), sync))
        for size in sizes:
            count = max(1, min(args.latency_calls, budget // size))
            lat.append(latency(device, size, count))
            advance(f"latency, {size // MiB} MiB pages")
    demand_rows = demand(model, args.decode_batch, args.iteration_ms, rows)
    pooled = ("layout", "page MiB", "pages", "MiB", "raw GiB/s", "sync GiB/s",
              "background GiB/s", "sync/raw", "bg/raw", "vattn us/page")
    emit(_table("Bandwidth, pooled handles (medians)",
                [{k: r[k] for k in pooled} for r in rows]))
    emit(_table("Bandwidth with the handles created in the timed call (GiB/s), and unmap",
                [{k: v for k, v in r.items() if k in pooled[:2] or k not in pooled}
                 for r in rows]))
    emit(_table("Latency of one call, one page", lat))
    emit(_table(f"Demand: {model.name}, {args.decode_batch} requests decoding a token "
                f"per {args.iteration_ms:g} ms, against the sync path; the burst is every "
                f"request crossing a page at once", demand_rows))
    for line in skipped:
        emit(f"skipped {line}")
    if args.json:
        common.write_json(args.json, {"environment": header, "bandwidth": rows,
                                      "latency": lat, "demand": demand_rows,
                                      "skipped": skipped})
    if args.plot and rows:
        plot(args.plot, rows, f"{header.get('device', device)}: {model.name}, "
             f"{batch} x {tokens} tokens a step")
    return 0
