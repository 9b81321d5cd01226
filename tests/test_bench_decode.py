"""`vattn bench decode`: the kernels it times compute the same attention (checked on the
CPU through the Triton interpreter), it refuses a CPU, and it runs end to end on a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from vattn.bench.decode import Workload
from vattn.cli import main


@pytest.mark.host_kernels
@pytest.mark.parametrize("layout", ["per_layer", "token_major"])
@pytest.mark.parametrize("equal", [True, False])
def test_the_timed_kernels_agree(layout: str, equal: bool) -> None:
    lengths = [150, 150] if equal else [150, 37]
    w = Workload("cpu", layout, 4, 2, 64, lengths, 2)
    try:
        kernels = w.kernels(equal, (16, 128))
        expected = {"vattn-triton", "paged-16", "paged-128"} | ({"sdpa"} if equal else set())
        assert set(kernels) == expected
        ours = kernels["vattn-triton"][0]()
        assert isinstance(ours, torch.Tensor) and not torch.isnan(ours).any()
        for name, calls in kernels.items():
            got = calls[0]()                       # layer 0 in every kernel
            assert isinstance(got, torch.Tensor)
            got = got.reshape(ours.shape).float()
            assert torch.allclose(got, ours.float(), atol=2e-2, rtol=0), name
    finally:
        w.close()


def test_bench_decode_needs_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "decode", "--device", "cpu"]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_decode_runs_on_a_gpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--contexts", "512", "--batches", "2",
                 "--layouts", "token_major", "--repeats", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"vattn-triton", "torch-fa2", "paged-16", "paged-128"} <= kernels
    assert all(r["us"] > 0 for r in rows)
