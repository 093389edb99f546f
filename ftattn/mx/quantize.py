"""MX quantization: fake quantization (``quantize``), real storage (``pack`` / ``unpack``).

Semantics are Microsoft microxcaling's ``_quantize_mx`` with
``shared_exp_method="max"``, ``scale_bits=8`` (E8M0), quirks included (see
../shared/golden/MX_GOLDEN.txt): per block of ``block_size`` values along
``axis`` (the last partial block is zero-padded),

    shared_exp = clamp(floor(torch.log2(amax)) - emax, -127, 127)  (NaN if > 127)
    element    = round_mantissa(x / 2**shared_exp) saturated to +-max_norm
    out        = element * 2**shared_exp

with ``amax == 0`` read as 2**-126, any NaN/Inf in a block making the whole block
NaN, element exponents ``floor(torch.log2(|a|))`` clipped to the format's
minimum, and "nearest" rounding half away from zero as ``floor(|a| + 0.5)`` in
float32.

Each backend is bit-exact with ``quantize_reference`` (plain torch ops, the
reading of microxcaling's code): the fused C++ CPU kernel (csrc/mx_cpu.cpp) and
the Triton kernel (kernels/mx.py, CUDA or the Triton interpreter).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .. import backends
from ..backends import Backend

from .formats import (
    E8M0_NAN,
    ROUNDING_CODE,
    SCALE_EMAX,
    ElementFormat,
    Rounding,
    decode_table,
    e8m0_to_scale_exp,
    get_format,
    get_rounding,
    scale_exp_to_e8m0,
)

__all__ = [
    "Backend",
    "MXTensor",
    "quantize",
    "quantize_reference",
    "quantize_with_scales",
    "quantize_bfloat",
    "quantize_bfloat_reference",
    "pack",
    "unpack",
    "decode_blocks",
    "backend_status",
]

FP32_MIN_NORMAL = 2.0**-126
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------
# validation


def _check_args(x, fmt, block_size, axis, rounding) -> Tuple[ElementFormat, Rounding, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ftattn.mx: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"ftattn.mx: x.dtype={x.dtype} is not supported: MX quantizes floating-point tensors "
                        f"({', '.join(str(d) for d in SUPPORTED_DTYPES)}); convert with x.float()")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"ftattn.mx: x.dtype={x.dtype} is not supported; use one of "
                        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} (e.g. x.float())")
    f = get_format(fmt)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"ftattn.mx: block_size must be an int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"ftattn.mx: block_size={block_size} must be >= 1 (the OCP MX block size is 32)")
    if x.dim() == 0:
        raise ValueError("ftattn.mx: x must have at least one dimension to block along; got a 0-d tensor "
                         "(use x.reshape(1))")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
        raise ValueError(f"ftattn.mx: axis={axis!r} is out of range for a {x.dim()}-d tensor; "
                         f"use an int in [{-x.dim()}, {x.dim() - 1}]")
    return f, get_rounding(rounding), axis % x.dim()


def _as_3d(x: torch.Tensor, axis: int) -> torch.Tensor:
    """x viewed as [outer, K, inner] with K the blocked axis (a copy only if x is not contiguous)."""
    shape = x.shape
    outer = 1
    for s in shape[:axis]:
        outer *= s
    inner = 1
    for s in shape[axis + 1:]:
        inner *= s
    return x.contiguous().view(outer, shape[axis], inner)


# ---------------------------------------------------------------------------
# reference: whole-tensor torch ops, read off microxcaling


def _round_reference(a: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    if rounding is Rounding.FLOOR:
        return torch.sign(a) * torch.floor(torch.abs(a))
    if rounding is Rounding.NEAREST:
        return torch.sign(a) * torch.floor(torch.abs(a) + 0.5)
    absa = torch.abs(a)
    tie = ((absa - 0.5) % 2 == 0).to(a.dtype)  # 0.5, 2.5, 4.5, ...: round down to even
    return torch.sign(a) * (torch.floor(absa + 0.5) - tie)


def _quantize_elements_reference(a, mbits, ebits, max_norm, rounding, saturate=True):
    """microxcaling's _quantize_elemwise_core (allow_denorm=True)."""
    if ebits:
        min_exp = 2 - 2 ** (ebits - 1)
        p = torch.floor(torch.log2(torch.abs(a) + (a == 0).to(a.dtype))).clamp(min=min_exp)
        out = a / 2**p * 2 ** (mbits - 2)
    else:
        p = None
        out = a * 2 ** (mbits - 2)
    out = _round_reference(out, rounding)
    out = out / 2 ** (mbits - 2) if p is None else out / 2 ** (mbits - 2) * 2**p
    if saturate or not ebits:
        out = torch.clamp(out, min=-max_norm, max=max_norm)
    else:
        out = torch.where(torch.abs(out) > max_norm, torch.sign(out) * float("inf"), out)
        out = torch.where(torch.isinf(a), a, out)
    return out


