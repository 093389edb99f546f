"""The launcher of the Triton MX quantizer (ftattn.kernels.mx): the Triton
implementation of ``ftattn::mx_quantize``, on CUDA tensors, or CPU tensors under the
Triton interpreter."""
from __future__ import annotations

import torch
import triton

from ..kernels.mx import _mx_linear_packed_kernel, _mx_quantize_kernel

__all__ = ["mx_quantize", "mx_linear"]


def mx_quantize(x3: torch.Tensor, log2_thresholds: torch.Tensor, ebits: int, mbits: int, emax: int,
                max_norm: float, block_size: int, rounding: int, scaled: bool):
    """x3 [outer, K, inner] float32 -> (values [outer, K, inner] float32,
    scale_e8m0 [outer, ceil(K / block_size), inner] uint8); blocks along K.
    Same contract as the C++ op ``ftattn::mx_quantize``."""
    if x3.dim() != 3 or x3.dtype != torch.float32:
        raise ValueError(f"mx_quantize: x must be a 3-D float32 tensor, got {tuple(x3.shape)} {x3.dtype}")
    if not 1 <= block_size <= 4096:
        raise ValueError(f"mx_quantize (Triton): block_size={block_size} must be in [1, 4096]")
    outer, K, inner = x3.shape
    nblk = -(-K // block_size)
    x2 = x3.transpose(1, 2).reshape(outer * inner, K).contiguous()  # blocked axis last
    out = torch.empty_like(x2)
    scale = torch.empty((outer * inner, nblk), dtype=torch.uint8, device=x3.device)
    if x2.numel():
        bs_p2 = triton.next_power_of_2(block_size)
        # 1-4 K values per program: enough loads in flight to hide latency, few registers.
        blocks = max(1, min(triton.next_power_of_2(nblk), 2048 // bs_p2))
        grid = (outer * inner, triton.cdiv(nblk, blocks))
        min_exp = 2 - 2 ** (ebits - 1) if ebits else 0
        _mx_quantize_kernel[grid](
            x2, out, scale, log2_thresholds,
            K, nblk,
            x2.stride(0), out.stride(0), scale.stride(0),
            emax, float(max_norm),
            EBITS=ebits, MBITS=mbits, MIN_EXP=min_exp,
            ROUNDING=rounding, SCALED=bool(scaled),
            BLOCK_SIZE=block_size, BLOCK_SIZE_P2=bs_p2, BLOCKS=blocks,
        )
    out = out.view(outer, inner, K).transpose(1, 2).contiguous()
    scale = scale.view(outer, inner, nblk).transpose(1, 2).contiguous()
    return out, scale


def mx_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int,
              block_size: int, bias=None) -> torch.Tensor:
    """The Triton ``ftattn::mx_linear``: x [..., K] float32 / bfloat16 / float16, codes uint8
    [O, row_bytes], scales uint8 [O, nblk], table float32 [2^bits] -> [..., O] in x's dtype."""
    K = x.shape[-1]
    O, nblk = scales.shape
    x2 = x.reshape(-1, K)
    half = x.dtype == torch.bfloat16 and x.device.type == "cuda"  # CPU tensors: the interpreter
    if not half:
        x2 = x2.to(torch.float32)
    x2 = x2.contiguous()
    T = x2.shape[0]
    y = torch.empty((T, O), dtype=torch.float32, device=x.device)
    if T and O:
        block_k = max(32, min(128, triton.next_power_of_2(block_size)))
        block_t = 16 if T <= 16 else 64
        grid = (triton.cdiv(T, block_t), triton.cdiv(O, 64))
        b = bias.contiguous() if bias is not None else y
        _mx_linear_packed_kernel[grid](
            x2, codes, scales, table.to(x.device), b, y,
            T, O, K, nblk * block_size, codes.shape[1], nblk,
            x2.stride(0), y.stride(0),
            BITS=bits, BLOCK_SIZE=block_size, HAS_BIAS=bias is not None, HALF=half,
            BLOCK_T=block_t, BLOCK_O=64, BLOCK_K=block_k,
        )
    return y.to(x.dtype).view(tuple(x.shape[:-1]) + (O,))
