// The bf16 GEMM of the CPU kernels: bf16 x bf16 -> fp32 on oneDNN's brgemm microkernel,
// through torch (at::native::cpublas::brgemm), for the attention kernels' tiles (gemm_bf16)
// and ftattn.linear's product (linear_bf16). torch exports no bf16 -> fp32 GEMM but MKL's
// cblas_gemm_bf16bf16f32, which runs at sgemm's speed on AMD processors (it does not use
// their AVX512-BF16), and oneDNN's own matmul only with a bf16 result; brgemm takes its
// second operand in VNNI pairs (pack_vnni), so the loops around it are ours.
// Included by csrc/attention/common.h and csrc/linear_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace ftattn {
namespace {
// Whether bf16 products run on the bf16 GEMM: oneDNN's brgemm ukernel through torch
// (at::native::cpublas::brgemm, B in VNNI pairs: pack_vnni, gemm_bf16 below), on the hardware's
// bf16 dot products (AVX512-BF16's vdpbf16ps, or AMX-BF16 where the OS allows it). Each
// product of two bf16 values is exact in fp32 and the sums are fp32, as sgemm's on fp32
// copies, but inputs below 2^-126 are read as 0 and such results flushed to 0 (DAZ / FTZ,
// whatever MXCSR says): the bounds carry 2^-126 per operation there. Measured, one thread,
// 264 x 512 x 64 with packing: 2.1x sgemm on an AMD EPYC (Zen 4, AVX512-BF16), as fast as
// MKL's cblas_gemm_bf16bf16f32 on a Xeon with AMX, where MKL's ran at sgemm's speed on the
// EPYC. Not on a CPU without them (oneDNN would emulate them no faster than sgemm), nor
// where torch.backends.mkldnn is disabled (brgemm then refuses VNNI operands), nor with
// FTATTN_GEMM16=0 (the sgemm path, for comparisons; read per call). A first call checks
// one product against its known value, once per process.
inline bool bf16_gemm_probe() {
  const uint16_t a[4] = {0x3F80, 0x4000, 0x4040, 0x4080};  // 1 2 3 4
  uint16_t b[32 * 2] = {};  // B [2 x 1] in VNNI pairs, ld 32: (1, 0.5)
  b[0] = 0x3F80;
  b[1] = 0x3F00;
  float c[2] = {-1.f, -1.f};
  try {
    at::native::cpublas::brgemm(2, 1, 2, 2, 32, 1, false, reinterpret_cast<const at::BFloat16*>(a),
                                reinterpret_cast<const at::BFloat16*>(b), c, true);
    at::native::cpublas::brgemm_release(true);
  } catch (const std::exception&) {
    return false;
  }
  return c[0] == 2.f && c[1] == 5.f;
}
inline bool bf16_gemm_ready() {
#if defined(__x86_64__) && defined(CPUBLAS_BRGEMM_BF16BF16F32)
  if (!at::globalContext().userEnabledMkldnn()) return false;
  const char* env = std::getenv("FTATTN_GEMM16");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  static const bool hw = (__builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16")) &&
                         bf16_gemm_probe();
  return hw;
#else
  return false;
#endif
}

// The bf16 GEMM's operands as brgemm reads them, one set per thread: B in VNNI panels of
// 64 columns (pack_vnni), A transposed where asked (brgemm has no transposed operands).
struct Bf16Operands {
  std::vector<uint32_t> b;
  std::vector<uint16_t> a;
  std::vector<float> c;  // (linear_bf16's C^T block)
};
static Bf16Operands& bf16_operands() {
  static thread_local Bf16Operands o;
  return o;
}

// op(B) [k x n] (B [n x k] where transposed, S = Q K^T's keys; else [k x n]) as brgemm's
// VNNI operand: panel p of columns 64 p .. 64 p + 63 is kp = ceil(k / 2) rows of 64 pairs,
// out[p][kk][c] = (op(B)[2 kk][64 p + c], op(B)[2 kk + 1][64 p + c]) in one 32-bit word
// (low half first), 0 past k and n.
static void pack_vnni(bool b_transposed, int64_t k, int64_t n, const uint16_t* B, int64_t ldb, uint32_t* out) {
  const int64_t kp = (k + 1) / 2;
  for (int64_t p = 0; p < (n + 63) / 64; ++p) {
    uint32_t* o = out + p * kp * 64;
    const int64_t c0 = p * 64, nc = std::min<int64_t>(64, n - c0);
    if (nc < 64)
      for (int64_t kk = 0; kk < kp; ++kk) std::fill(o + kk * 64 + nc, o + kk * 64 + 64, 0u);
    if (b_transposed) {  // (16 pairs of a row at a time: the 16 rows of out they go to stay in L1)
      for (int64_t kb = 0; kb < k / 2; kb += 16) {
        const int64_t ke = std::min<int64_t>(kb + 16, k / 2);
        for (int64_t c = 0; c < nc; ++c) {
          const uint16_t* row = B + (c0 + c) * ldb;
          for (int64_t kk = kb; kk < ke; ++kk) {
            uint32_t w;
            std::memcpy(&w, row + 2 * kk, sizeof(w));
            o[kk * 64 + c] = w;
          }
        }
      }
      if (k % 2)
        for (int64_t c = 0; c < nc; ++c) o[(kp - 1) * 64 + c] = B[(c0 + c) * ldb + k - 1];
    } else {
      for (int64_t kk = 0; kk < kp; ++kk) {
        const uint16_t* r0 = B + 2 * kk * ldb + c0;
        uint32_t* ok = o + kk * 64;
        if (2 * kk + 1 < k) {
          const uint16_t* r1 = r0 + ldb;
#pragma omp simd
          for (int64_t c = 0; c < nc; ++c) ok[c] = static_cast<uint32_t>(r0[c]) | static_cast<uint32_t>(r1[c]) << 16;
        } else {
          for (int64_t c = 0; c < nc; ++c) ok[c] = r0[c];
        }
      }
    }
  }
}

// C[m x n] (+)= A B on brgemm for A [m x k] (row stride lda) and B as pack_vnni's panel
// (pair rows ldb words apart), fp32 C (row stride ldc; add_C: accumulate). brgemm's kernels
// for AMX fault on an odd k (SIGILL at their first tile instruction: measured on a Xeon with
// AMX-BF16, every m and n tried with k 1, 3, .., 65, and no even k), so brgemm takes the even
// k - 1 and the last term, a[i][k-1] b[k-1][j] (the low halves of B's last pair row; an exact
// product in fp32), is added once, rounded once: on every CPU alike, so a product's rounding
// does not depend on whether the CPU has AMX.
static void brgemm_bf16(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add_C,
                        const uint16_t* A, const uint32_t* B, float* C) {
  const int64_t ke = k & ~int64_t{1};
  if (ke > 0)
    at::native::cpublas::brgemm(m, n, ke, lda, ldb, ldc, add_C, reinterpret_cast<const at::BFloat16*>(A),
                                reinterpret_cast<const at::BFloat16*>(B), C, true);
  if (ke == k) {
    if (k == 0 && !add_C)
      for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.f);
    return;
  }
  const uint32_t* last = B + (k / 2) * ldb;
  const bool acc = add_C || ke > 0;
  for (int64_t i = 0; i < m; ++i) {
    uint32_t ab = static_cast<uint32_t>(A[i * lda + k - 1]) << 16;
    float a;
    std::memcpy(&a, &ab, sizeof(a));
    float* c = C + i * ldc;
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t bb = last[j] << 16;
      float b;
      std::memcpy(&b, &bb, sizeof(b));
      c[j] = acc ? c[j] + a * b : a * b;
    }
  }
}