def _blocks(x3: torch.Tensor, block_size: int) -> torch.Tensor:
    """[outer, K, inner] -> [outer, nblk, block_size, inner], zero-padded along K."""
    outer, K, inner = x3.shape
    nblk = -(-K // block_size)
    pad = nblk * block_size - K
    if pad:
        x3 = torch.nn.functional.pad(x3, (0, 0, 0, pad))
    return x3.reshape(outer, nblk, block_size, inner)


def _mx_reference_3d(x3, f: ElementFormat, block_size, rounding, scaled):
    """(values [outer, K, inner], shared_exp [outer, nblk, inner] float) for float32 x3."""
    outer, K, inner = x3.shape
    xb = _blocks(x3, block_size)
    amax = torch.abs(xb).amax(dim=2, keepdim=True)  # NaN propagates, as torch.max does
    shared = torch.floor(torch.log2(amax + FP32_MIN_NORMAL * (amax == 0).to(amax.dtype))) - f.emax
    shared[shared > SCALE_EMAX] = float("nan")
    shared[shared < -SCALE_EMAX] = -SCALE_EMAX
    a = xb / 2**shared
    q = _quantize_elements_reference(a, f.mbits, f.ebits, f.max_norm, rounding)
    if not scaled:
        q = q * 2**shared
    q = q.reshape(outer, xb.shape[1] * block_size, inner)[:, :K]
    return q, shared.squeeze(2)


def quantize_reference(x: torch.Tensor, fmt: Union[str, ElementFormat], block_size: int = 32, axis: int = -1,
                       rounding: Union[str, Rounding] = "nearest") -> torch.Tensor:
    """MX quantize-dequantize with whole-tensor torch ops (the reading of microxcaling); any device."""
    f, r, ax = _check_args(x, fmt, block_size, axis, rounding)
    x3 = _as_3d(x.to(torch.float32), ax)
    q, _ = _mx_reference_3d(x3, f, block_size, r, scaled=False)
    return q.reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------
# backends


@functools.lru_cache(maxsize=None)
def _log2_thresholds(device: str) -> torch.Tensor:
    """int32 [256]: per biased fp32 exponent b, the smallest bit pattern in the binade
    [2**(b-127), 2**(b-126)) whose floor(torch.log2(.)) on ``device`` is already b-126
    (torch.log2 rounds values within ~44 ulp below a power of two up to it), or the
    first pattern of the next binade where none does. b = 0 covers the subnormals,
    of which only those that round up to -126 matter (results are clamped at -127).

    Lets the fused kernels replace floor(log2(v)) by the exponent field plus one
    comparison and stay bit-exact with the reference on the same device.
    """
    window = 512  # > 44 ulp: the widest round-up band (binade 2**127), with margin
    b = torch.arange(256, dtype=torch.int64)
    nxt = (b + 1) << 23  # bit pattern of 2**(b-126); 255 -> Inf/NaN binade, unused
    cand = nxt[:, None] - window + torch.arange(window, dtype=torch.int64)[None, :]
    vals = cand.to(torch.int32).view(torch.float32).to(device)
    fl = torch.floor(torch.log2(vals)).cpu()
    expected = (b - 126).to(torch.float32)[:, None]
    up = fl >= expected
    thr = nxt.clone()
    for i in range(255):
        hits = up[i].nonzero().flatten()
        if hits.numel():
            first = int(hits[0])
            if not bool(up[i, first:].all()) or first == 0:
                raise RuntimeError(f"torch.log2 on {device} is not monotonic near 2**{i - 126}; "
                                   "the fused MX kernels cannot reproduce it; use backend='torch'")
            thr[i] = cand[i, first]
    thr[255] = 0x7FFFFFFF
    # the scheme also needs floor(log2) == e at the bottom of each binade (exact powers of two)
    powers = (torch.arange(1, 255, dtype=torch.int64) << 23).to(torch.int32).view(torch.float32).to(device)
    if not torch.equal(torch.floor(torch.log2(powers)).cpu(), torch.arange(-126, 128, dtype=torch.float32)):
        raise RuntimeError(f"torch.log2 on {device} is not exact on powers of two; the fused MX kernels cannot "
                           "reproduce it; use backend='torch'")
    return thr.to(torch.int32).to(device)


def _cpp_reason(device: torch.device) -> Optional[str]:
    return backends.extension_reason(device, "mx_quantize")


def _triton_reason(device: torch.device) -> Optional[str]:
    reason = backends.triton_reason(device)
    if reason is None:
        try:
            from .._launch import mx  # noqa: F401  (the Triton kernel imports)
        except ImportError as exc:
            return f"the Triton kernel does not import: {exc}"
    return reason


backends.register("mx_quantize", "cpp", _cpp_reason)
backends.register("mx_quantize", "triton", _triton_reason)
backends.register("mx_quantize", "torch", lambda device: None, fallback=True)


def backend_status(device: Union[str, torch.device] = "cpu") -> dict:
    """{backend: None if usable on ``device`` else why not}."""
    return backends.status("mx_quantize", device)


def _resolve_backend(backend, device: torch.device) -> Backend:
    return backends.resolve("mx_quantize", backend, device)


def _mx_3d(x3: torch.Tensor, f: ElementFormat, block_size: int, rounding: Rounding, scaled: bool,
           backend: Backend) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values [outer, K, inner] float32, scale_e8m0 [outer, nblk, inner] uint8)."""
    if backend is Backend.TORCH:
        q, shared = _mx_reference_3d(x3, f, block_size, rounding, scaled)
        return q, scale_exp_to_e8m0(shared)
    thr = _log2_thresholds(str(x3.device))
    if backend is Backend.CPP:
        return torch.ops.ftattn.mx_quantize(x3, thr, f.ebits, f.mbits, f.emax, f.max_norm, block_size,
                                            ROUNDING_CODE[rounding], scaled)
    args = (thr, f.ebits, f.mbits, f.emax, f.max_norm, block_size, ROUNDING_CODE[rounding], scaled)
    if x3.device.type == "cuda":
        return torch.ops.ftattn.mx_quantize(x3, *args)
    from .._launch.mx import mx_quantize as triton_mx_quantize  # the Triton interpreter, on CPU tensors

    return triton_mx_quantize(x3, *args)


def quantize_with_scales(x: torch.Tensor, fmt: Union[str, ElementFormat], block_size: int = 32, axis: int = -1,
                         rounding: Union[str, Rounding] = "nearest",
                         backend: Union[str, Backend] = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(dequantized x in x's dtype, scale_e8m0 uint8 shaped like x with ``axis`` of length ceil(n / block_size))."""
    f, r, ax = _check_args(x, fmt, block_size, axis, rounding)
    be = _resolve_backend(backend, x.device)
    x3 = _as_3d(x.to(torch.float32), ax)
    q, scale = _mx_3d(x3, f, block_size, r, False, be)
    scale_shape = list(x.shape)
    scale_shape[ax] = scale.shape[1]
    return q.view(x.shape).to(x.dtype), scale.view(scale_shape)


