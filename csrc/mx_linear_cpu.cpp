// Packed MX linear layer, CPU: y = x dequant(W)^T for W stored as MX codes + E8M0 scales
// (ftattn.mx.pack, blocks along in_features), never materialising the fp32 weight.
//
// Layout (ftattn/mx/quantize.py, pack): output feature o owns nblk blocks of block_size codes,
// each block padded to block_size codes (code 0 is +0 in every format) and bit-packed little
// endian: code j of the row at bit j * bits of the row's bytes. block_size * bits is a
// multiple of 8 here (ftattn/mx/packed.py checks), so every block starts on a byte and each
// run of 16 codes is 2 * bits bytes.
//
// Two paths:
// * decode (rows of x <= kGemvRows, e.g. token-by-token generation): memory bound on the
//   codes. Parallel over output features; per block the codes are decoded into registers
//   (AVX-512: a table permute for 2/4/6-bit codes, fp8_e4m3 in blocks of 32 as fp32 bit
//   patterns made by a shift and an AND (gemv_e4m3_pairs), other fp8 through the fp16
//   converter, an integer convert for int8), multiplied with up to 4 rows of x, and the block's sum is scaled once
//   by its 2^shared_exp. AVX2 processors (and block sizes the AVX-512 decoders do not take) the
//   same on 8 lanes for fp4 / fp8 / int8 (Dec8). Others (and fp6 / fp2 there) decode a row into
//   a small buffer through the format's value table and run a vectorised dot product.
// * GEMM (more rows): panels of output features are dequantized (bit for bit the values of
//   ftattn.mx.unpack: code value * 2^shared_exp, one rounding) into a cache-sized buffer, in
//   x's dtype for bfloat16 (exact: every MX value has <= 8 significant bits), and multiplied
//   by the library GEMM (MKL / oneDNN through at::mm).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define FTATTN_MX_AVX512 1
#define FTATTN_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define FTATTN_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#else
#define FTATTN_MX_AVX512 0
#endif

