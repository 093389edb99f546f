// MX (microscaling) quantization, fused single-pass CPU kernel.
//
// Reproduces Microsoft microxcaling's _quantize_mx (shared_exp_method "max",
// scale_bits 8) bit for bit, in one pass over memory: per block of block_size
// elements along the blocked axis, amax -> shared exponent -> scaled element
// rounding -> dequantization, all in registers. The reference in
// ftattn/mx/quantize.py runs the same arithmetic as ~20 whole-tensor torch ops.
//
// Exactness: every multiplication below is by a power of two and exact, except
// the last one (element * 2^shared_exp), which rounds into the fp32 subnormals
// exactly as torch's does; the additions (+0.5, -0.5) are the reference's own
// float32 additions, quirks included (0.49999997 + 0.5 rounds to 1.0). The one
// transcendental of the reference, floor(torch.log2(v)), is replaced by the
// exponent field plus a per-binade threshold table computed from torch.log2
// itself (ftattn/mx/quantize.py, _log2_thresholds): torch.log2 rounds values 1-2
// ulp below a power of two up to that power, and the table reproduces it. The
// vectorised element loop uses the exponent field alone and redoes, with the
// table, the few elements in the top 512 ulp of their binade (GCC will not emit
// gathers for the lookup; without this the loop ran scalar, 2.5x slower).
//
// Layout: x is viewed as [outer, K, inner] (contiguous), blocks run along K.
// inner == 1 (the blocked axis is the last one) is the fast path; inner > 1 (any
// other axis) keeps a per-column running max so no transpose copy is needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define FTATTN_MX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FTATTN_MX_CLONES
#endif