def quantize(x: torch.Tensor, fmt: Union[str, ElementFormat], block_size: int = 32, axis: int = -1,
             rounding: Union[str, Rounding] = "nearest", backend: Union[str, Backend] = "auto") -> torch.Tensor:
    """MX quantize-dequantize (fake quantization) of ``x`` along ``axis``, bit-exact with microxcaling.

    x: floating tensor of any shape (computed in float32, returned in x.dtype);
    fmt: one of ``FORMATS`` (fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1,
    int8, int4, int2); block_size >= 1 values share one E8M0 scale;
    rounding: "nearest" (half away from zero), "even" or "floor".
    """
    return quantize_with_scales(x, fmt, block_size, axis, rounding, backend)[0]


# ---------------------------------------------------------------------------
# bfloat element-wise quantization (microxcaling's quantize_elemwise_op, bfloat=N)


def quantize_bfloat_reference(x: torch.Tensor, bfloat: int = 16, rounding: Union[str, Rounding] = "nearest"):
    """Round float32 ``x`` to bfloatN (8 exponent bits, N-9 mantissa bits) as microxcaling does:
    subnormals kept, overflow past the largest bfloatN to +-Inf; returned as float32."""
    r = get_rounding(rounding)
    if not isinstance(bfloat, int) or isinstance(bfloat, bool) or not (bfloat == 0 or 10 <= bfloat <= 32):
        raise ValueError(f"bfloat={bfloat!r} is not supported; use 0 (off) or 10..32 (16: bfloat16)")
    if bfloat in (0, 32):
        return x
    mbits = bfloat - 7
    max_norm = 2.0**127 * float(2 ** (mbits - 1) - 1) / 2 ** (mbits - 2)
    return _quantize_elements_reference(x, mbits, 8, max_norm, r, saturate=False)