namespace ftattn {
namespace {

// how the codes decode (ftattn/mx/packed.py, _KIND): through the value table, or by arithmetic
enum Kind : int64_t { kTable = 0, kE4M3 = 1, kE5M2 = 2, kInt8 = 3 };
constexpr int64_t kGemvRows = 16;  // up to this many rows of x: the decode path (measured crossover 16-32)

struct Packed {
  const uint8_t* codes;    // [O, row_bytes]
  const uint8_t* scales;   // [O, nblk] E8M0
  const float* table;      // [2^bits] value of each code
  const float* scale_tab;  // [256] 2^(e - 127), NaN for 0xFF
  const float* scale_gemv; // the decode path's: scale_tab times the factor its decoder leaves out
  bool raw;                // decode path, fp8_e4m3: x carries the decoder's 2^8
  bool e4m3_pairs;         // decode path, fp8_e4m3 in blocks of 32: gemv_e4m3_pairs (x permuted and scaled)
  int64_t row_bytes, nblk, bs, bits, kind;
};

inline float pow2_e8m0(int e) {  // exact 2^(e - 127) for e in [0, 254]
  const int k = e - 127;
  uint32_t b = k >= -126 ? static_cast<uint32_t>(k + 127) << 23 : (1u << (k + 149));
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

inline uint32_t code_at(const uint8_t* block, int64_t j, int64_t bits) {
  const int64_t pos = j * bits, byte = pos >> 3, sh = pos & 7;
  uint32_t w = block[byte];
  if (sh + bits > 8) w |= static_cast<uint32_t>(block[byte + 1]) << 8;
  return (w >> sh) & ((1u << bits) - 1u);
}

typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
using vec::f8;

// max |x_i| over n floats, NaNs skipped; 16 running maxima so that it vectorises.
FTATTN_CLONES
float abs_max(const float* x, int64_t n) {
  float m[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) m[l] = std::fabs(x[i + l]) > m[l] ? std::fabs(x[i + l]) : m[l];
  for (; i < n; ++i) m[0] = std::fabs(x[i]) > m[0] ? std::fabs(x[i]) : m[0];
  float r = 0.0f;
  for (int l = 0; l < 16; ++l) r = m[l] > r ? m[l] : r;
  return r;
}

// One output feature's values (code value * 2^shared_exp, as unpack), K_pad = nblk * bs of them.
// 4-bit codes, blocks of a multiple of 8: 8 codes at a time, a 16-entry table lookup as two
// 8-lane permutes and a select (AVX2's vpermps in the x86-64-v3 clone); 8-bit codes: one table
// load per value; other widths and block sizes: the codes extracted one by one.
FTATTN_CLONES
void decode_row_generic(const Packed& W, int64_t o, float* out) {
  if (W.bits == 4 && W.bs % 8 == 0) {
    f8 tlo, thi;
    std::memcpy(&tlo, W.table, 32);
    std::memcpy(&thi, W.table + 8, 32);
    const vu8 shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    const uint8_t* row = W.codes + o * W.row_bytes;
    for (int64_t b = 0; b < W.nblk; ++b) {
      const float s = W.scale_tab[W.scales[o * W.nblk + b]];
      const uint8_t* blk = row + b * (W.bs / 2);
      float* dst = out + b * W.bs;
      for (int64_t g = 0; g < W.bs / 8; ++g) {
        uint32_t w;
        std::memcpy(&w, blk + 4 * g, 4);
        const vi8 idx = reinterpret_cast<vi8>(((vu8){} + w) >> shifts & 15u);  // code j of the 8 at bits 4j
        const f8 lo = __builtin_shuffle(tlo, idx), hi = __builtin_shuffle(thi, idx);
        const f8 v = (idx > 7 ? hi : lo) * s;
        std::memcpy(dst + 8 * g, &v, 32);
      }
    }
    return;
  }
  const uint8_t* row = W.codes + o * W.row_bytes;
  const int64_t block_bytes = W.bs * W.bits / 8;
  for (int64_t b = 0; b < W.nblk; ++b) {
    const float s = W.scale_tab[W.scales[o * W.nblk + b]];
    const uint8_t* blk = row + b * block_bytes;
    float* dst = out + b * W.bs;
    if (W.bits == 8) {
      for (int64_t j = 0; j < W.bs; ++j) dst[j] = W.table[blk[j]] * s;
    } else {
      for (int64_t j = 0; j < W.bs; ++j) dst[j] = W.table[code_at(blk, j, W.bits)] * s;
    }
  }
}

// y[r, o] for rows r of xp ([R, K_pad] float32, zero padded): a vectorised dot product per row.
FTATTN_CLONES
void gemv_generic(const Packed& W, const float* xp, int64_t R, int64_t K_pad, float* y, int64_t ldy, int64_t o0,
                  int64_t o1) {
  std::vector<float> w(K_pad);
  for (int64_t o = o0; o < o1; ++o) {
    decode_row_generic(W, o, w.data());
    for (int64_t r = 0; r < R; ++r) {
      const float* x = xp + r * K_pad;
      float acc[16] = {0};
      int64_t k = 0;
      for (; k + 16 <= K_pad; k += 16)
        for (int i = 0; i < 16; ++i) acc[i] += w[k + i] * x[k + i];
      float sum = 0.0f;
      for (; k < K_pad; ++k) sum += w[k] * x[k];
      for (int i = 0; i < 16; ++i) sum += acc[i];
      y[r * ldy + o] = sum;
    }
  }
}

#if FTATTN_MX_AVX512
// Before the decode paths read a block of F features' codes at `codes` (rows row_bytes apart),
// once per cache line of each row (offset: the block's within the row): 8 KiB ahead into L2 and
// 256 B ahead into L1. A core's few line-fill buffers alone keep too few misses in flight to
// stream the codes from memory (measured, 40 matrices [8192, 2048] in turn: fp4 16 -> 19 GB/s,
// fp8 15 -> 22 GB/s).
template <int F>
__attribute__((always_inline)) static inline void prefetch_codes(const uint8_t* codes, int64_t row_bytes,
                                                                 int64_t offset) {
  if ((offset & 63) != 0) return;
  for (int f = 0; f < F; ++f) {
    _mm_prefetch(reinterpret_cast<const char*>(codes + f * row_bytes + 8192), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(codes + f * row_bytes + 256), _MM_HINT_T0);
  }
}

// The decoders of one (KIND, BITS). one(): 16 codes (2 * BITS bytes at p) -> their 16 values in
// order, exact (the panels). unit(): UNIT codes -> UNIT / 16 vectors for the decode path, with
// the lane order and the power-of-two factor that path's x and scale table were prepared for:
// 4-bit codes 32 at a time as the low nibbles then the high ones (codes 0, 2, .., 30 | 1, .., 31:
// x is permuted to match), fp8 32 at a time (fp8_e4m3 as the fp16 bit pattern's value, 2^-8 times
// the code's: x carries the 2^8), int8 as the integer (the scale carries the 2^-6).
template <int KIND, int BITS>
struct Dec16 {
  static constexpr int UNIT = ((KIND == kTable && BITS == 4) || KIND == kE4M3 || KIND == kE5M2) ? 32 : 16;
  __m512 t0, t1, t2, t3;
  FTATTN_AVX512_FN explicit Dec16(const float* table) {
    if (KIND == kTable) {
      alignas(64) float t[64] = {0};
      const int n = 1 << BITS;
      for (int i = 0; i < 64; ++i) t[i] = BITS <= 4 ? table[i % n] : (i < n ? table[i] : 0.0f);
      t0 = _mm512_load_ps(t);
      t1 = _mm512_load_ps(t + 16);
      t2 = _mm512_load_ps(t + 32);
      t3 = _mm512_load_ps(t + 48);
    }
  }
  FTATTN_AVX512_FN static inline __attribute__((always_inline)) __m512 fp8_raw(const uint8_t* p) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __m256i h = _mm256_slli_epi16(w, 8);  // e5m2 is the top byte of an fp16
    // e4m3: s eeee mmm -> fp16 s 0eeee mmm0000000, the value times 2^-8 (bias 15 against 7), exact
    if (KIND == kE4M3) h = _mm256_and_si256(_mm256_srai_epi16(h, 1), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
    return _mm512_cvtph_ps(h);
  }
  FTATTN_AVX512_FN inline __attribute__((always_inline)) __m512 one(const uint8_t* p) const {
    if (KIND == kE4M3) {
      return _mm512_mul_ps(fp8_raw(p), _mm512_set1_ps(256.0f));
    } else if (KIND == kE5M2) {
      return fp8_raw(p);
    } else if (KIND == kInt8) {
      const __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(1.0f / 64.0f));
      // the spare code -128 is -0.0
      return _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(-128)), v, _mm512_set1_ps(-0.0f));
    } else if (BITS == 4) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      const __m512i c = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)),
                                          _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
      return _mm512_permutexvar_ps(c, t0);  // the low 4 bits index
    } else if (BITS == 2) {
      uint32_t word;
      std::memcpy(&word, p, 4);
      const __m128i b = _mm_shuffle_epi8(_mm_cvtsi32_si128(static_cast<int>(word)),
                                         _mm_set_epi8(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
      const __m512i c = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(b),
                                          _mm512_set_epi32(6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0));
      return _mm512_permutexvar_ps(c, t0);  // table repeated every 4 entries
    } else {  // 6 bits: code i spans bytes 6i/8 and 6i/8 + 1
      const __m128i b = _mm_maskz_loadu_epi8(0x0FFF, p);
      const __m128i lo = _mm_shuffle_epi8(b, _mm_set_epi8(11, 10, 9, 9, 8, 7, 6, 6, 5, 4, 3, 3, 2, 1, 0, 0));
      const __m128i hi = _mm_shuffle_epi8(b, _mm_set_epi8(12, 11, 10, 10, 9, 8, 7, 7, 6, 5, 4, 4, 3, 2, 1, 1));
      __m512i c = _mm512_or_si512(_mm512_cvtepu8_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu8_epi32(hi), 8));
      c = _mm512_and_si512(_mm512_srlv_epi32(c, _mm512_set_epi32(2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0)),
                           _mm512_set1_epi32(63));
      const __m512 vlo = _mm512_permutex2var_ps(t0, c, t1);
      const __m512 vhi = _mm512_permutex2var_ps(t2, c, t3);
      return _mm512_mask_blend_ps(_mm512_test_epi32_mask(c, _mm512_set1_epi32(32)), vlo, vhi);
    }
  }
  template <bool RAW>
  FTATTN_AVX512_FN inline __attribute__((always_inline)) void unit(const uint8_t* p, __m512* v) const {
    if (KIND == kTable && BITS == 4) {
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      v[0] = _mm512_permutexvar_ps(c, t0);                         // low nibbles: even codes
      v[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), t0);  // high nibbles: odd codes
    } else if (KIND == kE4M3 || KIND == kE5M2) {  // 32 codes: the bit moves on 32 words at once
      __m512i h = _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 8);
      if (KIND == kE4M3) h = _mm512_and_si512(_mm512_srai_epi16(h, 1), _mm512_set1_epi16(static_cast<short>(0xBFFF)));
      v[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
      v[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
      if (KIND == kE4M3 && !RAW) {
        v[0] = _mm512_mul_ps(v[0], _mm512_set1_ps(256.0f));
        v[1] = _mm512_mul_ps(v[1], _mm512_set1_ps(256.0f));
      }
    } else if (KIND == kInt8) {
      const __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      v[0] = _mm512_maskz_cvtepi32_ps(_mm512_cmpneq_epi32_mask(c, _mm512_set1_epi32(-128)), c);
    } else {
      v[0] = one(p);
    }
  }
};

