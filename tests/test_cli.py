"""The `vattn` command and the package layout, as a user meets them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("argv, message", [
    (["demo", "--requests", "0"], "argument --requests: expected an int >= 1, got '0'"),
    (["demo", "--chunk", "0"], "argument --chunk: expected an int >= 1, got '0'"),
    (["info", "--page-mib", "0"], "argument --page-mib: expected a number > 0, got '0'"),
    (["bench", "core", "--repeats", "0"], "argument --repeats: expected an int >= 1"),
    (["bench", "e2e", "--batches", "1,-1"], "argument --batches: expected an int >= 1, "
                                            "got '-1'"),
    (["bench", "e2e", "--batches", "x"], "argument --batches: expected an int >= 1"),
    (["bench", "e2e", "--steps", "0"], "argument --steps: expected an int >= 1"),
])
def test_bad_numbers_are_refused_before_any_work(argv: list[str], message: str,
                                                 capsys) -> None:  # type: ignore[no-untyped-def]
    """A 0 is an error, not the default, and nothing runs first."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_e2e_names_a_bad_device_like_the_other_commands(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "e2e", "--device", "gpu"]) == 1
    assert "device must be 'cpu' or 'cuda[:N]', got 'gpu'" in capsys.readouterr().err


def test_a_plot_without_matplotlib_is_refused_before_the_work(
        monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import fails
    assert main(["bench", "alloc", "--device", "cpu", "--plot", "x.png"]) == 1
    captured = capsys.readouterr()
    assert "pip install 'vattn[plot]'" in captured.err and "GiB/s" not in captured.out


def test_subcommand_help_is_a_whole_sentence() -> None:
    from vattn.cli import _summary

    assert _summary("End-to-end decode (vAttention Fig. 9a).\n\nMore.") == (
        "End-to-end decode (vAttention Fig. 9a).")
    assert _summary("First part,\ncontinued. Second. Third") == "First part, continued."


def test_kernels_are_importable_as_vattn_kernels() -> None:
    import vattn.kernels

    assert vattn.kernels.__name__ == "vattn.kernels"


def test_quickstart_example_runs() -> None:
    import pathlib

    script = pathlib.Path(__file__).parent.parent / "examples" / "quickstart.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    # 3000 + 256 slack + twice the 256-token look-ahead, in whole 32-token pages
    assert "holds 3776 tokens" in out.stdout


def test_default_layout_is_token_major() -> None:
    import torch

    import vattn

    with vattn.VirtualKVCache(num_layers=2, num_kv_heads=1, head_dim=64, dtype=torch.float16,
                              max_batch_size=1, max_context_len=64, device="cpu",
                              memory_limit=8 << 20) as cache:
        assert cache.config.layout == "token_major"
        assert cache.kv(1)[0].stride(1) == 2 * 64


def test_bench_overlap_refuses_an_unknown_mode_before_looking_for_a_gpu(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "overlap", "--modes", "premapped,eager"]) == 1
    err = capsys.readouterr().err
    assert "unknown ['eager']" in err and "premapped-async" in err


def test_bench_overlap_refuses_a_negative_interleave_before_looking_for_a_gpu(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "overlap", "--interleave", "-1"]) == 1
    assert "--interleave must be >= 0" in capsys.readouterr().err


def test_the_demo_runs_on_the_cpu_where_torch_sees_a_gpu() -> None:
    """`--device cpu` turns Triton's interpreter on before triton is imported, so the
    host backend's kernels run even where a CUDA device keeps `vattn.kernels` from
    turning it on (here torch is made to report one)."""
    script = ("import torch; torch.cuda.is_available = lambda: True\n"
              "from vattn.cli import main\n"
              "raise SystemExit(main(['demo', '--device', 'cpu', '--requests', '2',"
              " '--max-batch', '2']))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "outputs equal to DynamicCache + generate: 2/2 requests" in out.stdout
