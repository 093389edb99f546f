from ftattn.__main__ import main


def test_info_lists_backends_and_why_not(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "C++ extension:" in out
    assert "attention backends on cpu:" in out and "mx_quantize backends on cpu:" in out
    assert "cpp        available" in out
    assert "bf16 products (C++ attention and linear): " in out
    assert "triton     unavailable: CPU tensors need TRITON_INTERPRET=1" in out


def test_unknown_command_is_an_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["campain"])
    assert exc.value.code == 2
    assert "unknown command 'campain'" in capsys.readouterr().err


def _cpu_has_bf16_dot() -> bool:
    import platform

    if platform.machine() != "x86_64":
        return False
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_cpu_bf16_gemm_follows_the_cpu_and_both_switches(monkeypatch):
    """The C++ attention runs bf16 products on oneDNN's brgemm exactly where the CPU has
    bf16 dot products (AVX512-BF16 or AMX-BF16) and torch's oneDNN is on; FTATTN_GEMM16=0
    and torch.backends.mkldnn.flags(enabled=False) each turn it off, per call."""
    import torch

    import ftattn

    monkeypatch.delenv("FTATTN_GEMM16", raising=False)
    expected = _cpu_has_bf16_dot() and torch.backends.mkldnn.is_available()
    assert ftattn._C.cpu_bf16_gemm() == expected
    with torch.backends.mkldnn.flags(enabled=False):
        assert not ftattn._C.cpu_bf16_gemm()
    assert ftattn._C.cpu_bf16_gemm() == expected
    monkeypatch.setenv("FTATTN_GEMM16", "0")
    assert not ftattn._C.cpu_bf16_gemm()