// Up to 4 rows of x against output features [o0, o1), F features at a time (independent
// accumulation chains, x loaded once for the F): the codes are decoded once per 4 rows.
template <int KIND, int BITS, int R, int F, bool RAW>
FTATTN_AVX512_FN void gemv_rows(const Packed& W, const Dec16<KIND, BITS>& dec, const float* xp, int64_t K_pad,
                                float* y, int64_t ldy, int64_t o0, int64_t o1) {
  using D = Dec16<KIND, BITS>;
  constexpr int NV = D::UNIT / 16;
  constexpr int64_t unit_bytes = D::UNIT * BITS / 8;
  const int64_t units = W.bs / D::UNIT, nblk = W.nblk, bs = W.bs, row_bytes = W.row_bytes;
  const float* const stab = W.scale_gemv;
  int64_t o = o0;
  for (; o + F <= o1; o += F) {
    const uint8_t* codes = W.codes + o * row_bytes;  // feature o + f at codes + f * row_bytes
    const uint8_t* sc = W.scales + o * nblk;          // its scales at sc + f * nblk
    const int64_t block_bytes = units * unit_bytes;
    __m512 acc[R][F];
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < F; ++f) acc[r][f] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nblk; ++b, codes += block_bytes) {
      prefetch_codes<F>(codes, row_bytes, b * block_bytes);
      const float* xb = xp + b * bs;
      __m512 part[R][F];
      for (int r = 0; r < R; ++r)
        for (int f = 0; f < F; ++f) part[r][f] = _mm512_setzero_ps();
      for (int64_t u = 0; u < units; ++u) {
        __m512 v[F][NV];
        for (int f = 0; f < F; ++f) dec.template unit<RAW>(codes + f * row_bytes + u * unit_bytes, v[f]);
        for (int r = 0; r < R; ++r)
          for (int i = 0; i < NV; ++i) {
            const __m512 xv = _mm512_loadu_ps(xb + r * K_pad + u * D::UNIT + 16 * i);
            for (int f = 0; f < F; ++f) part[r][f] = _mm512_fmadd_ps(v[f][i], xv, part[r][f]);
          }
      }
      for (int f = 0; f < F; ++f) {
        const __m512 s = _mm512_set1_ps(stab[sc[f * nblk + b]]);
        for (int r = 0; r < R; ++r) acc[r][f] = _mm512_fmadd_ps(part[r][f], s, acc[r][f]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < F; ++f) y[r * ldy + o + f] = _mm512_reduce_add_ps(acc[r][f]);
  }
  if (F > 1 && o < o1) gemv_rows<KIND, BITS, R, 1, RAW>(W, dec, xp, K_pad, y, ldy, o, o1);
}