def quantize_bfloat(x: torch.Tensor, bfloat: int = 16, rounding: Union[str, Rounding] = "nearest"):
    """bfloatN element-wise quantization (see quantize_bfloat_reference), bit-exact with it.

    For bfloat16 with "nearest"/"even" this is two integer passes on the bit
    pattern instead of the reference's ~15 float passes: rounding at bit 16 of
    the fp32 pattern is exactly the reference's mantissa rounding, subnormals
    and overflow to Inf included.
    """
    r = get_rounding(rounding)
    if bfloat != 16 or r is Rounding.FLOOR or x.dtype != torch.float32:
        return quantize_bfloat_reference(x, bfloat, r)
    if backends.extension_reason(x.device, "bfloat16_quantize") is None:
        return torch.ops.ftattn.bfloat16_quantize(x, ROUNDING_CODE[r]).view(x.shape)
    return _bfloat16_bits(x, r)


def _bfloat16_bits(x: torch.Tensor, r: Rounding) -> torch.Tensor:
    """quantize_bfloat for float32 x and bfloat=16 nearest/even, in torch integer ops (any device)."""
    bits = x.contiguous().view(torch.int32)
    mag = bits & 0x7FFFFFFF
    if r is Rounding.NEAREST:
        rounded = (mag + 0x8000) & ~0xFFFF  # half away from zero
    else:
        rounded = (mag + 0x7FFF + ((mag >> 16) & 1)) & ~0xFFFF  # half to even
    rounded = torch.where(mag >= 0x7F800000, mag, rounded.clamp(max=0x7F800000))  # NaN/Inf kept
    sign = torch.where(mag == 0, torch.zeros_like(bits), bits & ~0x7FFFFFFF)  # sign(-0.0) is 0
    return (rounded | sign).view(torch.float32)


# ---------------------------------------------------------------------------
# real storage


@dataclass
class MXTensor:
    """MX storage: element codes bit-packed into ``data_lp`` (uint8) plus one E8M0
    byte per block in ``scale_e8m0``; ``unpack`` gives the quantized values back.

    data_lp: [nbytes] uint8, blocks in order of x.movedim(axis, -1), each block
    padded to block_size codes; scale_e8m0: x.movedim(axis, -1).shape[:-1] + [nblk].
    """

    data_lp: torch.Tensor
    scale_e8m0: torch.Tensor
    fmt: str
    block_size: int
    axis: int
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.data_lp.device

    @property
    def nbytes(self) -> int:
        return self.data_lp.numel() + self.scale_e8m0.numel()

    @property
    def bits_per_value(self) -> float:
        n = 1
        for s in self.shape:
            n *= s
        return 8.0 * self.nbytes / max(n, 1)