// C[m x n] = A B + beta C (beta 0 or 1) on the bf16 GEMM for B already as pack_vnni makes
// it, its panel p of 64 columns at Bp + p * panel_stride (words): one brgemm call per panel.
static void gemm_bf16_packed(int64_t m, int64_t n, int64_t k, const uint16_t* A, int64_t lda, const uint32_t* Bp,
                             int64_t panel_stride, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  for (int64_t p = 0; p < (n + 63) / 64; ++p)
    brgemm_bf16(m, std::min<int64_t>(64, n - p * 64), k, lda, 64, ldc, beta != 0.f, A, Bp + p * panel_stride,
                C + p * 64);
}

#if defined(__x86_64__)
// out[c][r] = A[r][c] for a 16 x 16 block of 16-bit values (rows lda and ldo apart) in AVX2
// registers: 16-, 32- and 64-bit interleaves within 128-bit lanes, then the lanes swapped
// (64 shuffles per 256 values, where element by element costs a load and a store each). The
// bf16 GEMM runs only where the CPU has AVX512-BF16 or AMX, so AVX2 is there.
__attribute__((target("avx2"))) static void transpose16x16(const uint16_t* A, int64_t lda, uint16_t* out,
                                                            int64_t ldo) {
  __m256i r[16], a[16], b[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda));
  for (int p = 0; p < 8; ++p) {  // a[p]: rows 2p, 2p+1 of columns 0-3 | 8-11; a[8 + p]: 4-7 | 12-15
    a[p] = _mm256_unpacklo_epi16(r[2 * p], r[2 * p + 1]);
    a[8 + p] = _mm256_unpackhi_epi16(r[2 * p], r[2 * p + 1]);
  }
  // b[4 g + q]: rows 4q .. 4q+3 of the column pairs (g: 0 -> 0, 1 | 8, 9; 1 -> 2, 3 | 10, 11;
  // 2 -> 4, 5 | 12, 13; 3 -> 6, 7 | 14, 15)
  for (int h = 0; h < 2; ++h)
    for (int q = 0; q < 4; ++q) {
      b[8 * h + q] = _mm256_unpacklo_epi32(a[8 * h + 2 * q], a[8 * h + 2 * q + 1]);
      b[8 * h + 4 + q] = _mm256_unpackhi_epi32(a[8 * h + 2 * q], a[8 * h + 2 * q + 1]);
    }
  for (int g = 0; g < 4; ++g) {
    const __m256i* x = b + 4 * g;
    const __m256i l01 = _mm256_unpacklo_epi64(x[0], x[1]), h01 = _mm256_unpackhi_epi64(x[0], x[1]);
    const __m256i l23 = _mm256_unpacklo_epi64(x[2], x[3]), h23 = _mm256_unpackhi_epi64(x[2], x[3]);
    const int c = 2 * g;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * ldo), _mm256_permute2x128_si256(l01, l23, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (c + 8) * ldo), _mm256_permute2x128_si256(l01, l23, 0x31));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (c + 1) * ldo), _mm256_permute2x128_si256(h01, h23, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (c + 9) * ldo), _mm256_permute2x128_si256(h01, h23, 0x31));
  }
}
#endif

