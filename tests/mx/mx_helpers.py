"""Shared helpers of the MX tests: the microxcaling goldens and a bit-exact comparison
(a uniquely named module: `from conftest import` would pick whichever conftest.py
was loaded last)."""
import os

import numpy as np
import torch

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "data", "mx_golden_dev.npz")
FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8", "int4", "int2")
ROUNDINGS = ("nearest", "even", "floor")


def assert_bitexact(actual, expected, what=""):
    """NaN positions equal and every other value identical, sign of zero included."""
    a = np.ascontiguousarray(actual.detach().cpu().numpy() if torch.is_tensor(actual) else actual, np.float32)
    e = np.ascontiguousarray(expected, np.float32)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    na, ne = np.isnan(a), np.isnan(e)
    assert np.array_equal(na, ne), f"{what}: NaN positions differ at {np.argwhere(na != ne)[:5].tolist()}"
    diff = a[~na].view(np.int32) != e[~ne].view(np.int32)
    if diff.any():
        idx = np.argwhere(~na)[diff][:5].tolist()
        raise AssertionError(f"{what}: {int(diff.sum())} values differ, first at {idx}: "
                             f"{a[~na][diff][:5].tolist()} != {e[~ne][diff][:5].tolist()}")


def special_values_tensor(shape=(7, 101), seed=0):
    """Odd-shaped float32 data with every edge case of the quantizer sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())
    flat = x.view(-1)
    n = flat.numel()
    picks = torch.randperm(n, generator=g)
    specials = [0.0, -0.0, 0.5, -2.5, 1.5, 0.25, 448.0, 449.0, 57344.0, 1e-40, -3e-39, 1.17e-38,
                15.999999, 1023.9999, 0.49999997, 3.4e38, -3.4e38, 2.0**-127, 6.0, 7.5, 28.0]
    for i, v in enumerate(specials):
        flat[picks[i]] = v
    # powers of two and values 1-3 ulp below them (torch.log2 rounds those up)
    for j, e in enumerate(range(-130, 128, 7)):
        v = torch.tensor(2.0**e if e >= -149 else 0.0, dtype=torch.float32)
        below = (v.view(torch.int32) - (j % 3 + 1)).view(torch.float32)
        flat[picks[len(specials) + 2 * j]] = v
        flat[picks[len(specials) + 2 * j + 1]] = below
    # one row with a NaN, one with an Inf, one all zeros, one all subnormal
    x[1, 3] = float("nan")
    x[2, 40] = float("-inf")
    x[3].zero_()
    x[4] = torch.randn(shape[1], generator=g) * 1e-39
    return x
