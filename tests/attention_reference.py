"""Reference attention and input factory shared by the attention tests (a uniquely
named module: `from conftest import` would pick whichever conftest.py was loaded last)."""
import math

import torch


def attention_ref(q, k, v, causal=False, scale=None, upcast=True):
    """softmax(q k^T * scale) v with bottom-right causal alignment and GQA.

    upcast=True computes in float64 (the reference); upcast=False in q's dtype,
    which is "torch's own attention in the same dtype" of the flash-attention
    test rule. Rows with no visible key are zeros.
    """
    dtype = torch.float64 if upcast else q.dtype
    N, M, D = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (qd @ kd.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(N)[:, None]
        j = torch.arange(M)[None, :]
        s = s.masked_fill(j > i + (M - N), float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = p @ vd
    return torch.nan_to_num(out, nan=0.0)


def make_qkv(B=1, Hq=2, Hkv=None, N=17, M=17, D=16, dtype=torch.float32, seed=0, kind="normal"):
    """Seeded q, k, v of the given shapes, normal or uniform [-1, 1)."""
    Hkv = Hq if Hkv is None else Hkv
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, N, D), (B, Hkv, M, D), (B, Hkv, M, D))
    if kind == "uniform":
        ts = [torch.rand(*s, generator=g) * 2 - 1 for s in shapes]
    else:
        ts = [torch.randn(*s, generator=g) for s in shapes]
    return tuple(t.to(dtype) for t in ts)


# q, k, v (and the backward's out and grad_out) as the views models pass: each layout
# holds the contiguous tensor's values, with NaN in every element the view skips, so a
# kernel that reads outside the view shows it in its output or flags
def bnhd_view(t):  # [B, N, H, D] memory, heads transposed (a projection's view)
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def padded_view(t):  # a slice of wider rows, [B, N, H, D + 5] (a fused qkv projection)
    buf = torch.full(t.shape[:1] + (t.shape[2], t.shape[1], t.shape[3] + 5), float("nan"), dtype=t.dtype)
    buf[..., :t.shape[3]] = t.transpose(1, 2)
    return buf[..., :t.shape[3]].transpose(1, 2)


def every_other_row_view(t):
    buf = torch.full(t.shape[:2] + (2 * t.shape[2], t.shape[3]), float("nan"), dtype=t.dtype)
    buf[:, :, ::2] = t
    return buf[:, :, ::2]


def cache_slice_view(t):  # the first rows of a preallocated cache [B, H, rows + 7, D]
    buf = torch.full(t.shape[:2] + (t.shape[2] + 7, t.shape[3]), float("nan"), dtype=t.dtype)
    buf[:, :, :t.shape[2]] = t
    return buf[:, :, :t.shape[2]]


LAYOUTS = {"bnhd": bnhd_view, "padded": padded_view, "every_other_row": every_other_row_view,
           "cache_slice": cache_slice_view}