// out [m x k] (row-major) = A^T for A [k x m] (row stride lda), 16-bit values, in blocks of
// 16 x 16 (transpose16x16; the edges element by element). (Element by element throughout,
// gemm_bf16's transposition of P and dS was 9 % of a bf16 forward + backward's samples on
// the Xeon with AMX, and 12.5 % in blocks of 16 x 16 element by element: measured.)
static void transpose16(const uint16_t* A, int64_t lda, int64_t k, int64_t m, uint16_t* out) {
  for (int64_t i0 = 0; i0 < m; i0 += 16) {
    const int64_t i1 = std::min<int64_t>(m, i0 + 16);
    for (int64_t r0 = 0; r0 < k; r0 += 16) {
      const int64_t r1 = std::min<int64_t>(k, r0 + 16);
#if defined(__x86_64__)
      if (i1 - i0 == 16 && r1 - r0 == 16) {
        transpose16x16(A + r0 * lda + i0, lda, out + i0 * k + r0, k);
        continue;
      }
#endif
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t r = r0; r < r1; ++r) out[i * k + r] = A[r * lda + i];
    }
  }
}

// C[m x n] = A^T B + beta C for A [k x m] (row stride lda) and B packed (gemm_bf16_packed).
static void gemm_bf16_at_packed(int64_t m, int64_t n, int64_t k, const uint16_t* A, int64_t lda, const uint32_t* Bp,
                                int64_t panel_stride, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  Bf16Operands& w = bf16_operands();
  if (w.a.size() < static_cast<size_t>(m * k)) w.a.resize(m * k);
  transpose16(A, lda, k, m, w.a.data());
  gemm_bf16_packed(m, n, k, w.a.data(), k, Bp, panel_stride, beta, C, ldc);
}