namespace ftattn {
namespace {

constexpr int kScaleEmax = 127;     // scale_bits = 8: shared exponent in [-127, 127]
constexpr uint8_t kE8M0Nan = 0xFF;  // E8M0 NaN
constexpr uint32_t kExpMask = 0x7F800000u;

enum Rounding : int64_t { kNearest = 0, kFloor = 1, kEven = 2 };

struct Params {
  int ebits;       // 0: integer element
  int mbits;       // sign + implicit + mantissa bits (microxcaling)
  int emax;        // largest element exponent
  int min_exp;     // smallest normal element exponent
  float max_norm;  // saturation bound
  int64_t rounding;
  const uint32_t* thr;  // [256] log2 round-up thresholds per biased exponent
};

inline uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

inline float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

// 2^k as an exact float for k in [-149, 127].
inline float exp2i(int k) {
  return k >= -126 ? float_of(static_cast<uint32_t>(k + 127) << 23) : float_of(1u << (k + 149));
}

// floor(torch.log2(v)) for finite v > 0 given its bits, clamped below at -127
// (callers clamp to >= -127 anyway: subnormals only matter when they round up).
inline int floor_log2(uint32_t abits, const uint32_t* thr) {
  const int b = static_cast<int>(abits >> 23);
  // b == 0 (subnormals): -127, the clamp every caller applies anyway
  return b - 127 + static_cast<int>(abits >= thr[b]);
}

// floor() of v in [0, 2^31): truncation (SSE2 cvttps2dq, no libm call).
inline float floor_pos(float v) { return static_cast<float>(static_cast<int32_t>(v)); }

// 2^k for k in the normal range [-126, 127] (integer ops only: vectorises).
inline float exp2n(int k) { return float_of(static_cast<uint32_t>(k + 127) << 23); }

// One element in the scaled domain -> its quantized value (still scaled),
// microxcaling's _quantize_elemwise_core with saturate_normals=True. Branch-free
// so the loops below vectorise (the threshold lookup becomes a gather).
// Values whose floor(torch.log2) may round up to the next power of two: the top 512
// ulp of a binade (the window _log2_thresholds checks; the widest band is ~44 ulp).
constexpr uint32_t kNearTop = 0x800000u - 512u;
inline uint32_t near_top(float a) { return static_cast<uint32_t>((bits_of(a) & 0x7FFFFFu) >= kNearTop); }

// EXACT = false skips the threshold table (exponent field only): GCC does not
// vectorise table lookups into gathers (slow since the GDS microcode fix), so the
// vector loop runs without it and the rare near-top elements are redone with it.
template <int ROUND, bool INT, bool EXACT = true>
inline __attribute__((always_inline)) float quantize_element(float a, const Params P) {
  const float absa = std::fabs(a);
  float up, unit;
  if (INT) {
    up = absa * exp2n(P.mbits - 2);
    unit = exp2n(-(P.mbits - 2));
  } else {
    const uint32_t ab = bits_of(absa);
    const int e = EXACT ? floor_log2(ab, P.thr) : static_cast<int>(ab >> 23) - 127;
    int p = ab == 0 ? 0 : e;              // a == 0: log2(0 + 1) = 0
    p = std::max(p, P.min_exp);
    up = absa * exp2n(P.mbits - 2 - p);
    unit = exp2n(p - (P.mbits - 2));
  }
  float r;
  if (ROUND == kFloor) {
    r = floor_pos(up);
  } else {
    r = floor_pos(up + 0.5f);
    if (ROUND == kEven) {
      const float t = up - 0.5f;  // (|A| - 0.5) % 2 == 0 finds 0.5, 2.5, 4.5, ...
      r -= static_cast<float>(static_cast<int>(t >= 0.0f) & static_cast<int>(floor_pos(t * 0.5f) * 2.0f == t));
    }
  }
  const float q = std::min(r * unit, P.max_norm);
  // sign(a) * q: sign(+-0) is 0 (q is +0 then), a tiny negative value rounding to 0 gives -0.
  return a < 0.0f ? -q : q;
}

// Shared exponent of a block from its amax (finite, >= 0).
inline __attribute__((always_inline)) int shared_exponent(float amax, const Params P) {
  const int e = amax == 0.0f ? -126 : floor_log2(bits_of(amax), P.thr);  // log2(amax + 2^-126 [amax == 0])
  return std::max(e - P.emax, -kScaleEmax);  // > 127 only for amax rounding up to 2^128
}

// Quantizes n contiguous values sharing one scale; returns the E8M0 byte.
template <int ROUND, bool INT>
inline __attribute__((always_inline)) uint8_t block_contig(const float* x, float* out, int64_t n,
                                                           const Params P, bool scaled) {
  float amax = 0.0f;
  uint32_t nonfinite = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t b = bits_of(x[j]) & 0x7FFFFFFFu;
    nonfinite |= static_cast<uint32_t>((b & kExpMask) == kExpMask);
    amax = std::max(amax, float_of(b));
  }
  const int s = nonfinite ? kScaleEmax + 1 : shared_exponent(amax, P);
  if (s > kScaleEmax) {  // NaN/Inf in the block (or amax rounds to 2^128): the whole block is NaN
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t j = 0; j < n; ++j) out[j] = nan;
    return kE8M0Nan;
  }
  const float down = exp2i(-s);  // x / 2^s, exact
  const float back = scaled ? 1.0f : exp2i(s);  // rounds into the subnormals like the reference's A * 2**shared_exp
  uint32_t top = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float a = x[j] * down;
    top |= near_top(a);
    out[j] = quantize_element<ROUND, INT, INT>(a, P) * back;
  }
  if (!INT && top) {
    for (int64_t j = 0; j < n; ++j) {
      const float a = x[j] * down;
      if (near_top(a)) out[j] = quantize_element<ROUND, INT, true>(a, P) * back;
    }
  }
  return static_cast<uint8_t>(s + kScaleEmax);
}

template <int ROUND, bool INT>
inline __attribute__((always_inline)) void rows_contig(const float* x, float* out, uint8_t* scale, int64_t begin,
                                                       int64_t end, int64_t nblk, int64_t K, int64_t block_size,
                                                       const Params& P, bool scaled) {
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t o = blk / nblk, b = blk % nblk;
    const int64_t k0 = b * block_size, n = std::min(block_size, K - k0);
    const int64_t off = o * K + k0;
    scale[blk] = block_contig<ROUND, INT>(x + off, out + off, n, P, scaled);
  }
}