// fp8_e4m3 in blocks of 32 (the OCP MX block), the decode path without the fp16 converter: the
// codes of two blocks (64 bytes, 16 dwords) are loaded at once, and byte k of every dword becomes
// an fp32 bit pattern by integer operations alone: s eeee mmm -> s 0000eeee mmm0...0, i.e.
// (dword << (24 - 8k)) >>arith 4 & 0x87F00000, the code's value times 2^-120 exactly (the e4m3
// subnormals land on fp32 subnormals). Vector k holds codes 4i + k of the pair (lanes 0-7 the
// first block, 8-15 the second): x is permuted to match and carries 2^s of the 2^120, the block
// scales the rest (mx_linear_cpu). Per 64 codes: 7 shifts, 4 ANDs and 4 FMAs, no port-5 shuffle,
// where the fp16 converter path issues 22 uops (2 vpmovzxbw, 2 extracts, 4 two-uop converts, ..).
// x's row in gemv_e4m3_pairs' lane order, times xs (exact, a power of two): code c = 32 h + 4 j + b
// of each pair of blocks is in dword lane 8 h + j of vector b, so x[64 p + c] goes to
// 64 p + 16 b + 8 h + j (zero past K, up to ldx, a multiple of 64).
FTATTN_AVX512_FN void x_pairs(const float* src, int64_t K, float xs, float* dst, int64_t ldx) {
  const __m512 m = _mm512_set1_ps(xs);
  int64_t p = 0;
  for (; p + 64 <= K; p += 64) {
    const __m512 a0 = _mm512_loadu_ps(src + p), a1 = _mm512_loadu_ps(src + p + 16);
    const __m512 a2 = _mm512_loadu_ps(src + p + 32), a3 = _mm512_loadu_ps(src + p + 48);
    for (int b = 0; b < 4; ++b) {
      const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28),
                                           _mm512_set1_epi32(b));
      const __m512 lo = _mm512_permutex2var_ps(a0, idx, a1), hi = _mm512_permutex2var_ps(a2, idx, a3);
      _mm512_storeu_ps(dst + p + 16 * b, _mm512_mul_ps(_mm512_shuffle_f32x4(lo, hi, 0x44), m));
    }
  }
  for (; p < ldx; p += 64)
    for (int64_t c = 0; c < 64; ++c)
      dst[p + 16 * (c & 3) + 8 * (c >> 5) + ((c & 31) >> 2)] = p + c < K ? src[p + c] * xs : 0.0f;
}

template <int R, int F>
FTATTN_AVX512_FN void gemv_e4m3_pairs(const Packed& W, const float* xp, int64_t ldx, float* y, int64_t ldy,
                                      int64_t o0, int64_t o1) {
  const int64_t nblk = W.nblk, pairs = nblk / 2, row_bytes = W.row_bytes;
  const float* const stab = W.scale_gemv;
  const __m512i keep = _mm512_set1_epi32(static_cast<int>(0x87F00000u));
  int64_t o = o0;
  for (; o + F <= o1; o += F) {
    const uint8_t* codes = W.codes + o * row_bytes;  // feature o + f at codes + f * row_bytes
    const uint8_t* sc = W.scales + o * nblk;          // its scales at sc + f * nblk
    __m512 acc[R][F];
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < F; ++f) acc[r][f] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs + (nblk & 1); ++p) {
      const bool whole = p < pairs;  // else the last block alone: the upper 32 bytes read as code 0 (+0)
      prefetch_codes<F>(codes + 64 * p, row_bytes, 64 * p);
      const float* xb = xp + 64 * p;
      __m512 d[F][4];
      for (int f = 0; f < F; ++f) {
        const uint8_t* cp = codes + f * row_bytes + 64 * p;
        if (whole && cp - 3 >= W.codes) {
          // byte k of each dword moved to the top by loading 3 - k bytes earlier (no shift uop; the
          // bytes below it, from the previous block or row, are masked off)
          for (int k = 0; k < 4; ++k)
            d[f][k] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_srai_epi32(_mm512_loadu_si512(cp - 3 + k), 4), keep));
        } else {
          const __m512i v = whole ? _mm512_loadu_si512(cp) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, cp);
          d[f][3] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_srai_epi32(v, 4), keep));
          d[f][2] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 4), keep));
          d[f][1] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 4), keep));
          d[f][0] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 4), keep));
        }
      }
      __m512 part[R][F];
      for (int r = 0; r < R; ++r)
        for (int f = 0; f < F; ++f) part[r][f] = _mm512_setzero_ps();
      for (int k = 0; k < 4; ++k)
        for (int r = 0; r < R; ++r) {
          const __m512 xv = _mm512_loadu_ps(xb + r * ldx + 16 * k);
          for (int f = 0; f < F; ++f) part[r][f] = _mm512_fmadd_ps(d[f][k], xv, part[r][f]);
        }
      for (int f = 0; f < F; ++f) {
        const __m512 s0 = _mm512_set1_ps(stab[sc[f * nblk + 2 * p]]);
        const __m512 s = whole ? _mm512_mask_blend_ps(0xFF00, s0, _mm512_set1_ps(stab[sc[f * nblk + 2 * p + 1]])) : s0;
        for (int r = 0; r < R; ++r) acc[r][f] = _mm512_fmadd_ps(part[r][f], s, acc[r][f]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < F; ++f) y[r * ldy + o + f] = _mm512_reduce_add_ps(acc[r][f]);
  }
  if (F > 1 && o < o1) gemv_e4m3_pairs<R, 1>(W, xp, ldx, y, ldy, o, o1);
}

