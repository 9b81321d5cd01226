"""`vattn bench e2e`: the same decoder on every KV backend gives the same tokens (CPU,
float32, through the Triton interpreter), and the command runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from vattn.bench.e2e import decode, make_kv
from vattn.bench.e2e_model import MODELS, Decoder
from vattn.cli import main


@pytest.mark.host_kernels
def test_every_backend_decodes_the_same_tokens() -> None:
    shape, dev = MODELS["tiny"], torch.device("cpu")
    decoder = Decoder(shape, dev, torch.float32, seed=3)
    batch, context, steps = 3, 37, 6             # past a 16-token block, not a multiple
    tokens = {}
    for name in ("vattn", "static", "paged-16", "paged-128"):
        kv = make_kv(name, shape, batch, context + steps + 1, dev, torch.float32)
        try:
            tokens[name], _, _ = decode(decoder, kv, batch, context, steps, graph=False)
        finally:
            kv.close()
    assert len(tokens["vattn"]) == steps and len(set(map(str, tokens["vattn"]))) > 1
    for name, got in tokens.items():
        assert got == tokens["static"], name


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.host_kernels),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bench_e2e_runs(tmp_path, device: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--device", device, "--models", "tiny", "--batches", "2",
                 "--context", "40", "--steps", "4", "--repeats", "2", "--json", str(out),
                 "--plot", str(tmp_path / "e2e.png")]) == 0
    assert (tmp_path / "e2e.png").stat().st_size > 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["vattn / it"] == "1.00x"
    assert [r["backend"] for r in rows] == ["vattn", "static", "paged-16", "paged-128",
                                            "hf-static"]
    assert all(r["tokens/s"] > 0 and r["spread"].endswith("%") for r in rows)
