from ftattn.__main__ import main


def test_info_lists_backends_and_why_not(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "C++ extension:" in out
    assert "attention backends on cpu:" in out and "mx_quantize backends on cpu:" in out
    assert "cpp        available" in out
    assert "triton     unavailable: CPU tensors need TRITON_INTERPRET=1" in out


def test_unknown_command_is_an_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["campain"])
    assert exc.value.code == 2
    assert "unknown command 'campain'" in capsys.readouterr().err