FTATTN_AVX512_FN void gemv_e4m3_pairs_t(const Packed& W, const float* xp, int64_t T, int64_t ldx, float* y,
                                        int64_t o0, int64_t o1, int64_t O) {
  for (int64_t r = 0; r < T; r += 4) {
    const float* x = xp + r * ldx;
    float* yr = y + r * O;
    switch (std::min<int64_t>(4, T - r)) {
      case 1: gemv_e4m3_pairs<1, 4>(W, x, ldx, yr, O, o0, o1); break;
      case 2: gemv_e4m3_pairs<2, 2>(W, x, ldx, yr, O, o0, o1); break;
      case 3: gemv_e4m3_pairs<3, 1>(W, x, ldx, yr, O, o0, o1); break;
      default: gemv_e4m3_pairs<4, 1>(W, x, ldx, yr, O, o0, o1); break;
    }
  }
}

template <int KIND, int BITS, bool RAW>
FTATTN_AVX512_FN void gemv_avx512_raw(const Packed& W, const float* xp, int64_t T, int64_t K_pad, float* y,
                                      int64_t o0, int64_t o1, int64_t O) {
  const Dec16<KIND, BITS> dec(W.table);
  for (int64_t r = 0; r < T; r += 4) {
    const float* x = xp + r * K_pad;
    float* yr = y + r * O;
    switch (std::min<int64_t>(4, T - r)) {
      case 1: gemv_rows<KIND, BITS, 1, 4, RAW>(W, dec, x, K_pad, yr, O, o0, o1); break;
      case 2: gemv_rows<KIND, BITS, 2, 2, RAW>(W, dec, x, K_pad, yr, O, o0, o1); break;
      case 3: gemv_rows<KIND, BITS, 3, 1, RAW>(W, dec, x, K_pad, yr, O, o0, o1); break;
      default: gemv_rows<KIND, BITS, 4, 1, RAW>(W, dec, x, K_pad, yr, O, o0, o1); break;
    }
  }
}

template <int KIND, int BITS>
FTATTN_AVX512_FN void gemv_avx512_t(const Packed& W, const float* xp, int64_t T, int64_t K_pad, float* y,
                                    int64_t o0, int64_t o1, int64_t O) {
  if (W.raw) gemv_avx512_raw<KIND, BITS, true>(W, xp, T, K_pad, y, o0, o1, O);
  else gemv_avx512_raw<KIND, BITS, false>(W, xp, T, K_pad, y, o0, o1, O);
}

// One output feature's values into out (K_pad floats), bit for bit those of unpack.
template <int KIND, int BITS>
FTATTN_AVX512_FN void decode_rows_avx512_t(const Packed& W, int64_t o0, int64_t o1, float* out, int64_t ld) {
  const Dec16<KIND, BITS> dec(W.table);
  const int64_t chunks = W.bs / 16, block_bytes = W.bs * BITS / 8;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = W.codes + o * W.row_bytes;
    float* dst = out + (o - o0) * ld;
    for (int64_t b = 0; b < W.nblk; ++b) {
      const __m512 s = _mm512_set1_ps(W.scale_tab[W.scales[o * W.nblk + b]]);
      for (int64_t c = 0; c < chunks; ++c)
        _mm512_storeu_ps(dst + b * W.bs + 16 * c, _mm512_mul_ps(dec.one(row + b * block_bytes + c * 2 * BITS), s));
    }
  }
}

bool use_avx512(const Packed& W) {
  if (W.bs % ((W.kind == kTable && W.bits == 4) || W.kind == kE4M3 || W.kind == kE5M2 ? 32 : 16) != 0) return false;
  if (W.kind == kTable && W.bits != 2 && W.bits != 4 && W.bits != 6) return false;
  static const bool ok = std::strcmp(kernel_isa(), "x86-64-v4") == 0;  // the clones' choice (vec.h)
  return ok;
}

#define FTATTN_MX_DISPATCH(W, FN, ...)                                       \
  switch (W.kind) {                                                          \
    case kE4M3: FN<kE4M3, 8>(__VA_ARGS__); break;                            \
    case kE5M2: FN<kE5M2, 8>(__VA_ARGS__); break;                            \
    case kInt8: FN<kInt8, 8>(__VA_ARGS__); break;                            \
    default:                                                                 \
      if (W.bits == 4) FN<kTable, 4>(__VA_ARGS__);                           \
      else if (W.bits == 2) FN<kTable, 2>(__VA_ARGS__);                      \
      else FN<kTable, 6>(__VA_ARGS__);                                       \
  }

