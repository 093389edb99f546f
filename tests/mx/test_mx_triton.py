"""kernels/mx.py (Triton) bit-exact with the goldens and the reference, under the Triton
interpreter on CPU (TRITON_INTERPRET=1 must be set before triton is imported, hence a
subprocess). On CUDA the same test body runs directly."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

BODY = textwrap.dedent('''
    import numpy as np, torch, sys
    sys.path.insert(0, {tests!r})
    import ftattn
    from ftattn import mx
    from mx_helpers import assert_bitexact, special_values_tensor
    device = {device!r}
    d = np.load({golden!r})
    for case in ("edge", "rand"):
        x = torch.from_numpy(d["x_" + case]).to(device)
        for fmt in mx.FORMATS:
            roundings = ("nearest", "even", "floor") if case == "edge" and fmt in ("fp8_e4m3", "fp4_e2m1", "int8") \\
                else ("nearest",)
            for r in roundings:
                q, s = mx.quantize_with_scales(x, fmt, rounding=r, backend="triton")
                assert_bitexact(q.cpu(), d[f"q_{{case}}__{{fmt}}__{{r}}"], f"{{case}} {{fmt}} {{r}}")
    x = torch.from_numpy(d["x_rand"]).to(device)
    for fmt in ("fp6_e2m3", "int2"):
        assert_bitexact(mx.quantize(x, fmt, axis=-2, backend="triton").cpu(), d[f"q_rand_axis-2__{{fmt}}__nearest"])
    x = special_values_tensor(shape=(5, 45)).to(device)
    for bs, axis in ((7, -1), (32, 0), (1, -1)):
        for fmt in ("fp8_e5m2", "int4"):
            for r in ("nearest", "even", "floor"):
                got, scale = mx.quantize_with_scales(x, fmt, bs, axis, r, backend="triton")
                ref, ref_scale = mx.quantize_with_scales(x, fmt, bs, axis, r, backend="torch")
                assert_bitexact(got.cpu(), ref.cpu(), f"{{fmt}} {{r}} {{bs}} {{axis}}")
                assert torch.equal(scale.cpu(), ref_scale.cpu())
    packed = mx.pack(x, "fp4_e2m1", backend="triton")
    assert_bitexact(mx.unpack(packed).cpu(), mx.quantize(x.cpu(), "fp4_e2m1").numpy())
    print("TRITON-OK")
''')


def _body(device):
    here = os.path.dirname(os.path.abspath(__file__))
    return BODY.format(tests=here, device=device, golden=os.path.join(here, "..", "data", "mx_golden_dev.npz"))


def test_triton_kernel_interpreter_bitexact():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _body("cpu")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stderr[-4000:]


def test_triton_kernel_cuda_bitexact():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    exec(compile(_body("cuda"), "<triton-cuda>", "exec"), {})
