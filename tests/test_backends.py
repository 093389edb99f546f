"""One backend registry (ftattn/backends.py) for every op: the same names, the same
"auto" rule, the reason a backend cannot run, and `python -m ftattn info` reading it."""
import pytest
import torch

import ftattn
import ftattn.mx  # noqa: F401  (registers the MX quantizer)
from ftattn import backends

OPS = {"attention": ["cpp", "triton", "reference"], "mx_quantize": ["cpp", "triton", "torch"]}


def test_every_op_is_registered_with_its_names():
    assert set(OPS) <= set(backends.ops())
    for op, names in OPS.items():
        assert backends.names(op) == ["auto"] + names
        assert list(backends.status(op, "cpu")) == names


@pytest.mark.parametrize("op", OPS)
def test_auto_takes_the_native_kernel_else_the_pure_pytorch_one(op, monkeypatch):
    fallback = OPS[op][-1]
    assert backends.resolve(op, "auto", torch.device("cpu")) == backends.Backend.CPP
    # a device without a native kernel, and CUDA without triton: the pure-PyTorch one
    assert backends.resolve(op, "auto", torch.device("meta")).value == fallback
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    assert backends.resolve(op, "auto", torch.device("cuda")).value == fallback
    with pytest.raises(NotImplementedError, match=r"backend='triton' cannot run here \(.*triton is not installed"):
        backends.resolve(op, "triton", torch.device("cuda"))


@pytest.mark.parametrize("op", OPS)
def test_unknown_or_foreign_names_are_refused_with_the_supported_ones(op):
    other = "torch" if op == "attention" else "reference"
    for bad in ("gpu", other):
        with pytest.raises(ValueError, match=f"backend='{bad}' is not supported by {op}; use one of 'auto'"):
            backends.parse(op, bad)


def test_reasons_name_the_device_and_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    status = backends.status("attention", "meta")
    assert "CPU tensors; these are on meta" in status["cpp"]
    assert status["reference"] is None
    assert "TRITON_INTERPRET=1" in backends.status("mx_quantize", "cpu")["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backends.importlib.util.find_spec("triton") is not None:
        assert backends.status("attention", "cpu")["triton"] is None


def test_the_public_functions_use_the_registry(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="not supported by attention"):
        ftattn.attention(x, x, x, backend="torch")
    with pytest.raises(ValueError, match="not supported by mx_quantize"):
        ftattn.mx.quantize(torch.ones(3), "int8", backend="reference")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        ftattn.mx.quantize(torch.ones(3), "int8", backend="triton")


def test_resolutions_kept_per_process_follow_triton_interpret(monkeypatch):
    """attention and linear keep what backend= resolved to, except Triton on the CPU:
    TRITON_INTERPRET turns it on and off at any time (a kept "triton" gave Triton's own
    "0 active drivers" instead of the reason)."""
    pytest.importorskip("triton")
    q, x, w = torch.randn(1, 1, 3, 4), torch.randn(2, 4), torch.randn(3, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ftattn.attention(q, q, q, backend="triton")
    ftattn.linear(x, w, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    for call in (lambda: ftattn.attention(q, q, q, backend="triton"), lambda: ftattn.linear(x, w, backend="triton")):
        with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
            call()
    cpu = torch.device("cpu")
    assert backends.resolved("attention", "cpp", cpu) == "cpp"
    assert ("attention", "cpp", cpu) in backends._KEPT and ("attention", "triton", cpu) not in backends._KEPT
    with pytest.raises(ValueError, match="is not supported by attention"):
        ftattn.attention(q, q, q, backend=["cpp"])
