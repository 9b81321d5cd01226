"""The vattn command: info (backend and self-check), demo (continuous batching over
vattn, checked against transformers) and bench (the benchmarks)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence

import torch

from vattn.bench import alloc, common, core, decode, e2e, overlap, pod
from vattn.config import resolve_device
from vattn.driver import open_backend
from vattn.errors import VattnError
from vattn.views import byte_view

BENCHES = {"alloc": alloc, "core": core, "decode": decode, "e2e": e2e, "overlap": overlap,
           "pod": pod}


def _emit(item: object) -> None:
    """Print a line of text, or a rich renderable (a table)."""
    if isinstance(item, str):
        print(item)
    else:
        from rich.console import Console

        # Piped output keeps whole tables (rich assumes 80 columns off a terminal).
        Console(width=None if sys.stdout.isatty() else 160).print(item)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def info(device: str, page_size_bytes: int) -> int:
    """Print the backend found and run a one-page map/write/read/unmap round trip."""
    dev = resolve_device(device)
    vm = open_backend(dev)
    try:
        free, total = vm.memory_info()
        for key, value in vm.describe().items():
            print(f"{key:<12} {value}")
        print(f"{'granularity':<12} {vm.granularity} bytes")
        print(f"{'memory':<12} {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
        page = max(page_size_bytes, vm.granularity)
        timings = {}
        t0 = time.perf_counter()
        address = vm.reserve(page, page)
        handle = vm.create(page)
        t1 = time.perf_counter()
        vm.map(address, page, handle)
        vm.set_access(address, page)
        t2 = time.perf_counter()
        data = torch.randint(-(2**31), 2**31 - 1, (page // 4,), dtype=torch.int32)
        view = byte_view(address, page, dev).view(torch.int32)
        view.copy_(data)
        ok = bool(torch.equal(view.cpu(), data))
        del view
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t3 = time.perf_counter()
        vm.unmap(address, page)
        vm.release(handle)
        vm.free(address, page)
        t4 = time.perf_counter()
        timings = {"reserve+create": t1 - t0, "map+access": t2 - t1, "unmap+release": t4 - t3}
        detail = ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in timings.items())
        print(f"{'self-check':<12} {'ok' if ok else 'FAILED'}: one {page >> 20} MiB page "
              f"mapped, written, read back, unmapped ({detail})")
        return 0 if ok else 1
    finally:
        vm.close()


def _mib(text: str) -> int:
    """An argparse type: MiB > 0, as bytes."""
    return int(common.positive_float(text) * (1 << 20))


def _summary(doc: str | None) -> str:
    """A module docstring's first sentence, on one line (a subcommand's help)."""
    text = " ".join((doc or "").split("\n\n")[0].split())
    end = re.search(r"\.\s+(?=[A-Z`])", text)      # not "Fig. 9"
    return text if end is None else text[:end.start() + 1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p_info = commands.add_parser("info", help="backend, granularity, memory, self-check")
    p_info.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if "
                        "present, else cpu)")
    p_info.add_argument("--page-mib", type=_mib, default=2 << 20, dest="page_size_bytes",
                        help="page size for the self-check, MiB (default 2)")
    from vattn import demo

    demo.add_arguments(commands.add_parser("demo", help=_summary(demo.__doc__)))
    p_bench = commands.add_parser("bench", help="benchmarks")
    benches = p_bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        module.add_arguments(benches.add_parser(name, help=_summary(module.__doc__)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # The kernels take CPU tensors only through Triton's interpreter, which must be on
    # before triton is first imported (building the parser imports it): `vattn.kernels`
    # turns it on only where torch sees no CUDA device, and `--device cpu` may be asked
    # for where one is present.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--device", default=None)
    if early.parse_known_args(argv)[0].device == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args = build_parser().parse_args(argv)
    device = args.device or _default_device()
    try:
        if getattr(args, "plot", None):
            common.pyplot()         # before the work, not after it
        if args.command == "info":
            return info(device, args.page_size_bytes)
        if args.command == "demo":
            from vattn import demo

            return demo.run(args, device, _emit)
        return BENCHES[args.bench].run(args, device, _emit)
    except VattnError as exc:
        print(f"vattn: error: {exc}", file=sys.stderr)
        return 1
