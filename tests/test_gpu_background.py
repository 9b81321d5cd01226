"""Background mapping on a GPU, each scenario in a subprocess (tests/gpu_scenarios.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.parametrize("scenario", ["decode_loop_with_background_mapping",
                                      "unmap_waits_for_a_long_kernel"])
def test_scenario(scenario: str) -> None:
    out = subprocess.run([sys.executable, "-m", "tests.gpu_scenarios", scenario],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_bench_overlap_interleaved_runs_every_mode_to_the_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "overlap.json"
    out = subprocess.run(
        [sys.executable, "-m", "vattn", "bench", "overlap", "--cases", "b", "--layouts",
         "token_major", "--layers", "2", "--iterations", "800", "--rounds", "2",
         "--interleave", "37", "--modes", "premapped,sync,background", "--json", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(path.read_text())
    assert {m: len(t) for m, t in result["raw"]["b-token_major"].items()} == {
        "premapped": 1600, "sync": 1600, "background": 1600}
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["premapped"]["iters mapping"] == 0
    assert rows["sync"]["iters mapping"] > 0 and rows["background"]["iters mapping"] > 0
    assert [r["pages created in loop"] for r in rows.values()] == [0, 0, 0]
