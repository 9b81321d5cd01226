"""The `vattn` command and the package layout, as a user meets them."""

from __future__ import annotations

import subprocess
import sys

from vattn.cli import main


def test_info_on_host_backend_passes_its_self_check(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "backend      host" in out
    assert "self-check   ok" in out


def test_python_dash_m_vattn() -> None:
    out = subprocess.run([sys.executable, "-m", "vattn", "info", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "self-check   ok" in out.stdout


def test_bad_device_is_a_clear_error(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "--device", "tpu"]) == 1
    assert "device must be 'cpu' or 'cuda[:N]'" in capsys.readouterr().err


def test_kernels_are_importable_as_vattn_kernels() -> None:
    import vattn.kernels

    assert vattn.kernels.__name__ == "vattn.kernels"