// AVX2 processors (the x86-64-v3 clone: AMD Zen 1-3, Intel Haswell on) and block sizes the
// AVX-512 decoders do not take (a multiple of 8, not of 32): 8 codes a vector, decoded in
// registers to their exact values (one8 = Dec16::one on 8 lanes: fp4 through two 8-lane table
// permutes and a select on the code's top bit, fp8 through F16C's fp16 converter, int8 by an
// integer convert), so no value table is read per code. The generic path gathered fp8 and int8
// values from the table one by one: packed fp8 at T = 1 was 0.89x F.linear (4096 x 4096, AMD
// EPYC Zen 4 run as x86-64-v3); fp6 / fp2 stay generic.
template <int KIND, int BITS>
struct Dec8 {
  __m256 tlo, thi;
  FTATTN_AVX2_FN explicit Dec8(const float* table) {
    if (KIND == kTable) {
      tlo = _mm256_loadu_ps(table);
      thi = _mm256_loadu_ps(table + 8);
    }
  }
  // 8 codes at p (BITS bytes) -> their 8 values, in order, exact
  FTATTN_AVX2_FN inline __attribute__((always_inline)) __m256 one8(const uint8_t* p) const {
    if (KIND == kE4M3 || KIND == kE5M2) {
      __m128i h = _mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 8);
      // e4m3: s eeee mmm -> fp16 s 0eeee mmm0000000, 2^-8 times the value (exact); e5m2 is fp16's top byte
      if (KIND == kE4M3) h = _mm_and_si128(_mm_srai_epi16(h, 1), _mm_set1_epi16(static_cast<short>(0xBFFF)));
      const __m256 v = _mm256_cvtph_ps(h);
      return KIND == kE4M3 ? _mm256_mul_ps(v, _mm256_set1_ps(256.0f)) : v;
    } else if (KIND == kInt8) {
      const __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(c), _mm256_set1_ps(1.0f / 64.0f));
      // the spare code -128 is -0.0
      const __m256 spare = _mm256_castsi256_ps(_mm256_cmpeq_epi32(c, _mm256_set1_epi32(-128)));
      return _mm256_blendv_ps(v, _mm256_set1_ps(-0.0f), spare);
    } else {  // 4-bit codes: code j at bits 4j of the 32-bit word
      uint32_t w;
      std::memcpy(&w, p, 4);
      const __m256i c = _mm256_and_si256(
          _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
          _mm256_set1_epi32(15));
      const __m256 lo = _mm256_permutevar8x32_ps(tlo, c), hi = _mm256_permutevar8x32_ps(thi, c);
      return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));  // code >= 8: hi
    }
  }
};

FTATTN_AVX2_FN inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Up to 4 rows of x against output features [o0, o1), F features at a time, as gemv_rows: each
// block's products summed, then scaled once by its 2^shared_exp.
template <int KIND, int BITS, int R, int F>
FTATTN_AVX2_FN void gemv_rows_avx2(const Packed& W, const Dec8<KIND, BITS>& dec, const float* xp, int64_t K_pad,
                                   float* y, int64_t ldy, int64_t o0, int64_t o1) {
  const int64_t nblk = W.nblk, bs = W.bs, row_bytes = W.row_bytes, block_bytes = bs * BITS / 8;
  int64_t o = o0;
  for (; o + F <= o1; o += F) {
    const uint8_t* codes = W.codes + o * row_bytes;
    const uint8_t* sc = W.scales + o * nblk;
    __m256 acc[R][F];
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < F; ++f) acc[r][f] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblk; ++b, codes += block_bytes) {
      prefetch_codes<F>(codes, row_bytes, b * block_bytes);
      const float* xb = xp + b * bs;
      __m256 part[R][F];
      for (int r = 0; r < R; ++r)
        for (int f = 0; f < F; ++f) part[r][f] = _mm256_setzero_ps();
      for (int64_t u = 0; u < bs; u += 8) {
        __m256 v[F];
        for (int f = 0; f < F; ++f) v[f] = dec.one8(codes + f * row_bytes + u * BITS / 8);
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_loadu_ps(xb + r * K_pad + u);
          for (int f = 0; f < F; ++f) part[r][f] = _mm256_fmadd_ps(v[f], xv, part[r][f]);
        }
      }
      for (int f = 0; f < F; ++f) {
        const __m256 s = _mm256_set1_ps(W.scale_tab[sc[f * nblk + b]]);
        for (int r = 0; r < R; ++r) acc[r][f] = _mm256_fmadd_ps(part[r][f], s, acc[r][f]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < F; ++f) y[r * ldy + o + f] = hsum8(acc[r][f]);
  }
  if (F > 1 && o < o1) gemv_rows_avx2<KIND, BITS, R, 1>(W, dec, xp, K_pad, y, ldy, o, o1);
}

template <int KIND, int BITS>
FTATTN_AVX2_FN void gemv_avx2_t(const Packed& W, const float* xp, int64_t T, int64_t K_pad, float* y, int64_t o0,
                                int64_t o1, int64_t O) {
  const Dec8<KIND, BITS> dec(W.table);
  for (int64_t r = 0; r < T; r += 4) {
    const float* x = xp + r * K_pad;
    float* yr = y + r * O;
    switch (std::min<int64_t>(4, T - r)) {
      case 1: gemv_rows_avx2<KIND, BITS, 1, 4>(W, dec, x, K_pad, yr, O, o0, o1); break;
      case 2: gemv_rows_avx2<KIND, BITS, 2, 2>(W, dec, x, K_pad, yr, O, o0, o1); break;
      case 3: gemv_rows_avx2<KIND, BITS, 3, 1>(W, dec, x, K_pad, yr, O, o0, o1); break;
      default: gemv_rows_avx2<KIND, BITS, 4, 1>(W, dec, x, K_pad, yr, O, o0, o1); break;
    }
  }
}

// Output features [o0, o1) into out, bit for bit the values of unpack (code value * 2^e: one rounding).
template <int KIND, int BITS>
FTATTN_AVX2_FN void decode_rows_avx2_t(const Packed& W, int64_t o0, int64_t o1, float* out, int64_t ld) {
  const Dec8<KIND, BITS> dec(W.table);
  const int64_t block_bytes = W.bs * BITS / 8;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = W.codes + o * W.row_bytes;
    float* dst = out + (o - o0) * ld;
    for (int64_t b = 0; b < W.nblk; ++b) {
      const __m256 s = _mm256_set1_ps(W.scale_tab[W.scales[o * W.nblk + b]]);
      for (int64_t u = 0; u < W.bs; u += 8)
        _mm256_storeu_ps(dst + b * W.bs + u, _mm256_mul_ps(dec.one8(row + b * block_bytes + u * BITS / 8), s));
    }
  }
}

