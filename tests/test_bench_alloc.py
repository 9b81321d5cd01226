"""`vattn bench alloc` on the host backend: the raw loop makes the calls `step` makes, the
command runs end to end on a CPU and writes its JSON and plot, bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

import vattn.driver
from vattn.bench import alloc
from vattn.cli import main
from vattn.driver.host import HostVirtualMemory
from vattn.layout import LAYOUTS

MiB = 1 << 20
SMALL = alloc.ModelShape("small", 2, 2, 64, torch.float16)
SMALL_ARGS = ["--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--dtype", "float16"]


class RecordingVM(HostVirtualMemory):
    """The host backend, recording map / set-access / unmap relative to its first
    reservation."""

    def __init__(self) -> None:
        super().__init__()
        self.base: int | None = None
        self.log: list[tuple[str, int, int]] = []

    def reserve(self, size_bytes: int, alignment_bytes: int) -> int:
        address = super().reserve(size_bytes, alignment_bytes)
        self.base = address if self.base is None else self.base
        return address

    def map(self, address: int, size_bytes: int, handle: int) -> None:
        self.log.append(("map", address - (self.base or 0), size_bytes))
        super().map(address, size_bytes, handle)

    def set_access(self, address: int, size_bytes: int) -> None:
        self.log.append(("set_access", address - (self.base or 0), size_bytes))
        super().set_access(address, size_bytes)

    def unmap(self, address: int, size_bytes: int) -> None:
        self.log.append(("unmap", address - (self.base or 0), size_bytes))
        super().unmap(address, size_bytes)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_raw_loop_makes_exactly_the_calls_of_step(layout: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Three slots of two pages a tensor: runs of 2 pages, several tensors.
    tokens = 2 * MiB * 2 // (256 if layout == "per_layer" else 512) - 100
    w = alloc.Workload(SMALL, layout, 2 * MiB, 3, tokens)
    cache_vm = RecordingVM()
    monkeypatch.setattr(vattn.driver, "open_backend", lambda device: cache_vm)
    with w.cache("cpu") as cache:
        slots = [cache.allocate() for _ in range(3)]
        cache.grow_pool(w.bytes_mapped())
        cache_vm.log.clear()                  # the anchor page is not the step's work
        cache.step(dict.fromkeys(slots, tokens))
        step_calls = list(cache_vm.log)
        layout_ = cache.layout
    raw_vm = RecordingVM()
    raw = alloc.RawLoop(raw_vm, layout_, 3, layout_.pages_for_tokens(tokens))
    try:
        raw.create()
        raw.map()
        assert raw.num_pages == len([c for c in step_calls if c[0] == "map"])
        assert raw_vm.log == step_calls
        assert len({c[1] for c in step_calls if c[0] == "set_access"}) == 3 * \
            layout_.num_tensors
        raw.unmap()
        assert sorted(c[1] for c in raw_vm.log if c[0] == "unmap") == sorted(
            c[1] for c in step_calls if c[0] == "map")
    finally:
        raw.close()
        raw_vm.close()
    assert raw.handles == [] and raw.mapped == []


def test_bench_alloc_on_the_host(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out_json, out_png = tmp_path / "alloc.json", tmp_path / "alloc.png"
    rc = main(["bench", "alloc", "--device", "cpu", *SMALL_ARGS, "--batch", "2", "--tokens",
               "64", "--page-mib", "2,4", "--repeats", "2", "--latency-calls", "3",
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "backend: host" in text and "Latency of one call" in text
    result = json.loads(out_json.read_text())
    rows = result["bandwidth"]
    assert [(r["layout"], r["page MiB"]) for r in rows] == [
        ("per_layer", 2), ("token_major", 2), ("per_layer", 4), ("token_major", 4)]
    for r in rows:
        # 64 tokens fit one page: 2 slots x one page in each tensor.
        assert r["pages"] == 2 * (4 if r["layout"] == "per_layer" else 2)
        for path in alloc.PATHS:
            assert r[f"{path} GiB/s"] > 0 and r[f"{path} create incl."] > 0
    assert [r["page MiB"] for r in result["latency"]] == [2, 4]
    for r in result["latency"]:
        assert r["calls"] == 3
        assert all(r[f"{k} us"] > 0 for k in ("create", "map", "unmap", "release"))
    need = 32 * SMALL.token_bytes / 0.010 / (1 << 30)
    assert all(d["need GiB/s"] == round(need, 3) for d in result["demand"])
    per_layer_2 = result["demand"][0]
    assert per_layer_2["burst MiB"] == 32 * 4 * 2       # 32 requests x 4 tensors x 2 MiB
    assert result["skipped"] == []
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_over_budget_cases_are_skipped_with_the_reason(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out_json = tmp_path / "alloc.json"
    assert main(["bench", "alloc", "--device", "cpu", *SMALL_ARGS, "--batch", "2",
                 "--tokens", "64", "--page-mib", "2", "--repeats", "1", "--latency-calls",
                 "1", "--layouts", "per_layer", "--max-gib", "0.01",
                 "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["bandwidth"] == []
    assert "over the 0.0 GiB budget" in result["skipped"][0]


@pytest.mark.parametrize("argv, message", [
    (["--page-mib", "2,x"], "--page-mib takes comma-separated integers > 0"),
    (["--page-mib", "0"], "--page-mib takes comma-separated integers > 0"),
    (["--layouts", "paged"], "layout must be one of"),
    (["--batch", "-1"], "argument --batch: expected an int >= 1, got '-1'"),
    (["--iteration-ms", "0"], "argument --iteration-ms: expected a number > 0, got '0'"),
    (["--kv-heads", "0"], "argument --kv-heads: expected an int >= 1, got '0'"),
])
def test_bad_arguments_are_clear_errors(argv: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    if message.startswith("argument"):      # refused by the parser: usage and exit 2
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "alloc", "--device", "cpu", *SMALL_ARGS, *argv])
        assert exit_info.value.code == 2
    else:
        assert main(["bench", "alloc", "--device", "cpu", *SMALL_ARGS, *argv]) == 1
    assert message in capsys.readouterr().err