// Blocks [begin, end) of the contiguous layout; one clone per ISA.
FTATTN_MX_CLONES
void run_contig(const float* x, float* out, uint8_t* scale, int64_t begin, int64_t end, int64_t nblk, int64_t K,
                int64_t block_size, const Params& P, bool scaled) {
  const bool is_int = P.ebits == 0;
  switch (P.rounding) {
    case kNearest:
      return is_int ? rows_contig<kNearest, true>(x, out, scale, begin, end, nblk, K, block_size, P, scaled)
                    : rows_contig<kNearest, false>(x, out, scale, begin, end, nblk, K, block_size, P, scaled);
    case kFloor:
      return is_int ? rows_contig<kFloor, true>(x, out, scale, begin, end, nblk, K, block_size, P, scaled)
                    : rows_contig<kFloor, false>(x, out, scale, begin, end, nblk, K, block_size, P, scaled);
    default:
      return is_int ? rows_contig<kEven, true>(x, out, scale, begin, end, nblk, K, block_size, P, scaled)
                    : rows_contig<kEven, false>(x, out, scale, begin, end, nblk, K, block_size, P, scaled);
  }
}

// Block of n rows x inner columns (row stride `inner`), one scale per column.
template <int ROUND, bool INT>
inline __attribute__((always_inline)) void block_strided(const float* x, float* out, uint8_t* scale, int64_t n,
                                                         int64_t inner, const Params P, bool scaled, float* amax,
                                                         uint32_t* nonfinite, float* down, float* back) {
  std::fill(amax, amax + inner, 0.0f);
  std::fill(nonfinite, nonfinite + inner, 0u);
  for (int64_t j = 0; j < n; ++j) {
    const float* row = x + j * inner;
    for (int64_t i = 0; i < inner; ++i) {
      const uint32_t b = bits_of(row[i]) & 0x7FFFFFFFu;
      nonfinite[i] |= static_cast<uint32_t>((b & kExpMask) == kExpMask);
      amax[i] = std::max(amax[i], float_of(b));
    }
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < inner; ++i) {
    const int s = nonfinite[i] ? kScaleEmax + 1 : shared_exponent(amax[i], P);
    if (s > kScaleEmax) {
      scale[i] = kE8M0Nan;
      down[i] = nan;
      back[i] = nan;
    } else {
      scale[i] = static_cast<uint8_t>(s + kScaleEmax);
      down[i] = exp2i(-s);
      back[i] = scaled ? 1.0f : exp2i(s);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* row = x + j * inner;
    float* orow = out + j * inner;
    uint32_t top = 0;
    for (int64_t i = 0; i < inner; ++i) {
      const float a = row[i] * down[i];
      top |= near_top(a);
      orow[i] = quantize_element<ROUND, INT, INT>(a, P) * back[i];
    }
    if (!INT && top) {
      for (int64_t i = 0; i < inner; ++i) {
        const float a = row[i] * down[i];
        if (near_top(a)) orow[i] = quantize_element<ROUND, INT, true>(a, P) * back[i];
      }
    }
  }
}

FTATTN_MX_CLONES
void run_strided(const float* x, float* out, uint8_t* scale, int64_t n, int64_t inner, const Params& P, bool scaled,
                 float* amax, uint32_t* nonfinite, float* down, float* back) {
  const bool is_int = P.ebits == 0;
#define FTATTN_MX_STRIDED(R, I) block_strided<R, I>(x, out, scale, n, inner, P, scaled, amax, nonfinite, down, back)
  switch (P.rounding) {
    case kNearest:
      return is_int ? FTATTN_MX_STRIDED(kNearest, true) : FTATTN_MX_STRIDED(kNearest, false);
    case kFloor:
      return is_int ? FTATTN_MX_STRIDED(kFloor, true) : FTATTN_MX_STRIDED(kFloor, false);
    default:
      return is_int ? FTATTN_MX_STRIDED(kEven, true) : FTATTN_MX_STRIDED(kEven, false);
  }
#undef FTATTN_MX_STRIDED
}

// The element format of an op's arguments (thr: the log2 threshold table, kept alive by the caller).
Params make_params(int64_t ebits, int64_t mbits, int64_t emax, double max_norm, int64_t rounding,
                   const at::Tensor& thr) {
  Params P;
  P.ebits = static_cast<int>(ebits);
  P.mbits = static_cast<int>(mbits);
  P.emax = static_cast<int>(emax);
  P.min_exp = ebits ? 2 - (1 << (ebits - 1)) : 0;
  P.max_norm = static_cast<float>(max_norm);
  P.rounding = rounding;
  P.thr = reinterpret_cast<const uint32_t*>(thr.data_ptr<int32_t>());
  return P;
}

// x [outer, K, inner] float32 -> (values [outer, K, inner] float32, scale_e8m0 [outer, nblk, inner] uint8).
// scaled: return the elements before the multiplication by 2^shared_exp (what pack() encodes).
std::tuple<at::Tensor, at::Tensor> mx_quantize_cpu(const at::Tensor& x, const at::Tensor& log2_thresholds,
                                                   int64_t ebits, int64_t mbits, int64_t emax, double max_norm,
                                                   int64_t block_size, int64_t rounding, bool scaled) {
  // (the kernel's own ATen calls, views included, skip autograd and view tracking: ~1 us a call)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x.dim() == 3, "ftattn::mx_quantize: x must be 3-D [outer, K, inner], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "ftattn::mx_quantize: x must be float32, got ", x.scalar_type(),
              "; cast with x.float()");
  TORCH_CHECK(block_size >= 1, "ftattn::mx_quantize: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(rounding >= 0 && rounding <= 2, "ftattn::mx_quantize: rounding code must be 0, 1 or 2, got ",
              rounding);
  TORCH_CHECK(ebits >= 0 && ebits <= 5 && mbits >= 2 && mbits <= 9,
              "ftattn::mx_quantize: element format out of range (ebits ", ebits, ", mbits ", mbits, ")");
  TORCH_CHECK(log2_thresholds.scalar_type() == at::kInt && log2_thresholds.numel() == 256 &&
                  log2_thresholds.device().is_cpu(),
              "ftattn::mx_quantize: log2_thresholds must be a CPU int32 tensor of 256 entries");
  const at::Tensor xc = x.contiguous();
  const at::Tensor thr = log2_thresholds.contiguous();
  const int64_t outer = xc.size(0), K = xc.size(1), inner = xc.size(2);
  const int64_t nblk = (K + block_size - 1) / block_size;
  at::Tensor out = at::empty_like(xc);
  at::Tensor scale = at::empty({outer, nblk, inner}, xc.options().dtype(at::kByte));
  if (xc.numel() == 0) return {out, scale};

  const Params P = make_params(ebits, mbits, emax, max_norm, rounding, thr);

  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  uint8_t* sp = scale.data_ptr<uint8_t>();
  const int64_t nblocks = outer * nblk;
  if (inner == 1) {
    // ~16 KiB of input per task keeps the parallel overhead under 1 %.
    const int64_t grain = std::max<int64_t>(1, 4096 / block_size);
    at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
      run_contig(xp, op, sp, begin, end, nblk, K, block_size, P, scaled);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 4096 / (block_size * inner));
    at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> amax(inner), down(inner), back(inner);
      std::vector<uint32_t> nonfinite(inner);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t o = blk / nblk, b = blk % nblk;
        const int64_t k0 = b * block_size, n = std::min(block_size, K - k0);
        const int64_t off = (o * K + k0) * inner;
        run_strided(xp + off, op + off, sp + blk * inner, n, inner, P, scaled, amax.data(), nonfinite.data(),
                    down.data(), back.data());
      }
    });
  }
  return {out, scale};
}

