"""Training cost of ftattn's checked attention: forward + backward of ftattn.attention at
protection "full" against the same at "off" and against torch SDPA (its CPU flash
attention forward and backward, the peer a user would train with), paired in one run.

Cases (issue 19): B1 H8 N=M=2048, D 64 and 128, causal and not, fp32 and bf16, and a small
model's heads (B8 H12 N=M=128 D32 fp32: all-MiniLM-L6-v2's attention, fine-tuning), and
gradients scaled by 2^10 as fp16 loss scaling makes them (B1 H8 N=M=2048 D64 causal fp32:
there the dQ / dK / dV checks' blind rule once ran the backward twice), on the
CPU (and on CUDA with ``--bench-device=cuda``, where the backward is still the reference's
PyTorch ops). Each ratio is the median over rounds of two calls made back to back, their
order alternating (benchmarks/pairing.py). Targets: full / off <= 1.15, full / SDPA <= 1.0.
Every gradient is checked against SDPA's first (within 2e-3 relative in fp32, 3e-2 in bf16).

Run: ``pytest benchmarks/test_bench_attention_backward.py --benchmark-only``. Writes
``benchmarks/results/attention_backward_<device>.json``.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import ftattn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pairing import paired  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_OFF, TARGET_SDPA = 1.15, 1.0
ROUNDS = 5
CASES = [((1, 8, 2048, d), causal, dtype, ROUNDS, 1.0) for dtype in (torch.float32, torch.bfloat16)
         for d in (64, 128) for causal in (True, False)] + [((8, 12, 128, 32), False, torch.float32, 41, 1.0),
                                                              ((1, 8, 2048, 64), True, torch.float32, ROUNDS, 1024.0)]
_records: dict = {}
_machine: dict = {}


def _step(fn, q, k, v, do):
    def run():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(do)
        if q.is_cuda:
            torch.cuda.synchronize()
        return q.grad, k.grad, v.grad
    return run


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("shape,causal,dtype,rounds,grad_scale", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_forward_backward(benchmark, bench_device, measure, device, shape, causal, dtype, rounds, grad_scale):
    if bench_device not in ("all", device):
        pytest.skip(f"--bench-device={bench_device}")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    B, H, N, d = shape
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(B, H, N, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    do = (torch.randn(B, H, N, d, generator=g) * grad_scale).to(device, dtype)
    full = _step(lambda *t: ftattn.attention(*t, causal=causal, protection="full"), q, k, v, do)
    off = _step(lambda *t: ftattn.attention(*t, causal=causal, protection="off"), q, k, v, do)
    sdpa = _step(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal), q, k, v, do)
    want = [t.clone() for t in sdpa()]
    got = full()
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    for name, a, b in zip("qkv", got, want):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"d{name}: {err} relative to SDPA's"
    benchmark.pedantic(full, rounds=rounds, iterations=1, warmup_rounds=1)
    over_off, t_full, t_off = paired(full, off, rounds)
    over_sdpa, _, t_sdpa = paired(full, sdpa, rounds)
    record = {
        "shape": {"B": B, "H": H, "N": N, "M": N, "D": d}, "causal": causal, "dtype": str(dtype).replace("torch.", ""),
        "grad_scale": grad_scale,
        "rounds": rounds, "median_ms": {"full": t_full * 1e3, "off": t_off * 1e3, "sdpa": t_sdpa * 1e3},
        "full_over_off": over_off, "full_over_sdpa": over_sdpa,
        "targets": {"full_over_off": TARGET_OFF, "full_over_sdpa": TARGET_SDPA},
        "holds": over_off <= TARGET_OFF and over_sdpa <= TARGET_SDPA,
    }
    benchmark.extra_info.update(record)
    _records.setdefault(device, []).append(record)
    _machine[device] = dict(measure.environment(device if device == "cpu" else "cuda:0"),
                            load_average=measure.load_average())


def teardown_module(module):
    for device, records in _records.items():
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"attention_backward_{device}.json"), "w") as fh:
            json.dump({"machine": _machine[device], "ftattn": ftattn.__version__, "cases": records}, fh, indent=1)
