"""MX (microscaling) quantize-dequantize, Triton kernel (CUDA; CPU under TRITON_INTERPRET=1).

Algorithm: one program quantizes BLOCKS consecutive MX blocks of one row, each
block_size values sharing an E8M0 scale, in a single pass (load, amax,
shared exponent, element rounding, store), bit-exact with
``ftattn.mx.quantize_reference`` (Microsoft microxcaling's _quantize_mx,
shared_exp_method "max", scale_bits 8) on the same device:

* amax is the integer max of the magnitude bit patterns (equal to the float max
  for finite values); a NaN/Inf anywhere makes the whole block NaN (scale 0xFF);
* floor(torch.log2(v)) is the exponent field plus one comparison with a
  per-binade threshold table computed from torch.log2 on the device
  (``_log2_thresholds`` in ftattn/mx/quantize.py), which reproduces torch
  rounding values just below a power of two up to it;
* every multiplication is by an exact power of two built from its bits, so
  fusing them into FMAs cannot change a result; the final
  ``element * 2**shared_exp`` rounds into the subnormals as torch does.

Limits: float32 in and out; blocks along the last axis of a 2-D [rows, K] view
(the launcher, ftattn/_launch/mx.py, transposes other axes); block_size up to 4096.
"""
from __future__ import annotations

import triton
import triton.language as tl

SCALE_EMAX = 127  # E8M0 exponent range [-127, 127]; 0xFF is NaN
E8M0_NAN = 255


@triton.jit
def _exp2i(k):
    """2**k as float32 for int32 k in [-149, 127] (exact)."""
    normal = ((k + 127) << 23).to(tl.int32)
    sub_shift = tl.minimum(tl.maximum(k + 149, 0), 22)
    subnormal = (tl.full(k.shape, 1, tl.int32) << sub_shift).to(tl.int32)
    return tl.where(k >= -126, normal, subnormal).to(tl.float32, bitcast=True)


@triton.jit
def _floor_log2(abits, thr_ptr):
    """floor(torch.log2(v)) for finite v > 0 given its bits (clamped below at -127)."""
    b = abits >> 23
    e = tl.where(b == 0, -127, b - 127)
    thr = tl.load(thr_ptr + b)
    return e + (abits >= thr).to(tl.int32)


@triton.jit
def _mx_quantize_kernel(
    x_ptr, out_ptr, scale_ptr, thr_ptr,
    # sizes
    K, nblk,
    # strides (rows; the blocked axis is contiguous)
    stride_x, stride_out, stride_scale,
    # element format (microxcaling's parameters)
    EMAX, MAX_NORM,
    EBITS: tl.constexpr, MBITS: tl.constexpr, MIN_EXP: tl.constexpr,
    # meta-parameters
    ROUNDING: tl.constexpr,  # 0 nearest (half away), 1 floor, 2 even
    SCALED: tl.constexpr,  # keep the elements divided by their block scale (pack)
    BLOCK_SIZE: tl.constexpr, BLOCK_SIZE_P2: tl.constexpr, BLOCKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    col = tl.arange(0, BLOCK_SIZE_P2)
    k = blk[:, None] * BLOCK_SIZE + col[None, :]
    mask = (col[None, :] < BLOCK_SIZE) & (k < K) & (blk[:, None] < nblk)
    x = tl.load(x_ptr + row * stride_x + k, mask=mask, other=0.0)

    # --- shared exponent: floor(log2(amax)) - emax, clamped to [-127, 127]
    mag = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    nonfinite = tl.max(((mag & 0x7F800000) == 0x7F800000).to(tl.int32), axis=1)
    amax = tl.max(mag, axis=1)
    e = tl.where(amax == 0, -126, _floor_log2(amax, thr_ptr))  # log2(amax + 2**-126 [amax == 0])
    s = tl.maximum(e - EMAX, -SCALE_EMAX)
    nan_block = (nonfinite != 0) | (s > SCALE_EMAX)
    s = tl.where(nan_block, 0, s)

    # --- elements, in the scaled domain (microxcaling's _quantize_elemwise_core)
    a = tl.where(nan_block[:, None], 0.0, x * _exp2i(-s)[:, None])  # NaN blocks: stored as NaN below
    absa = tl.abs(a)
    if EBITS == 0:
        up = absa * (1 << (MBITS - 2))
        unit = 1.0 / (1 << (MBITS - 2))
    else:
        abits = absa.to(tl.int32, bitcast=True)
        p = tl.where(abits == 0, 0, _floor_log2(abits, thr_ptr))  # a == 0: log2(0 + 1)
        p = tl.maximum(p, MIN_EXP)
        up = absa * _exp2i(MBITS - 2 - p)
        unit = _exp2i(p - (MBITS - 2))
    if ROUNDING == 1:
        r = up.to(tl.int32).to(tl.float32)  # floor of a non-negative value
    else:
        r = (up + 0.5).to(tl.int32).to(tl.float32)
        if ROUNDING == 2:
            t = up - 0.5  # ties 0.5, 2.5, 4.5, ... go down to even
            tie = (t >= 0.0) & ((t * 0.5).to(tl.int32).to(tl.float32) * 2.0 == t)
            r = r - tie.to(tl.float32)
    q = tl.minimum(r * unit, MAX_NORM)
    q = tl.where(a < 0.0, -q, q)
    if not SCALED:
        q = q * _exp2i(s)[:, None]
    q = tl.where(nan_block[:, None], float("nan"), q)
    tl.store(out_ptr + row * stride_out + k, q, mask=mask)
    scale = tl.where(nan_block, E8M0_NAN, s + SCALE_EMAX).to(tl.uint8)
    tl.store(scale_ptr + row * stride_scale + blk, scale, mask=blk < nblk)
