"""Background mapping on a GPU, each scenario in a subprocess (tests/gpu_scenarios.py)."""

from __future__ import annotations

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
