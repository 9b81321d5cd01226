"""The shared benchmark harness: environment header, timers, Markdown table, JSON."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

import vattn
from vattn.driver import open_backend
from vattn.errors import InvalidArgument, VattnError

T = TypeVar("T")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _commit() -> str:
    """The git commit of the code under test (VATTN_COMMIT where the tree has no .git)."""
    if os.environ.get("VATTN_COMMIT"):
        return os.environ["VATTN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(vattn.__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(backend: dict[str, str]) -> dict[str, str]:
    """Hardware, driver, versions and commit, for the header of every benchmark."""
    return {
        **backend,
        "date": datetime.date.today().isoformat(),
        "vattn": vattn.__version__,
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda-bindings": _version("cuda-bindings"),
        "triton": _version("triton"),
    }


def device_environment(device: torch.device) -> dict[str, str]:
    """`environment` for the backend that serves `device` (opened and closed here)."""
    vm = open_backend(device)
    try:
        return environment(vm.describe())
    finally:
        vm.close()


def header_line(header: dict[str, str]) -> str:
    """The environment as the one line every benchmark prints first."""
    return " | ".join(f"{key}: {value}" for key, value in header.items())


def require_cuda(device: torch.device, bench: str) -> None:
    if device.type != "cuda":
        raise InvalidArgument(f"vattn bench {bench} needs a CUDA device, got {str(device)!r}")


def script_header(name: str, emit: Callable[[str], None]) -> dict[str, str]:
    """For a GPU script under benchmarks/: CUDA required, the environment shown as the
    first line (`emit`), and returned (for its JSON)."""
    if not torch.cuda.is_available():
        raise InvalidArgument(f"{name} needs a CUDA device; torch sees none")
    header = device_environment(torch.device("cuda"))
    emit(header_line(header))
    return header


def tables_per_cell(cells: Sequence[T], measure: Callable[[T], list[dict[str, Any]]],
                    emit: Callable[[str], None]) -> list[dict[str, Any]]:
    """`measure` each cell in turn, its rows shown (`emit`) as a table once measured;
    all the rows."""
    rows: list[dict[str, Any]] = []
    for cell in cells:
        mine = measure(cell)
        rows += mine
        emit("\n" + markdown_table(mine))
    return rows


@contextmanager
def frozen_gc() -> Iterator[None]:
    """No garbage collection while host-side timings run."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def host_times(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Wall-clock seconds of `fn()` per call (garbage collector frozen)."""
    for _ in range(warmup):
        fn()
    times = []
    with frozen_gc():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times


def cuda_times(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 5) -> list[float]:
    """Device seconds per call, CUDA events around each call; calls rotate over `fns`
    (inputs larger than L2 each, so every call starts with a cold cache)."""
    for i in range(warmup):
        fns[i % len(fns)]()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]


def graph_times(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Device seconds per call with no host overhead: the calls (rotating over inputs
    larger than L2) captured once in a CUDA graph, the graph replayed `repeats` times;
    each replay's time divided by the number of calls."""
    for fn in fns:                      # compile and allocate outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 / len(fns) for s, e in zip(starts, ends, strict=True)]


def compiled_footprints(kernel: Any) -> dict[int, str]:
    """Registers, spills and shared memory of every variant of the Triton `kernel`
    compiled so far, by id (Triton's per-device cache; best effort: its layout is not a
    stable API). Diff two calls to name what a launch compiled."""
    found = {}
    for cache in getattr(kernel, "device_caches", {}).values():
        for compiled in cache[0].values():
            found[id(compiled)] = (f"{compiled.n_regs} registers, {compiled.n_spills} "
                                   f"spilled, {compiled.metadata.shared} B shared")
    return found


def newly_compiled(kernel: Any, before: dict[int, str]) -> str:
    """The footprints of the variants of `kernel` compiled since `compiled_footprints`
    gave `before`, joined; empty if none."""
    return "; ".join(v for k, v in compiled_footprints(kernel).items() if k not in before)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as a Markdown table."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (so that a 0 is an error, not the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def positive_ints(text: str) -> str:
    """An argparse type: comma-separated ints >= 1, checked and kept as the text (the
    benches split it where they use it)."""
    for item in (t for t in text.split(",") if t):
        positive_int(item)
    if not any(text.split(",")):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {text!r}")
    return text


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or an error that names the
    extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VattnError("--plot needs matplotlib: pip install 'vattn[plot]'") from None
    return plt


def save_figure(fig: Any, path: str | Path) -> None:
    """Write `fig` as a PNG at `path`, its folder created if missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