// C[m x n] = op(A) op(B) + beta C (beta 0 or 1) on the bf16 GEMM (bf16_gemm_ready),
// row-major (op: transposed where asked; A [m x k] or [k x m], B [k x n] or [n x k]), fp32 C:
// one brgemm call per panel of 64 columns of C.
static void gemm_bf16(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, const uint16_t* A,
                      int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.f)
      for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.f);
    return;
  }
  Bf16Operands& w = bf16_operands();
  const int64_t kp = (k + 1) / 2, panels = (n + 63) / 64;
  if (w.b.size() < static_cast<size_t>(panels * kp * 64)) w.b.resize(panels * kp * 64);
  pack_vnni(b_transposed, k, n, B, ldb, w.b.data());
  if (a_transposed) {
    gemm_bf16_at_packed(m, n, k, A, lda, w.b.data(), kp * 64, beta, C, ldc);
    return;
  }
  gemm_bf16_packed(m, n, k, A, lda, w.b.data(), kp * 64, beta, C, ldc);
}

// Gives back the hardware context brgemm took (AMX's tile state), at the end of a worker.
struct Bf16GemmRelease {
  bool used;
  ~Bf16GemmRelease() {
    if (used) at::native::cpublas::brgemm_release(true);
  }
};


// y [T, R] (fp32, row-major) = x [T, K] W^T for W [R, K] (row stride ldw), both bf16, on
// the bf16 GEMM, spread over torch's threads; each y[t, o] is one thread's, its sum in an
// order fixed by T, K and R alone, so the product is deterministic (ftattn.linear's
// recomputation relies on it). Up to 64 rows (decode, small batches): y^T = W x^T, so
// the weight is read once, straight from memory as brgemm's first operand, and only x is
// packed (one panel); blocks of 64 rows of W per task. More rows: per task a panel of 64
// output features of W is packed (L2-resident) and the rows of x stream past it, the
// inner dimension in chunks of kLinearKc (the panel's chunk stays in L2 for long K).
// brgemm JIT-compiles a kernel per shape (M, N, K, strides; 0.2-0.5 ms the first time,
// measured), kept per thread: the rows of x go in blocks of 128, 64, .., 1 and x's panel
// is 16, 32, 48 or 64 columns wide, so lengths T add at most 4 + 8 shapes per layer, not one per
// length.
constexpr int64_t kLinearKc = 4096;
constexpr int64_t kGemvRows = 4;  // up to this many rows of x: gemv_bf16 (T 8: brgemm 2.4 vs 3.3-3.6 ms)
#if defined(__x86_64__)
// y [T, R] = x [T, K] W^T for a few rows of x (decode): one pass over W, streamed from
// memory, each row of W dotted with every row of x by AVX512-BF16's vdpbf16ps (16 lanes of
// pair products, exact, added in fp32; then the 16 lanes in a fixed order), rows of W spread
// over torch's threads. brgemm does this at 1.4-1.9x F.linear's time on the AMD EPYC (its
// small-N kernels do not keep the memory busy); this at F.linear's (measured: README).
// (rows o0 .. o1 of W against rows t0 .. t0 + TB of x: each 32 values of W loaded once for
// the TB rows; two accumulators per row, even and odd chunks, then added in a fixed order)
template <int TB>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void gemv_bf16_block(const uint16_t* X, int64_t K,
                                                                             const uint16_t* W, int64_t ldw,
                                                                             int64_t R, float* Y, int64_t t0,
                                                                             int64_t o0, int64_t o1) {
  const int64_t full = K / 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (K % 32)) - 1);
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* w = W + o * ldw;
    __m512 even[TB], odd[TB];
    for (int j = 0; j < TB; ++j) even[j] = odd[j] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 1 < full; c += 2) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + 32 * c);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32 * c + 32);