// bfloat16 element-wise rounding of microxcaling's quantize_elemwise_op (bfloat=16),
// on the bit pattern: its mantissa rounding at 7 explicit bits is rounding at bit
// 16 of the fp32 pattern, subnormals included (the element exponent is clipped at
// -126, the fp32 subnormal grid); overflow gives Inf; sign(+-0) is 0, so -0 -> +0.
FTATTN_MX_CLONES
void bfloat16_round(const uint32_t* x, uint32_t* out, int64_t n, bool even) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = x[i];
    const uint32_t mag = b & 0x7FFFFFFFu;
    uint32_t r = even ? mag + 0x7FFFu + ((mag >> 16) & 1u) : mag + 0x8000u;
    r = std::min(r & 0xFFFF0000u, 0x7F800000u);
    const uint32_t sign = mag == 0 ? 0u : (b & 0x80000000u);
    out[i] = mag >= 0x7F800000u ? b : (r | sign);
  }
}

at::Tensor bfloat16_quantize_cpu(const at::Tensor& x, int64_t rounding) {
  // (the kernel's own ATen calls, views included, skip autograd and view tracking: ~1 us a call)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x.scalar_type() == at::kFloat, "ftattn::bfloat16_quantize: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(rounding == kNearest || rounding == kEven,
              "ftattn::bfloat16_quantize: rounding must be 0 (nearest) or 2 (even), got ", rounding);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const auto* xp = reinterpret_cast<const uint32_t*>(xc.data_ptr<float>());
  auto* op = reinterpret_cast<uint32_t*>(out.data_ptr<float>());
  at::parallel_for(0, xc.numel(), 32768, [&](int64_t begin, int64_t end) {
    bfloat16_round(xp + begin, op + begin, end - begin, rounding == kEven);
  });
  return out;
}

