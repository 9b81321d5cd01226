"""`vattn bench pod`: its kernels compute the same attention, and the command runs end to
end (CPU: one tiny cell through the Triton interpreter)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vattn import InvalidArgument
from vattn.bench import common
from vattn.bench.pod import Cell, _ints, summary
from vattn.cli import main


@pytest.mark.host_kernels
def test_every_way_of_computing_a_cell_agrees() -> None:
    cell = Cell(torch.device("cpu"), chunk=20, prefix=33, batch=3, context=50, heads=4,
                kv_heads=2, head_dim=32, seed=5)
    prefills = [fn() for fn in cell.prefill_kernels().values()]
    decodes = [fn() for fn in cell.decode_kernels().values()]
    op, od = cell.pod("proportional")()  # type: ignore[misc]
    as_tensor = [p.out[0] if hasattr(p, "out") else p[0] for p in prefills]
    as_tensor += [op]
    for got in as_tensor[1:]:
        assert torch.allclose(got.float(), as_tensor[0].float(), atol=2e-2, rtol=2e-2)
    flat = [d.out[:, 0] if hasattr(d, "out") else d for d in decodes] + [od]
    for got in flat[1:]:
        assert torch.allclose(got.float(), flat[0].float(), atol=2e-2, rtol=2e-2)


def test_summary_is_the_geometric_mean_and_the_minimum() -> None:
    rows = [{"vs back-to-back": 2.0, "vs two streams": 1.0},
            {"vs back-to-back": 0.5, "vs two streams": 1.21}]
    got = summary(rows)
    assert got["geomean vs back-to-back"] == 1.0
    assert got["geomean vs two streams"] == round(math.sqrt(1.21), 3)
    assert got["min vs back-to-back"] == 0.5


@pytest.mark.host_kernels
def test_bench_pod_runs_on_the_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "pod.json"
    assert main(["bench", "pod", "--device", "cpu", "--repeats", "1", "--json", str(out),
                 "--plot", str(tmp_path / "pod.png")]) == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 1 and data["rows"][0]["pod us"] > 0
    assert set(data["summary"]) >= {"geomean vs back-to-back", "min vs two streams"}
    assert (tmp_path / "pod.png").stat().st_size > 0


@pytest.mark.host_kernels
def test_bench_pod_takes_the_paired_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "pod", "--device", "cpu", "--repeats", "1", "--policy",
                 "paired"]) == 0
    assert "geomean vs back-to-back" in capsys.readouterr().out


def test_the_gpu_scripts_show_a_table_per_cell() -> None:
    shown: list[str] = []
    rows = common.tables_per_cell([1, 2], lambda cell: [{"cell": cell, "twice": 2 * cell}],
                                  shown.append)
    assert rows == [{"cell": 1, "twice": 2}, {"cell": 2, "twice": 4}]
    assert len(shown) == 2 and all("| cell | twice |" in table for table in shown)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="trace_pod needs a CUDA device"):
            common.script_header("trace_pod", shown.append)
        assert len(shown) == 2


def test_bench_pod_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "pod", "--device", "cpu", "--chunks", "0"]) == 1
    assert "--chunks needs values >= 1" in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match="--prefixes must be comma-separated ints"):
        _ints("1,x", "prefixes")


@pytest.mark.host_kernels
def test_a_second_baseline_is_timed_when_flashattention_3_is_present(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The headline baseline never picks FA3; the "(with FA3)" one does when it is the
    fastest. Here a stand-in FA3 (SDPA under that name) is present on the CPU, and the
    clock says any call that runs it takes 1 us, everything else 1 ms."""
    from vattn.bench import pod

    ran_fa3 = [0]
    for method in ("prefill_kernels", "decode_kernels"):
        original = getattr(Cell, method)

        def with_fa3(self: Cell, original=original) -> dict:  # type: ignore[no-untyped-def]
            kernels = original(self)
            sdpa = kernels["sdpa"]

            def fa3() -> object:
                ran_fa3[0] += 1
                return sdpa()
            return {**kernels, "flash-attn-3": fa3}
        monkeypatch.setattr(Cell, method, with_fa3)

    def clock(fn, device, repeats) -> float:  # type: ignore[no-untyped-def]
        before = ran_fa3[0]
        fn()
        return 1e-6 if ran_fa3[0] > before else 1e-3
    monkeypatch.setattr(pod, "_time", clock)
    cell = Cell(torch.device("cpu"), chunk=8, prefix=4, batch=2, context=20, heads=4,
                kv_heads=2, head_dim=32)
    row = pod.measure(cell, torch.device("cpu"), "50:50", 1, {"chunk": 8})
    assert "flash-attn-3" not in (row["prefill kernel"], row["decode kernel"])
    assert row["prefill kernel (with FA3)"] == row["decode kernel (with FA3)"] == "flash-attn-3"
    assert row["vs back-to-back"] == 1.0 and row["vs back-to-back (with FA3)"] == 0.001
    assert set(pod.summary([row])) == {f"{kind} {key}{suffix}" for kind in ("geomean", "min")
                                       for key in ("vs back-to-back", "vs two streams")
                                       for suffix in ("", " (with FA3)")}
