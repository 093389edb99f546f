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


@triton.jit
def _mx_linear_packed_kernel(
    x_ptr, codes_ptr, scales_ptr, table_ptr, bias_ptr, y_ptr,
    T, O, K, K_PAD, ROW_BYTES, NBLK,
    stride_xt, stride_yt,
    BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[T, O] = x[T, K] dequant(W)^T (+ bias) from the packed codes (ftattn.mx.pack's layout:
    output feature o's code j at bit j * BITS of its ROW_BYTES, one E8M0 scale per BLOCK_SIZE
    codes). The weight tile is decoded in registers (value table gather, times the exact
    2^shared_exp: bit for bit unpack's values) and multiplied with tl.dot; HALF: x is
    bfloat16 and so is the decoded tile (exact: MX values have <= 8 significant bits), for
    the tensor cores (the launcher turns it off under the interpreter, whose bfloat16 dot is
    wrong in Triton 3.9: the products are then exact fp32 ones, the same sums)."""
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_t = offs_t < T
    mask_o = offs_o < O
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, K_PAD, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
                    mask=mask_t[:, None] & (offs_k[None, :] < K), other=0.0)
        bitpos = offs_k * BITS
        byte = bitpos // 8
        sh = bitpos % 8
        in_w = mask_o[:, None] & (offs_k[None, :] < K_PAD)
        row = codes_ptr + offs_o[:, None] * ROW_BYTES
        b0 = tl.load(row + byte[None, :], mask=in_w, other=0).to(tl.int32)
        spill = in_w & ((sh[None, :] + BITS) > 8)
        b1 = tl.load(row + byte[None, :] + 1, mask=spill, other=0).to(tl.int32)
        code = ((b0 | (b1 << 8)) >> sh[None, :]) & ((1 << BITS) - 1)
        val = tl.load(table_ptr + code)
        e = tl.load(scales_ptr + offs_o[:, None] * NBLK + (offs_k[None, :] // BLOCK_SIZE), mask=in_w,
                    other=127).to(tl.int32)
        scale = tl.where(e == E8M0_NAN, float("nan"), _exp2i(e - 127))
        w = val * scale
        if HALF:
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), out_dtype=tl.float32)
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_o[None, :], acc, mask=mask_t[:, None] & mask_o[None, :])