// Elements already on the format's grid (the quantizer's scaled output) -> storage codes
// (ftattn/mx/formats.py: OCP layouts; integers two's complement, -0.0 the spare most negative
// code). Branch-free so that the loop vectorises.
template <bool INT>
inline __attribute__((always_inline)) void encode_elements(const float* q, int64_t n, const Params& P, int bits,
                                                           uint8_t* out) {
  const int M = P.mbits - 2;
  const uint32_t mmask = (1u << M) - 1u, cmask = (1u << bits) - 1u;
  const float up = exp2n(INT ? M : M - P.min_exp);  // ints: the integer; floats: subnormal counts
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t b = bits_of(q[j]), sign = b >> 31, a = b & 0x7FFFFFFFu;
    uint32_t code;
    if (INT) {
      const uint32_t k = static_cast<uint32_t>(static_cast<int32_t>(q[j] * up));  // an exact integer
      code = a == 0 ? sign << (bits - 1) : (k & cmask);
    } else {
      const int e = static_cast<int>(a >> 23) - 127;
      const uint32_t norm = (static_cast<uint32_t>(e - P.min_exp + 1) << M) | ((a >> (23 - M)) & mmask);
      const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(float_of(a) * up));  // 0 for a == 0
      code = (sign << (bits - 1)) | (e >= P.min_exp ? norm : sub);
    }
    out[j] = static_cast<uint8_t>(code);
  }
}

// n codes (one per byte, n * bits a multiple of 8) -> little endian bits: code j at bit j * bits.
inline __attribute__((always_inline)) void bitpack(const uint8_t* c, int64_t n, int bits, uint8_t* out) {
  if (bits == 4) {
    for (int64_t i = 0; i < n / 2; ++i) out[i] = static_cast<uint8_t>(c[2 * i] | (c[2 * i + 1] << 4));
  } else if (bits == 2) {
    for (int64_t i = 0; i < n / 4; ++i)
      out[i] = static_cast<uint8_t>(c[4 * i] | (c[4 * i + 1] << 2) | (c[4 * i + 2] << 4) | (c[4 * i + 3] << 6));
  } else if (bits == 6) {
    for (int64_t i = 0; i < n / 4; ++i) {
      const uint32_t w = c[4 * i] | (c[4 * i + 1] << 6) | (c[4 * i + 2] << 12) | (static_cast<uint32_t>(c[4 * i + 3]) << 18);
      out[3 * i] = static_cast<uint8_t>(w);
      out[3 * i + 1] = static_cast<uint8_t>(w >> 8);
      out[3 * i + 2] = static_cast<uint8_t>(w >> 16);
    }
  } else {  // other widths (not produced by the formats today): a bit accumulator
    uint64_t acc = 0;
    int nacc = 0;
    for (int64_t j = 0; j < n; ++j) {
      acc |= static_cast<uint64_t>(c[j]) << nacc;
      nacc += bits;
      while (nacc >= 8) {
        *out++ = static_cast<uint8_t>(acc);
        acc >>= 8;
        nacc -= 8;
      }
    }
  }
}