bool use_avx2(const Packed& W) {
  if (W.bs % 8 != 0) return false;
  if (W.kind == kTable && W.bits != 4) return false;
  static const bool ok = std::strcmp(kernel_isa(), "x86-64-v3") == 0 || std::strcmp(kernel_isa(), "x86-64-v4") == 0;
  return ok;
}

#define FTATTN_MX_DISPATCH8(W, FN, ...)           \
  switch (W.kind) {                               \
    case kE4M3: FN<kE4M3, 8>(__VA_ARGS__); break; \
    case kE5M2: FN<kE5M2, 8>(__VA_ARGS__); break; \
    case kInt8: FN<kInt8, 8>(__VA_ARGS__); break; \
    default: FN<kTable, 4>(__VA_ARGS__);          \
  }
#else
bool use_avx512(const Packed&) { return false; }
bool use_avx2(const Packed&) { return false; }
#endif

void gemv(const Packed& W, const float* xp, int64_t T, int64_t K_pad, float* y, int64_t o0, int64_t o1, int64_t O) {
#if FTATTN_MX_AVX512
  if (W.e4m3_pairs) {
    gemv_e4m3_pairs_t(W, xp, T, K_pad, y, o0, o1, O);
    return;
  }
  if (use_avx512(W)) {
    FTATTN_MX_DISPATCH(W, gemv_avx512_t, W, xp, T, K_pad, y, o0, o1, O);
    return;
  }
  if (use_avx2(W)) {
    FTATTN_MX_DISPATCH8(W, gemv_avx2_t, W, xp, T, K_pad, y, o0, o1, O);
    return;
  }
#endif
  gemv_generic(W, xp, T, K_pad, y, O, o0, o1);
}

void decode_rows(const Packed& W, int64_t o0, int64_t o1, float* out, int64_t ld) {
#if FTATTN_MX_AVX512
  if (use_avx512(W)) {
    FTATTN_MX_DISPATCH(W, decode_rows_avx512_t, W, o0, o1, out, ld);
    return;
  }
  if (use_avx2(W)) {
    FTATTN_MX_DISPATCH8(W, decode_rows_avx2_t, W, o0, o1, out, ld);
    return;
  }
#endif
  for (int64_t o = o0; o < o1; ++o) decode_row_generic(W, o, out + (o - o0) * ld);
}