def _encode(q: torch.Tensor, f: ElementFormat) -> torch.Tensor:
    """Scaled element values (exactly on the format's grid) -> codes (uint8, low ``bits`` bits)."""
    if f.is_int:
        k = torch.round(q * 2**f.int_scale_bits).to(torch.int16)
        neg_zero = (q == 0) & torch.signbit(q)
        k = torch.where(neg_zero, torch.full_like(k, -(2 ** (f.bits - 1))), k)
        return (k & (2**f.bits - 1)).to(torch.uint8)
    if f.storage.startswith("float8"):
        return q.to(getattr(torch, f.storage)).view(torch.uint8)
    # fp6 / fp4: the magnitude codes 0 .. 2**(bits-1)-1 are ordered by value
    table = decode_table(f).to(q.device)
    half = 2 ** (f.bits - 1)
    mags = table[:half].contiguous()
    code = torch.searchsorted(mags, q.abs().contiguous())
    return (code + torch.signbit(q).to(code.dtype) * half).to(torch.uint8)


def _bitpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[n] codes of ``bits`` bits (n * bits divisible by 8) -> little-endian packed bytes."""
    if bits == 8:
        return codes
    per = 8 // bits if 8 % bits == 0 else None
    if per is not None:  # 4 or 2 bits: `per` codes per byte
        c = codes.view(-1, per).to(torch.int32)
        shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
        return (c << shifts).sum(dim=1).to(torch.uint8)
    # 6 bits: 4 codes -> 3 bytes
    c = codes.view(-1, 4).to(torch.int32)
    word = c[:, 0] | (c[:, 1] << 6) | (c[:, 2] << 12) | (c[:, 3] << 18)
    return torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=1).to(torch.uint8).view(-1)


def _bitunpack(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return data[:n]
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=data.device, dtype=torch.int32) * bits
        c = (data.to(torch.int32)[:, None] >> shifts) & (2**bits - 1)
        return c.view(-1)[:n].to(torch.uint8)
    b = data.view(-1, 3).to(torch.int32)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    shifts = torch.arange(4, device=data.device, dtype=torch.int32) * 6
    return ((word[:, None] >> shifts) & 63).view(-1)[:n].to(torch.uint8)


def pack(x: torch.Tensor, fmt: Union[str, ElementFormat], block_size: int = 32, axis: int = -1,
         rounding: Union[str, Rounding] = "nearest", backend: Union[str, Backend] = "auto") -> MXTensor:
    """Quantize ``x`` to MX and keep the real storage: ``bits`` per element + 8 per block
    (MXFP4, block 32: 4.25 bits per value). ``unpack(pack(x, ...)) == quantize(x, ...)`` bit for bit."""
    f, r, ax = _check_args(x, fmt, block_size, axis, rounding)
    be = _resolve_backend(backend, x.device)
    xm = x.to(torch.float32).movedim(ax, -1)
    if be is Backend.CPP and (block_size * f.bits) % 8 == 0 and xm.numel() > 0:  # fused: quantize, encode and bit-pack per row
        codes, scale = torch.ops.ftattn.mx_pack(xm.contiguous().view(-1, xm.shape[-1]), _log2_thresholds("cpu"),
                                                f.ebits, f.mbits, f.emax, f.max_norm, block_size,
                                                ROUNDING_CODE[r], f.bits)
        return MXTensor(data_lp=codes, scale_e8m0=scale.view(xm.shape[:-1] + (scale.shape[-1],)), fmt=f.name,
                        block_size=block_size, axis=ax, shape=tuple(x.shape), dtype=x.dtype)
    # (the rows by count: view(-1, 0, 1) of an empty block axis is ambiguous, found by review)
    x3 = xm.contiguous().view(math.prod(xm.shape[:-1]), xm.shape[-1], 1)
    q, scale = _mx_3d(x3, f, block_size, r, True, be)  # q: elements divided by their block scale
    rows, K = x3.shape[0], x3.shape[1]
    nblk = scale.shape[1]
    qb = torch.nn.functional.pad(q.view(rows, K), (0, nblk * block_size - K)).view(rows, nblk, block_size)
    qb = torch.where(scale.view(rows, nblk, 1) == E8M0_NAN, torch.zeros_like(qb), qb)  # NaN blocks: codes 0
    codes = _encode(qb.reshape(-1), f)
    per_byte_group = 8 // math.gcd(f.bits, 8)  # codes filling a whole number of bytes
    extra = (-codes.numel()) % per_byte_group
    if extra:
        codes = torch.cat([codes, codes.new_zeros(extra)])
    return MXTensor(
        data_lp=_bitpack(codes, f.bits),
        scale_e8m0=scale.view(xm.shape[:-1] + (nblk,)),
        fmt=f.name,
        block_size=block_size,
        axis=ax,
        shape=tuple(x.shape),
        dtype=x.dtype,
    )


def unpack(t: MXTensor) -> torch.Tensor:
    """MXTensor -> the quantized values (x's shape and dtype)."""
    if not isinstance(t, MXTensor):
        raise TypeError(f"unpack expects an MXTensor from ftattn.mx.pack, got {type(t).__name__}")
    f = get_format(t.fmt)
    moved = list(t.shape)
    K = moved.pop(t.axis)
    moved.append(K)
    rows = 1
    for s in moved[:-1]:
        rows *= s
    nblk = t.scale_e8m0.shape[-1]
    out = decode_blocks(t.data_lp, t.scale_e8m0.reshape(rows, nblk), decode_table(f).to(t.data_lp.device), f.bits,
                        t.block_size)
    return out[:, :K].reshape(moved).movedim(-1, t.axis).to(t.dtype)


def decode_blocks(data_lp: torch.Tensor, scale_e8m0: torch.Tensor, table: torch.Tensor, bits: int,
                  block_size: int) -> torch.Tensor:
    """Packed codes -> float32 [rows, nblk * block_size]: each code's value (``table``, float32
    [2**bits]) times its block's 2**shared_exp; scale_e8m0 [rows, nblk]; NaN scale -> NaN block."""
    rows, nblk = scale_e8m0.shape
    codes = _bitunpack(data_lp.reshape(-1), bits, rows * nblk * block_size).to(torch.int64)
    values = table[codes].view(rows, nblk, block_size)
    out = values * 2 ** e8m0_to_scale_exp(scale_e8m0.unsqueeze(-1))  # NaN scale -> NaN block, as the quantizer
    return out.view(rows, nblk * block_size)


# ---------------------------------------------------------------------------
# op registration: fake (meta) kernel; the Triton kernel as the CUDA implementation


def _register() -> None:
    if _cpp_reason(torch.device("cpu")) is not None:  # the schema lives in the C++ extension
        return

    @torch.library.register_fake("ftattn::mx_quantize")
    def _mx_quantize_fake(x, log2_thresholds, ebits, mbits, emax, max_norm, block_size, rounding, scaled):
        outer, K, inner = x.shape
        nblk = -(-K // block_size)
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((outer, nblk, inner),
                                                                                        dtype=torch.uint8)

    @torch.library.register_fake("ftattn::bfloat16_quantize")
    def _bfloat16_quantize_fake(x, rounding):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    try:
        from .._launch.mx import mx_quantize as triton_mx_quantize
    except ImportError:
        return

    @torch.library.impl("ftattn::mx_quantize", "CUDA")
    def _mx_quantize_cuda(x, log2_thresholds, ebits, mbits, emax, max_norm, block_size, rounding, scaled):
        return triton_mx_quantize(x, log2_thresholds, ebits, mbits, emax, max_norm, block_size, rounding, scaled)


_register()