// One row of pack: quantize (scaled) into q, encode into c (row_codes bytes, or straight into out
// for 8-bit codes), zero the padding and the NaN blocks, bit-pack into out.
FTATTN_MX_CLONES
void pack_row(const float* x, int64_t K, int64_t nblk, int64_t block_size, const Params& P, int bits, float* q,
              uint8_t* c, uint8_t* scale, uint8_t* out) {
  run_contig(x, q, scale, 0, nblk, nblk, K, block_size, P, /*scaled=*/true);
  uint8_t* codes = bits == 8 ? out : c;
  if (P.ebits == 0) encode_elements<true>(q, K, P, bits, codes);
  else encode_elements<false>(q, K, P, bits, codes);
  std::fill(codes + K, codes + nblk * block_size, uint8_t{0});
  for (int64_t blk = 0; blk < nblk; ++blk)
    if (scale[blk] == kE8M0Nan) std::fill(codes + blk * block_size, codes + (blk + 1) * block_size, uint8_t{0});
  if (bits != 8) bitpack(c, nblk * block_size, bits, out);
}

// pack: x [rows, K] float32 -> (codes uint8 [rows * nblk * block_size * bits / 8], scale_e8m0 uint8
// [rows, nblk]) in ftattn.mx.pack's layout (each block padded to block_size codes, code 0 for the
// padding and for NaN blocks). Fused: each row is quantized into a buffer, encoded and bit-packed
// while it is in cache. block_size * bits must be a multiple of 8 (every row starts on a byte).
std::tuple<at::Tensor, at::Tensor> mx_pack_cpu(const at::Tensor& x, const at::Tensor& log2_thresholds, int64_t ebits,
                                               int64_t mbits, int64_t emax, double max_norm, int64_t block_size,
                                               int64_t rounding, int64_t bits) {
  // (the kernel's own ATen calls, views included, skip autograd and view tracking: ~1 us a call)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "ftattn::mx_pack: x must be float32 [rows, K], got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(bits >= 2 && bits <= 8 && block_size >= 1 && (block_size * bits) % 8 == 0,
              "ftattn::mx_pack: block_size * bits must be a multiple of 8 (block_size ", block_size, ", bits ", bits,
              ")");
  TORCH_CHECK(rounding >= 0 && rounding <= 2, "ftattn::mx_pack: rounding code must be 0, 1 or 2, got ", rounding);
  TORCH_CHECK(ebits >= 0 && ebits <= 5 && mbits >= 2 && mbits <= 9,
              "ftattn::mx_pack: element format out of range (ebits ", ebits, ", mbits ", mbits, ")");
  TORCH_CHECK(log2_thresholds.scalar_type() == at::kInt && log2_thresholds.numel() == 256 &&
                  log2_thresholds.device().is_cpu(),
              "ftattn::mx_pack: log2_thresholds must be a CPU int32 tensor of 256 entries");
  const at::Tensor xc = x.contiguous();
  const at::Tensor thr = log2_thresholds.contiguous();
  const int64_t rows = xc.size(0), K = xc.size(1);
  const int64_t nblk = (K + block_size - 1) / block_size, row_codes = nblk * block_size;
  const int64_t row_bytes = row_codes * bits / 8;
  at::Tensor codes = at::empty({rows * row_bytes}, xc.options().dtype(at::kByte));
  at::Tensor scale = at::empty({rows, nblk}, xc.options().dtype(at::kByte));
  if (rows == 0 || K == 0) return {codes, scale};
  const Params P = make_params(ebits, mbits, emax, max_norm, rounding, thr);
  const float* xp = xc.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  uint8_t* sp = scale.data_ptr<uint8_t>();
  const int b = static_cast<int>(bits);
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / K), [&](int64_t r0, int64_t r1) {
    std::vector<float> q(K);
    std::vector<uint8_t> c(row_codes);
    for (int64_t r = r0; r < r1; ++r)
      pack_row(xp + r * K, K, nblk, block_size, P, b, q.data(), c.data(), sp + r * nblk, cp + r * row_bytes);
  });
  return {codes, scale};
}

}  // namespace
}  // namespace ftattn

TORCH_LIBRARY_IMPL(ftattn, CPU, m) {
  m.impl("mx_quantize", &ftattn::mx_quantize_cpu);
  m.impl("bfloat16_quantize", &ftattn::bfloat16_quantize_cpu);
  m.impl("mx_pack", &ftattn::mx_pack_cpu);
}