#pragma GCC unroll 4
      for (int j = 0; j < TB; ++j) {
        const uint16_t* x = X + (t0 + j) * K + 32 * c;
        even[j] = _mm512_dpbf16_ps(even[j], w0, (__m512bh)_mm512_loadu_si512(x));
        odd[j] = _mm512_dpbf16_ps(odd[j], w1, (__m512bh)_mm512_loadu_si512(x + 32));
      }
    }
    if (c < full) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + 32 * c);
      for (int j = 0; j < TB; ++j)
        even[j] = _mm512_dpbf16_ps(even[j], w0, (__m512bh)_mm512_loadu_si512(X + (t0 + j) * K + 32 * c));
    }
    if (tail) {
      const __m512bh wt = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + 32 * full);
      for (int j = 0; j < TB; ++j)
        odd[j] = _mm512_dpbf16_ps(odd[j], wt, (__m512bh)_mm512_maskz_loadu_epi16(tail, X + (t0 + j) * K + 32 * full));
    }
    for (int j = 0; j < TB; ++j) Y[(t0 + j) * R + o] = _mm512_reduce_add_ps(_mm512_add_ps(even[j], odd[j]));
  }
}
void gemv_bf16_rows(const uint16_t* X, int64_t T, int64_t K, const uint16_t* W, int64_t ldw, int64_t R, float* Y,
                    int64_t o0, int64_t o1) {
  int64_t t0 = 0;
  for (; t0 + 4 <= T; t0 += 4) gemv_bf16_block<4>(X, K, W, ldw, R, Y, t0, o0, o1);
  for (; t0 + 2 <= T; t0 += 2) gemv_bf16_block<2>(X, K, W, ldw, R, Y, t0, o0, o1);
  if (t0 < T) gemv_bf16_block<1>(X, K, W, ldw, R, Y, t0, o0, o1);
}
void gemv_bf16(const uint16_t* X, int64_t T, int64_t K, const uint16_t* W, int64_t ldw, int64_t R, float* Y) {
  at::parallel_for(0, R, 16, [&](int64_t o0, int64_t o1) { gemv_bf16_rows(X, T, K, W, ldw, R, Y, o0, o1); });
}
#endif

void linear_bf16(const uint16_t* X, int64_t T, int64_t K, const uint16_t* W, int64_t ldw, int64_t R, float* Y) {
  const int64_t kp = (K + 1) / 2;
#if defined(__x86_64__)
  if (T <= kGemvRows && __builtin_cpu_supports("avx512bf16")) {
    gemv_bf16(X, T, K, W, ldw, R, Y);
    return;
  }
#endif
  if (T <= 64) {
    std::vector<uint32_t> xp(static_cast<size_t>(kp * 64));
    pack_vnni(true, K, T, X, K, xp.data());
    const int64_t mb = 64, tasks = (R + mb - 1) / mb;
    const int64_t nt = (T + 15) / 16 * 16;  // (x's columns past T are 0 in the panel: no cost in 16-lane kernels)
    at::parallel_for(0, tasks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float>& c = bf16_operands().c;
      if (c.size() < static_cast<size_t>(mb * 64)) c.resize(mb * 64);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * mb, m = std::min(mb, R - r0);
        brgemm_bf16(m, nt, K, ldw, 64, 64, false, W + r0 * ldw, xp.data(), c.data());
        for (int64_t t = 0; t < T; ++t)
          for (int64_t i = 0; i < m; ++i) Y[t * R + r0 + i] = c[i * 64 + t];
      }
      at::native::cpublas::brgemm_release(true);
    });
    return;
  }
  const int64_t panels = (R + 63) / 64, mb = 128;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint32_t>& wp = bf16_operands().b;
    if (wp.size() < static_cast<size_t>(kp * 64)) wp.resize(kp * 64);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * 64, nc = std::min<int64_t>(64, R - c0);
      pack_vnni(true, K, nc, W + c0 * ldw, ldw, wp.data());
      for (int64_t k0 = 0; k0 < K; k0 += kLinearKc) {
        const int64_t kk = std::min(kLinearKc, K - k0);
        for (int64_t t0 = 0, m = mb; t0 < T; t0 += m) {
          while (m > T - t0) m /= 2;  // (blocks of 128 rows, then 64, 32, .., 1)
          brgemm_bf16(m, nc, kk, K, 64, R, k0 > 0, X + t0 * K + k0, wp.data() + k0 / 2 * 64, Y + t0 * R + c0);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

}  // namespace
}  // namespace ftattn