at::Tensor mx_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                         const at::Tensor& table, int64_t bits, int64_t kind, int64_t block_size,
                         const std::optional<at::Tensor>& bias) {
  // (the kernel's own ATen calls, views included, skip autograd and view tracking: ~1 us a call)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x.dim() >= 1, "ftattn::mx_linear: x must be [..., in_features], got a 0-d tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "ftattn::mx_linear: x.dtype ", dt, " is not supported; use float32, bfloat16 or float16");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "ftattn::mx_linear: codes must be contiguous uint8 [out_features, row_bytes], got ", codes.sizes(),
              " ", codes.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == codes.size(0),
              "ftattn::mx_linear: scales must be contiguous uint8 [out_features, nblk] with out_features = ",
              codes.size(0), ", got ", scales.sizes());
  TORCH_CHECK(bits >= 2 && bits <= 8 && block_size >= 1 && (block_size * bits) % 8 == 0,
              "ftattn::mx_linear: block_size * bits must be a multiple of 8 (got block_size ", block_size,
              ", bits ", bits, ")");
  TORCH_CHECK(kind >= kTable && kind <= kInt8 && (kind == kTable || bits == 8),
              "ftattn::mx_linear: decode kind ", kind, " does not fit ", bits, "-bit codes");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == (int64_t{1} << bits),
              "ftattn::mx_linear: table must be float32 with 2^bits = ", int64_t{1} << bits, " entries");
  const int64_t O = codes.size(0), nblk = scales.size(1), K_pad = nblk * block_size;
  TORCH_CHECK(codes.size(1) == K_pad * bits / 8, "ftattn::mx_linear: codes hold ", codes.size(1),
              " bytes per output feature, expected nblk * block_size * bits / 8 = ", K_pad * bits / 8);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K <= K_pad && K > K_pad - block_size, "ftattn::mx_linear: x has ", K,
              " input features, the packed weight ", nblk, " blocks of ", block_size);
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && scales.device().is_cpu(),
              "ftattn::mx_linear (CPU kernel): all tensors must be on the CPU");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == O, "ftattn::mx_linear: bias must be [", O, "], got ",
                bias->sizes());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = O;
  const at::Tensor x2 = x.reshape({-1, K});
  const int64_t T = x2.size(0);

  float scale_tab[256];
  for (int e = 0; e < 255; ++e) scale_tab[e] = pow2_e8m0(e);
  scale_tab[255] = std::numeric_limits<float>::quiet_NaN();
  float scale_int8[256];  // int8's decode path reads the integer: 2^-6 more
  for (int e = 0; e < 256; ++e) scale_int8[e] = scale_tab[e] * (1.0f / 64.0f);  // exact (>= 2^-133)
  Packed W{codes.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), table.data_ptr<float>(), scale_tab, scale_tab,
           false, false, codes.size(1), nblk, block_size, bits, kind};

  at::Tensor y;
  if (T == 0 || O == 0) {
    y = at::zeros({T, O}, x.options());
  } else if (T <= kGemvRows) {
    // x in float32, zero padded to whole blocks, in the lane order of the decoder (one pass: a decode
    // step's fixed cost is a few microseconds)
    const bool fast = use_avx512(W);
    const bool nibbles = fast && kind == kTable && bits == 4;  // Dec16::unit: even codes, then odd ones
    W.e4m3_pairs = fast && kind == kE4M3 && block_size == 32;  // gemv_e4m3_pairs: codes 4i + k of 64 in vector k
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    const float* src = xf.data_ptr<float>();
    const float amax = abs_max(src, T * K);  // NaNs aside (they reach y through the products)
    // the e4m3_pairs decoder's codes are value * 2^-120: x takes 2^(120 - t) of it (finite: amax <
    // 2^(t + 7)), the block scales the remaining 2^t, where no scale in use overflows by it (else
    // the fp16-converter path)
    int ex = 0;
    if (amax > 0.0f && std::isfinite(amax)) std::frexp(amax, &ex);  // amax < 2^ex
    const int t = std::max(0, ex - 7);
    if (W.e4m3_pairs && (!std::isfinite(amax) || (t > 0 && scales.max().item<uint8_t>() - 127 + t > 127)))
      W.e4m3_pairs = false;
    const bool raw = fast && kind == kE4M3 && !W.e4m3_pairs && amax < 0x1p100f;  // the decoder's 2^8 moves into x
    const float xs = W.e4m3_pairs ? std::ldexp(1.0f, 120 - t) : raw ? 256.0f : 1.0f;  // exact
    const int64_t ldx = W.e4m3_pairs ? (K_pad + 63) / 64 * 64 : K_pad;  // x's row stride: whole pairs of blocks
    at::Tensor xp = at::empty({T, ldx}, xf.options());
    float* dst = xp.data_ptr<float>();
    for (int64_t r = 0; r < T; ++r) {
      const float* s_row = src + r * K;
      float* d_row = dst + r * ldx;
#if FTATTN_MX_AVX512
      if (W.e4m3_pairs) {
        x_pairs(s_row, K, xs, d_row, ldx);
        continue;
      }
#endif
      if (nibbles) {
        for (int64_t k = 0; k < K_pad; ++k)
          d_row[(k & ~int64_t{31}) + ((k & 31) >> 1) + 16 * (k & 1)] = k < K ? s_row[k] : 0.0f;
      } else {
        for (int64_t k = 0; k < K_pad; ++k) d_row[k] = k < K ? s_row[k] * xs : 0.0f;
      }
    }
    W.raw = raw;
    float scale_pairs[256];  // gemv_e4m3_pairs': scale_tab * 2^t (exact, no entry in use overflows)
    if (W.e4m3_pairs && t > 0) {
      const float f2t = std::ldexp(1.0f, t);
      for (int e = 0; e < 256; ++e) scale_pairs[e] = scale_tab[e] * f2t;
      W.scale_gemv = scale_pairs;
    }
    if (fast && kind == kInt8) W.scale_gemv = scale_int8;
    at::Tensor yf = at::empty({T, O}, xp.options());
    const float* xpp = xp.data_ptr<float>();
    float* yp = yf.data_ptr<float>();
    at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) { gemv(W, xpp, T, ldx, yp, o0, o1, O); });
    y = yf.to(dt);
  } else {
    // panels of output features: ~2 MiB of fp32 values each, at least 64 features
    const bool half_panel = dt == at::kBFloat16;
    const int64_t per = std::max<int64_t>(64, ((int64_t{1} << 19) / K_pad) / 64 * 64);
    const int64_t np = std::min(per, O);
    at::Tensor panel = at::empty({np, K_pad}, x.options().dtype(at::kFloat));
    at::Tensor panel16 = half_panel ? at::empty({np, K_pad}, x.options()) : at::Tensor();
    const at::Tensor xm = half_panel ? x2 : x2.to(at::kFloat);
    const at::Tensor xk = K == K_pad ? xm : at::constant_pad_nd(xm, {0, K_pad - K});
    y = at::empty({T, O}, xk.options());
    for (int64_t p0 = 0; p0 < O; p0 += np) {
      const int64_t n = std::min(np, O - p0);
      float* pp = panel.data_ptr<float>();
      uint16_t* hp = half_panel ? reinterpret_cast<uint16_t*>(panel16.data_ptr<at::BFloat16>()) : nullptr;
      at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) {
        decode_rows(W, p0 + a, p0 + b, pp + a * K_pad, K_pad);
        // bf16 panel: the top half of each fp32 value, exact (every MX value has <= 8 significant
        // bits); no ATen call on the pool's threads (a copy_ there ran without the caller's
        // inference mode and refused the panel made under it: RuntimeError on 2+ threads)
        if (half_panel)
          for (int64_t i = a * K_pad; i < b * K_pad; ++i) {
            uint32_t u;
            std::memcpy(&u, pp + i, sizeof(u));
            hp[i] = static_cast<uint16_t>(u >> 16);
          }
      });
      const at::Tensor w = (half_panel ? panel16 : panel).narrow(0, 0, n);
      if (n == O) {
        at::mm_out(y, xk, w.t());
      } else {  // into a contiguous block first: oneDNN's bfloat16 GEMM into a strided slice is ~6x slower
        y.narrow(1, p0, n).copy_(at::mm(xk, w.t()));
      }
    }
    y = y.to(dt);
  }
  if (bias) y.add_(bias->to(y.scalar_type()));
  return y.view(out_shape);
}

}  // namespace
}  // namespace ftattn

TORCH_LIBRARY_IMPL(ftattn, CPU, m) { m.impl("mx_linear", &ftattn::mx_linear_cpu); }
