// Fault-tolerant attention, CPU kernel.
//
// Algorithm: flash-attention forward (Dao et al. 2022, online softmax) tiled
// BLOCK_M = 256 query rows x BLOCK_N = 512 keys, parallel over batch x head x
// query tile (handed out from a shared counter), no N x M score matrix (extra
// memory O(M D) for fp32 copies of non-fp32 inputs and the per-key sums of the
// checks; those sums are made per key tile inside the block when a head has one
// query tile, as in decoding). The two products run on the BLAS sgemm that torch
// links (MKL on x86); the element-wise work walks the tile one row at a time (in L1)
// in 16-lane vector code, cloned per ISA (target_clones).
//
// Checks (FAULT_MODEL.md), all on fp32 values the kernel actually uses, compared
// against an independent formulation (sums in fp32 partials of at most 32 terms
// flushed to fp64), with thresholds that scale with the data:
//   ABFT on S = Q K^T, per tile: row sums vs q_i . sum_j k_j (fp64 reference; bound
//     kappa * u * sqrt(D) * sum |q||k|), column sums per 64-row block vs
//     (sum_i q_i) . k_j, which the QK^T GEMM makes from extra query rows (a bound per
//     key from the rows' per-dim sums of squares and sum_i |S_ij|: ColumnBound).
//   Score verification: the keys probable enough for a fault within the column bound
//     to matter get q_i . k_j recomputed in fp64 (scores_mismatch).
//   ABFT on P V, per group of 64 head dims: c_ig <- alpha_i c_ig + sum_j p_ij vsum_jg
//     (same alpha, same p as the accumulator), compared with sum_{d in g} acc_id
//     before the division. Per group, so that the bound, which grows with the
//     dims summed, stays below the harm one accumulator element can do at D = 256.
//   Invariants: m == max(m_old, rowmax) exactly, 0 <= p <= 1, max_j p == 1 or
//     alpha == 1; l vs an independent accumulation of the same p, 1 <= l <= #keys.
//   Redundant softmax ("full"): exp2 formulation with its own polynomial, of the
//     same rounded argument, compared with the exp path within the error bound of both.
//   Every bound has an absolute term for underflow (ETA).
//   Final normalisation: sum_d O_id vs (sum_d acc_id) / l.
// Flags are per 64-row block (REPORT_BLOCK_M). A failed check makes the kernel
// recompute the query tile (transient faults do not repeat); NaN/Inf in the
// inputs is reported as such, not as a fault.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "fault_contract.h"  // sites, check bits, the fault encoding (ftattn/contract.py)
#include "vec.h"  // FTATTN_CLONES, the 16-lane vector types and their reductions

extern "C" {
// Fortran BLAS entry point; torch's CPU library exports it (MKL or OpenBLAS).
// Weak, so a torch without it falls back to at::mm.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace ftattn {
namespace {


// Query rows per tile: 256, as torch's CPU flash attention, so each packed K tile
// serves 256 rows. Checks and flags are kept per sub-block of SUB_M = 64 rows
// (REPORT_BLOCK_M of the flags contract); a failed check recomputes the tile.
constexpr int64_t BLOCK_M = 256;
constexpr int64_t SUB_M = 64;
static_assert(SUB_M == kReportBlockM, "a sub-block of the checks is a report block");
constexpr int64_t NSUB = BLOCK_M / SUB_M;
// Grouped-query attention with few query rows (decode): the query heads of one key
// head are stacked into one block, up to MAX_STACK heads of N <= SUB_M rows each, so
// that each K and V tile is read once for all of them; each head's rows are then
// one sub-block of the checks and flags. Sub-blocks per block: at most NSUB_MAX.
constexpr int64_t MAX_STACK = 16;
constexpr int64_t NSUB_MAX = NSUB > MAX_STACK ? NSUB : MAX_STACK;
// A stacked block (decode) runs its two products as sums of GEMMs over slices of
// STACK_D_SLICE head dims (S = Q K^T) and of STACK_KEY_SLICE keys (acc += P V).
// A BLAS GEMM kernel accumulates each element over the whole inner dimension in one
// register, while torch's one-row attention runs matrix-vector products with several
// partial sums; the stacked block was then less accurate than torch by 1.5x (D = 40)
// to 2.2x (D = 128) in S (rms relative error 1.9u vs 1.3u at D = 40) and 1.4x in P V
// (97 keys: 3.0u vs 2.2u), enough for the output to exceed 2x torch's error on one
// seed in five at D = 128 and on AMD's BLAS path at D = 40. Slices bring S to 1.33u at
// D = 40, 1.55u at D = 128 (gemv: 1.30u, 1.52u) and P V to 1.9u (97 keys) and 2.1u
// (512 keys; gemv 4.9u). Decode reads K and V once per block either way; the extra
// calls cost 0-5 % (B=4 Hq=8 Hkv=2 D=128 N=1 fp32, M = 512 / 4096 / 32768, 2 threads).
constexpr int64_t STACK_D_SLICE = 16;
constexpr int64_t STACK_KEY_SLICE = 32;
// Keys per tile: 512 (as torch's CPU flash attention); the element-wise work walks S
// and P one row (2 KiB) at a time, so it runs from L1.
constexpr int64_t BLOCK_N = 512;

// Head dims per PV-checksum group: at most 4 groups for D <= 256.
constexpr int64_t PV_GROUP = 64;
constexpr int MAX_GROUPS = 4;

constexpr double U32 = 5.9604644775390625e-08;  // 2^-24, unit roundoff of fp32
// Statistical thresholds: kappa standard deviations of the rounding noise.
// kappa = 8 left no alarm over the clean-run grid of tests/test_attention_cpu.py
// (uniform, normal, |q.k| up to 1e4, constant rows, M up to 4096).
constexpr double KAPPA = 8.0;
constexpr float LOG2E = 1.4426950408889634f;  // 1 / ln(2)
// Underflow: fl(x op y) = (x op y)(1 + d) + e with |d| <= u and |e| <= 2^-150 in fp32
// (Higham, Accuracy and Stability of Numerical Algorithms, 2.8; no flush to zero). The
// relative bounds above cover d; ETA, two e (a multiply-add), per operation is each
// bound's absolute term. Without it, subnormal keys or values (k * 1e-39, v * 1e-40)
// failed the column-checksum, PV and final-normalisation checks on clean input.
constexpr double ETA = 0x1p-149;

// ---------------------------------------------------------------------------
// Element-wise math. Two exponentials with different reductions and different
// polynomials, so the redundant softmax cannot be merged with the first one.


// Both exponentials are branch-free and written once for a float and for 16 lanes.
// Rounding by adding C = 1.5 * 2^23 + 127 leaves n + 127 in the low mantissa bits of
// the sum, so shifting its bits left by 23 gives 2^n with no float-to-int
// conversion; the argument is clamped where n + 127 reaches 0, and the result there
// is 0 (or a value below 2^-125, far inside every tolerance).
constexpr float ROUND_C = 12583039.0f;  // 1.5 * 2^23 + 127

FTATTN_VEC_INLINE float pow2_bits(float t) {  // 2^n from t = n + ROUND_C
  uint32_t u;
  std::memcpy(&u, &t, sizeof(u));
  u <<= 23;
  float r;
  std::memcpy(&r, &u, sizeof(r));
  return r;
}
FTATTN_VEC_INLINE vec::f16 pow2_bits(vec::f16 t) {
  return reinterpret_cast<vec::f16>(reinterpret_cast<vec::u16>(t) << 23);
}

// exp(x) for x <= 0 (x = (S - max) * scale) as 2^(x log2 e): n = round(x log2 e),
// f = x log2 e - n in one multiply-add, and the Cephes exp2f minimax polynomial for
// 2^f (about 1 ulp); 0 below -88. Against a Cody-Waite reduction by ln 2 with the
// expf polynomial, three operations fewer per element; the rounding of log2 e adds
// u|x|/2 to the argument, nothing where p is large enough to count (|x| small).
// exp(0) == 1 exactly, which the invariants rely on.
template <typename T>
FTATTN_VEC_INLINE T exp_neg(T x) {
  const T lo = T{} - 88.0f;
  x = x < lo ? lo : x;  // NaN passes through
  const T t = x * LOG2E + ROUND_C;
  const T n = t - ROUND_C;
  const T f = x * LOG2E - n;
  T p = T{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  return p * pow2_bits(t);
}

// 2^y for y <= 0: y = n + f with f in [-1/2, 1/2] and a degree-4 polynomial for
// 2^f with p(0) = 1, fitted here for least maximum relative error (2.9e-6, 49 ulp,
// in fp32 arithmetic: the redundant softmax's only use, whose bound allows for it;
// two multiply-adds fewer than a 1-ulp one); 0 below -127.
template <typename T>
FTATTN_VEC_INLINE T exp2_neg(T y) {
  const T lo = T{} - 127.0f;
  y = y < lo ? lo : y;
  const T t = y + ROUND_C;
  const T f = y - (t - ROUND_C);
  T p = T{} + 9.5828203484416e-3f;
  p = p * f + 5.590633675456047e-2f;
  p = p * f + 2.4024099111557007e-1f;
  p = p * f + 6.931241750717163e-1f;
  p = p * f + 1.0f;
  return p * pow2_bits(t);
}

// Keep the compiler from assuming a value is what it just computed, so a check
// after an injection point (or a real upset) re-reads it.
static inline void opaque(float& x) { asm volatile("" : "+m"(x)); }
static inline void memory_barrier() { asm volatile("" ::: "memory"); }

static inline float corrupt(float x, int64_t bit, double value) {
  if (bit < 0) return static_cast<float>(value);
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u ^= (1u << bit);
  std::memcpy(&x, &u, sizeof(u));
  return x;
}

// ---------------------------------------------------------------------------
// Vectorised row kernels (one clone per ISA), written with explicit 16-lane vectors
// (GCC vector extensions, lowered to whatever the clone's ISA has). The ABFT sums are
// fp32 partial sums of at most CHUNK terms per lane, flushed into fp64 accumulators. Each partial sum is within
// gamma_CHUNK ~ CHUNK u of the exact one relative to the sum of magnitudes, and
// the fp64 part adds nothing of note, so the bounds of the checks grow by CHUNK u
// (vs fp64 throughout, which costs two conversions per vector and does not
// vectorise fused with fp32 work).
namespace vec {
using namespace ::ftattn::vec;  // vec.h
constexpr int64_t W = 16;
// vectors (per-lane terms) per fp32 partial sum: one partial per lane per row of a
// tile, flushed to fp64 once per row (flushing every 8 cost ~5 instructions per
// vector of the softmax loop)
constexpr int64_t CHUNK = BLOCK_N / W;
constexpr int64_t ROW_CHUNK = 32;  // rows per fp32 partial column sum
// sum of 16 fp32 lanes into 8 fp64 lanes (pairs added in fp64)
FTATTN_VEC_INLINE d8 widen_sum(f16 x) {
  f8 a, b;
  halves(x, a, b);
  return __builtin_convertvector(a, d8) + __builtin_convertvector(b, d8);
}
}  // namespace vec

// The maximum of the raw scores S_j over the visible keys (j <= limit). Scores
// are scaled later, as (S_j - max) * scale, so the argmax gives exp(0) == 1 exactly
// and no scaled copy of the row is stored (scale >= 0; the caller flips the sign of
// q for a negative one). A NaN score does not enter the max (it makes its p NaN,
// and so the row sum and the output); a row whose visible scores are all NaN
// returns NaN, so that it cannot be taken for a row with no visible key. SUMS adds
// the ABFT sums of the raw scores, from the same loads: the row sum
// *rs = sum_j S_j and the column partial sums cs32[j] += S_j and ca32[j] += |S_j| (fp32,
// flushed to fp64 by flush_cols every ROW_CHUNK rows), over every column of the tile.
template <bool SUMS>
FTATTN_VEC_INLINE float row_max_body(const float* __restrict S, int64_t n, int64_t limit, double* __restrict rs,
                                     float* __restrict cs32, float* __restrict ca32) {
  using namespace vec;
  const int64_t visible = std::min<int64_t>(n, std::max<int64_t>(limit + 1, 0));
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  f16 mxv = f16{} + NEG_INF;
  d8 racc = d8{};
  double rtail = 0.0;
  float mx = NEG_INF;
  int64_t j = 0;
  // whole vectors of visible keys, CHUNK at a time per partial sum
  while (j + W <= visible) {
    f16 part = f16{};
    for (int64_t c = 0; c < CHUNK && j + W <= visible; ++c, j += W) {
      const f16 x = load(S + j);
      mxv = x > mxv ? x : mxv;
      if constexpr (SUMS) {
        part += x;
        store(cs32 + j, load(cs32 + j) + x);
        store(ca32 + j, load(ca32 + j) + vec::abs(x));
      }
    }
    if constexpr (SUMS) racc += widen_sum(part);
  }
  for (; j < visible; ++j) {
    const float x = S[j];
    mx = x > mx ? x : mx;
    if constexpr (SUMS) {
      rtail += static_cast<double>(x);
      cs32[j] += x;
      ca32[j] += std::fabs(x);
    }
  }
  // masked keys: still in the sums (the references cover the whole tile)
  if constexpr (SUMS) {
    while (j + W <= n) {
      f16 part = f16{};
      for (int64_t c = 0; c < CHUNK && j + W <= n; ++c, j += W) {
        const f16 x = load(S + j);
        part += x;
        store(cs32 + j, load(cs32 + j) + x);
        store(ca32 + j, load(ca32 + j) + vec::abs(x));
      }
      racc += widen_sum(part);
    }
    for (; j < n; ++j) {
      rtail += static_cast<double>(S[j]);
      cs32[j] += S[j];
      ca32[j] += std::fabs(S[j]);
    }
    *rs = hsum(racc) + rtail;
  }
  const float vmx = hmax(mxv);  // (NaN never enters a lane)
  mx = vmx > mx ? vmx : mx;
  if (mx == NEG_INF) {  // rare: every visible score -inf or NaN
    for (int64_t t = 0; t < visible; ++t)
      if (S[t] != S[t]) return std::numeric_limits<float>::quiet_NaN();
  }
  return mx;
}

FTATTN_CLONES static float row_max(const float* __restrict S, int64_t n, int64_t limit) {
  return row_max_body<false>(S, n, limit, nullptr, nullptr, nullptr);
}

FTATTN_CLONES static float row_max_sums(const float* __restrict S, int64_t n, int64_t limit, double* __restrict rs,
                                        float* __restrict cs32, float* __restrict ca32) {
  return row_max_body<true>(S, n, limit, rs, cs32, ca32);
}

// true when some |cs_j - ref_j| > colb_j (or is NaN): the column check.
FTATTN_CLONES static bool col_check_fails(const double* __restrict cs, const float* __restrict ref,
                                          const double* __restrict colb, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) bad |= !(std::fabs(cs[j] - static_cast<double>(ref[j])) <= colb[j]);
  return bad != 0;
}

// Score verification. A fault that moves S_ij by d changes the output row by at most
// p^_ij (e^{|d| scale} - 1) (|v_j|_inf + |O_i|_inf), where p^_ij <= p_ij / l_i (p relative
// to the running max, l the running normaliser after this tile: the final max and l only
// scale both alike), and the column check sees every |d| > 2 colb_j. So a fault the
// checksums miss stays below TAU_VERIFY max(1, |O_i|) unless p_ij / l_i >= theta_j =
// TAU_VERIFY / ((|v_j|_inf + 1) (e^{2 colb_j scale} - 1)); for those keys S_ij is
// recomputed in fp64 (products exact) and must agree within KAPPA sqrt(D) u
// (||q_i o k_j||_2 + |S_ij|): the fp32 GEMM's rounding noise per score, at most 3.6 sqrt(D)
// u ||q_i o k_j||_2 over zero-mean normal and outlier-channel data (D 64..256, x1..x150),
// and the drift of partial sums whose products share a sign (sum_t |partial_t| ~ D |S| / 2,
// e.g. constant rows: ~sqrt(D / 3) |S| in quadrature). Few keys qualify: 0-1 per row on
// normal or uniform data, up to ~17 on data with outlier channels (whose softmax is
// peaked). TAU_VERIFY: a quarter of the smallest harm threshold of FAULT_MODEL.md (2^-10).
constexpr double TAU_VERIFY = 0x1p-12;
// The column check's bound for key j of a sub-block of n rows. Per score, the fp32 GEMM
// leaves at most noise (||q_i o k_j||_2 + |S_ij|), noise = KAPPA sqrt(D) u (see
// scores_mismatch); summed over the rows, sum_i ||q_i o k_j||_2 <= sqrt(n sum_i ||q_i o
// k_j||^2) <= sqrt(n max_d sum_i q_id^2) ||k_j|| (linear in the rows, so identical rows,
// whose errors add up, stay inside) and sum_i |S_ij| = ca_j, the column sum of |S|; the
// reference row (sum_i q_i) . k_j likewise, with ||(sum q) o k_j|| <= max_d |sum_i q_id|
// ||k_j||; the fp32 partial sums over ROW_CHUNK rows add ROW_CHUNK u ca_j. On normal
// data, D = 64, 64 rows: ~6x below the former kappa u sqrt(D) || sum_i |q_i| || ||k_j||
// (which bounded the sum over rows by Cauchy-Schwarz on absolute values).
struct ColumnBound {
  double noise;  // KAPPA sqrt(D) u
  double rows;   // sqrt(n max_d sum_i q_id^2)
  double ref;    // max_d |sum_i q_id|
  double abs;    // underflow
};

// theta for a column bound colb and |v_j|_inf (see TAU_VERIFY).
static float verify_threshold(double colb, float vmax, float scale) {
  const double x = 2.0 * colb * static_cast<double>(scale);
  const double grow = x <= 0.5 ? x * (1.0 + x) : std::exp(x);
  const double t = TAU_VERIFY / ((static_cast<double>(vmax) + 1.0) * grow);
  // (inf where no score change the check misses can matter; NaN bounds verify every key)
  return t == t ? static_cast<float>(t < 3.0e38 ? t : 3.0e38) : 0.f;
}

// Each key's column bound colb_j and verification threshold theta_j; returns the
// smallest theta_j: a row whose largest p is below it times l has no key to verify
// (most rows). e^x - 1 <= x (1 + x) for x <= 1/2 (and <= e^x): a smaller theta, more
// keys verified, never fewer.
FTATTN_CLONES static float column_bounds(const ColumnBound& cb, const double* __restrict knorm,
                                         const double* __restrict ca, const float* __restrict ref,
                                         const float* __restrict vmax, float scale, int64_t n,
                                         double* __restrict colb, float* __restrict theta) {
  const double chunk = vec::ROW_CHUNK * U32;
  const double s2 = 2.0 * static_cast<double>(scale);
  // theta_j as verify_threshold, vectorised for x = 2 colb_j scale <= 1/2 (no exp),
  // then exactly verify_threshold's for every key when some x is larger
  double xmax = 0.0;
#pragma omp simd reduction(max : xmax)
  for (int64_t j = 0; j < n; ++j) {
    const double a = ca[j] * (1.0 + 0x1p-10);
    colb[j] = cb.noise * ((cb.rows + cb.ref) * knorm[j] + a + std::fabs(static_cast<double>(ref[j]))) +
              chunk * a + cb.abs;
    const double x = colb[j] * s2;
    xmax = x > xmax ? x : xmax;  // (a NaN x gives theta 0 both ways)
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const double x = colb[j] * s2;
    const double t = TAU_VERIFY / ((static_cast<double>(vmax[j]) + 1.0) * (x * (1.0 + x)));
    const double c = t < 3.0e38 ? t : 3.0e38;
    theta[j] = static_cast<float>(t == t ? c : 0.0);
  }
  float low = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : low)
  for (int64_t j = 0; j < n; ++j) low = theta[j] < low ? theta[j] : low;
  if (!(xmax <= 0.5)) {
    low = std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      theta[j] = verify_threshold(colb[j], vmax[j], scale);
      low = theta[j] < low ? theta[j] : low;
    }
  }
  return low;
}

// true when a key with p_j >= theta_j l has a score S_j that disagrees with q . k_j
// recomputed in fp64 (keys j < n: the visible ones of the tile).
FTATTN_CLONES static bool scores_mismatch(const float* __restrict q, const float* __restrict K, int64_t D,
                                          const float* __restrict S, const float* __restrict p,
                                          const float* __restrict theta, float l, int64_t n) {
  using namespace vec;
  const double noise = KAPPA * std::sqrt(static_cast<double>(D)) * U32;
  const double floor = ETA * static_cast<double>(D + 1);
  // candidates p_j >= theta_j l, a vector at a time (most vectors have none; a NaN p
  // is the probability-range check's, as elsewhere)
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) {
    if (j % W == 0 && j + W <= n) {
      const i16 hit = load(p + j) >= load(theta + j) * l;  // (a compare: no fused multiply-add)
      if (!(hmax(reinterpret_cast<f16>(reinterpret_cast<u16>(hit) & 0x3f800000u)) > 0.f)) {
        j += W - 1;
        continue;
      }
    }
    if (!(p[j] >= theta[j] * l)) continue;
    const float* k = K + j * D;
    double s = 0.0, n2 = 0.0;
#pragma omp simd reduction(+ : s, n2)
    for (int64_t d = 0; d < D; ++d) {
      const double x = static_cast<double>(q[d]) * static_cast<double>(k[d]);
      s += x;
      n2 += x * x;
    }
    bad |= !(std::fabs(static_cast<double>(S[j]) - s) <= noise * (std::sqrt(n2) + std::fabs(s)) + floor);
  }
  return bad;
}

// cs[j] += cs32[j], ca[j] += ca32[j] in fp64, cs32[j] = ca32[j] = 0: ends a ROW_CHUNK of
// rows of column sums.
FTATTN_CLONES static void flush_cols(float* __restrict cs32, double* __restrict cs, float* __restrict ca32,
                                     double* __restrict ca, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    cs[j] += static_cast<double>(cs32[j]);
    ca[j] += static_cast<double>(ca32[j]);
    cs32[j] = ca32[j] = 0.f;
  }
}

// Where a probs fault lands in one row (col < 0: none).
struct RowFault {
  int64_t col = -1, bit = -1;
  double value = 0.0;
};

// What one row of the online softmax gives: the fp32 row sum of p (the normaliser
// update) and, for the checks, max p and min p, the independent sums sum_j p_j and,
// per group g of head dims, sum_j p_j a_gj and sum_j p_j b_gj (fp32 partials of CHUNK
// vectors flushed to fp64; a, b: fp32 copies of the per-key, per-group sums of V and
// of |V|, so each product carries one more rounding), and whether the redundant
// softmax disagreed.
struct RowStats {
  float psum = 0.f, pmax = 0.f, pmin = 1.f;
  double ws = 0.0, wa[MAX_GROUPS] = {}, wb[MAX_GROUPS] = {};
  bool dmr_bad = false;
};

// One row of the online softmax: p_j = exp((S_j - mr) * scale) for the visible keys
// (j <= limit), 0 for the masked ones, written to p, and its RowStats, in one pass
// with p in registers (mr: the running max of the raw scores, scale >= 0).
// PROT 0 gives only psum; PROT >= 1 the statistics of the checks;
// PROT 2 adds the redundant softmax, p2 = 2^((S - mr) * scale*log2e) from the same raw
// scores, compared with p within the error bound of both formulations (masked keys
// must have p == 0). The difference S - mr is rounded once for both; after it, with
// x = (S - mr) * scale <= 0, the argument of p carries 1.2u|x| (the product, log2 e's
// rounding), that of p2 2.3u|x| (scale*log2e and the product rounded), together below
// 5u|x| in p; the polynomial of exp about 1 ulp, that of exp2 49, their rounding 2
// more, so |p - p2| <= u (64 + 5|x|) max(p, p2) <= u (64 max(p, p2) + 2), since
// |x| e^x <= 1/e: one multiply-add per element instead of the exact bound. (p2 as
// 2^(S * scale*log2e - mr*scale*log2e) carried u|mr * scale| more: at logits above ~1e6
// that exceeded p itself and the check fired on clean input, and from |mr * scale| ~ 1e4
// its tolerance passed changes of p that harm the output.)
// |p - p2| <= r max(p, p2) is |p - p2| <= r / (1 - r) p2, so the loop keeps the
// largest |p - p2| - r / (1 - r) p2 and compares it once with the absolute term.
// psum adds the lanes in a fixed order, the same at every level, so off, abft and
// full round l (and the output) alike. INJECT hits p_{fault.col} after the
// exponential, before anything reads it. NG groups, the g-th at a + g * gs, b + g * gs.
template <int PROT, bool INJECT, int NG>
__attribute__((always_inline)) static inline void softmax_row_body(const float* __restrict S, float* __restrict p,
                                                                   int64_t n, int64_t limit, float scale, float mr,
                                                                   const float* __restrict a,
                                                                   const float* __restrict b, int64_t gs,
                                                                   const RowFault& fault, RowStats& st) {
  using namespace vec;
  const int64_t visible = std::min<int64_t>(n, std::max<int64_t>(limit + 1, 0));
  const float scale2 = scale * LOG2E;
  const float rel = 5.9604645e-08f * 64.f, abs_tol = 5.9604645e-08f * 2.f + 1e-30f;
  const float rel2 = rel / (1.f - rel) * (1.f + 2.4e-7f);  // rounded up
  f16 psum_v = f16{}, mx_v = f16{}, mn_v = f16{} + 1.f, viol_v = f16{};
  d8 s_acc = d8{}, a_acc[NG], b_acc[NG];
  for (int g = 0; g < NG; ++g) a_acc[g] = b_acc[g] = d8{};
  int64_t j = 0;
  while (j + W <= visible) {
    f16 sp = f16{}, ap[NG], bp[NG];
    for (int g = 0; g < NG; ++g) ap[g] = bp[g] = f16{};
    for (int64_t c = 0; c < CHUNK && j + W <= visible; ++c, j += W) {
      const f16 sv = load(S + j);
      f16 pv = exp_neg((sv - mr) * scale);
      if constexpr (INJECT) {
        if (fault.col >= j && fault.col < j + W) pv[fault.col - j] = corrupt(pv[fault.col - j], fault.bit, fault.value);
      }
      store(p + j, pv);
      psum_v += pv;
      if constexpr (PROT >= 1) {
        mx_v = pv > mx_v ? pv : mx_v;
        mn_v = pv < mn_v ? pv : mn_v;
        sp += pv;
        for (int g = 0; g < NG; ++g) {
          ap[g] += pv * load(a + g * gs + j);
          bp[g] += pv * load(b + g * gs + j);
        }
      }
      if constexpr (PROT >= 2) {
        const f16 p2 = exp2_neg((sv - mr) * scale2);
        const f16 d = vec::abs(pv - p2) - rel2 * p2;
        viol_v = d > viol_v ? d : viol_v;
      }
    }
    if constexpr (PROT >= 1) {
      s_acc += widen_sum(sp);
      for (int g = 0; g < NG; ++g) {
        a_acc[g] += widen_sum(ap[g]);
        b_acc[g] += widen_sum(bp[g]);
      }
    }
  }
  // the rest, one element at a time: the visible tail, then the masked keys
  float psum_t = 0.f, mx = 0.f, mn = 1.f, viol = 0.f;
  double s_t = 0.0, a_t[NG] = {}, b_t[NG] = {};
  int masked_bad = 0;
  // (masked keys are walked only under injection; else they are a fill of zeros,
  // which cannot compute anything wrong)
  const int64_t tail_end = INJECT ? n : visible;
  for (; j < tail_end; ++j) {
    const bool vis = j < visible;
    float pj = vis ? exp_neg((S[j] - mr) * scale) : 0.f;
    if constexpr (INJECT) {
      if (j == fault.col) pj = corrupt(pj, fault.bit, fault.value);
    }
    p[j] = pj;
    psum_t += pj;
    if constexpr (PROT >= 1) {
      mx = pj > mx ? pj : mx;
      mn = pj < mn ? pj : mn;
      const double x = static_cast<double>(pj);
      s_t += x;
      for (int g = 0; g < NG; ++g) {
        a_t[g] += x * a[g * gs + j];
        b_t[g] += x * b[g * gs + j];
      }
    }
    if constexpr (PROT >= 2) {
      if (vis) {
        const float p2 = exp2_neg((S[j] - mr) * scale2);
        const float d = std::fabs(pj - p2) - rel2 * p2;
        viol = d > viol ? d : viol;
      } else {
        masked_bad |= !(pj == 0.f);
      }
    }
  }
  if (j < n) {
    std::fill(p + j, p + n, 0.f);
    mn = 0.f;
  }
  st.psum = hsum(psum_v) + psum_t;
  if constexpr (PROT >= 1) {
    const float vmx = hmax(mx_v), vmn = hmin(mn_v);  // (NaN never enters a lane)
    st.pmax = vmx > mx ? vmx : mx;
    st.pmin = vmn < mn ? vmn : mn;
    st.ws = vec::hsum(s_acc) + s_t;
    for (int g = 0; g < NG; ++g) {
      st.wa[g] = vec::hsum(a_acc[g]) + a_t[g];
      st.wb[g] = vec::hsum(b_acc[g]) + b_t[g];
    }
  }
  if constexpr (PROT >= 2) {
    const float vviol = hmax(viol_v);
    viol = vviol > viol ? vviol : viol;
    // NaN in p or p2 passes the max; a NaN p makes the row sum non-finite, which
    // the probs-range check reports
    st.dmr_bad = !(viol <= abs_tol) || masked_bad;
  }
}

// One clone set per variant (the template body is inlined into each).
#define FTATTN_SOFTMAX_ROW(name, PROT, INJECT, NG)                                                            \
  FTATTN_CLONES static void name(const float* __restrict S, float* __restrict p, int64_t n, int64_t limit,   \
                                 float scale, float m, const float* __restrict a, const float* __restrict b, \
                                 int64_t gs, const RowFault& fault, RowStats& st) {                          \
    softmax_row_body<PROT, INJECT, NG>(S, p, n, limit, scale, m, a, b, gs, fault, st);                      \
  }
#define FTATTN_SOFTMAX_ROWS(PROT, INJECT, suffix)                 \
  FTATTN_SOFTMAX_ROW(softmax_row_##suffix##1, PROT, INJECT, 1)    \
  FTATTN_SOFTMAX_ROW(softmax_row_##suffix##2, PROT, INJECT, 2)    \
  FTATTN_SOFTMAX_ROW(softmax_row_##suffix##3, PROT, INJECT, 3)    \
  FTATTN_SOFTMAX_ROW(softmax_row_##suffix##4, PROT, INJECT, 4)
FTATTN_SOFTMAX_ROW(softmax_row_off, 0, false, 1)
FTATTN_SOFTMAX_ROW(softmax_row_off_inject, 0, true, 1)
FTATTN_SOFTMAX_ROWS(1, false, abft)
FTATTN_SOFTMAX_ROWS(2, false, full)
FTATTN_SOFTMAX_ROWS(1, true, abft_inject)
FTATTN_SOFTMAX_ROWS(2, true, full_inject)
#undef FTATTN_SOFTMAX_ROWS
#undef FTATTN_SOFTMAX_ROW

using SoftmaxRowFn = void (*)(const float*, float*, int64_t, int64_t, float, float, const float*, const float*,
                              int64_t, const RowFault&, RowStats&);

// The variant for a protection level, injection or not, and the number of groups.
static SoftmaxRowFn softmax_row_fn(int protection, bool inject, int groups) {
  if (protection == 0) return inject ? softmax_row_off_inject : softmax_row_off;
  static const SoftmaxRowFn table[2][2][MAX_GROUPS] = {
      {{softmax_row_abft1, softmax_row_abft2, softmax_row_abft3, softmax_row_abft4},
       {softmax_row_full1, softmax_row_full2, softmax_row_full3, softmax_row_full4}},
      {{softmax_row_abft_inject1, softmax_row_abft_inject2, softmax_row_abft_inject3, softmax_row_abft_inject4},
       {softmax_row_full_inject1, softmax_row_full_inject2, softmax_row_full_inject3, softmax_row_full_inject4}}};
  return table[inject ? 1 : 0][protection - 1][groups - 1];
}

// For rows x_i of X [n x D] (fp32): ref[i * ld + t] = x_i . y_t and
// mag[i * ld + t] = |x_i| . yabs_t for t < nt, with y, yabs [nt x D] fp64.
FTATTN_CLONES static void dots_d(const float* __restrict X, int64_t n, int64_t D, const double* __restrict y,
                                 const double* __restrict yabs, int64_t nt, int64_t ld, double* __restrict ref,
                                 double* __restrict mag) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = X + i * D;
    for (int64_t t = 0; t < nt; ++t) {
      const double* yt = y + t * D;
      const double* at = yabs + t * D;
      double s = 0.0, a = 0.0;
#pragma omp simd reduction(+ : s, a)
      for (int64_t d = 0; d < D; ++d) {
        const double x = static_cast<double>(xi[d]);
        s += x * yt[d];
        a += std::fabs(x) * at[d];
      }
      ref[i * ld + t] = s;
      mag[i * ld + t] = a;
    }
  }
}

FTATTN_CLONES static double sum_d(const float* __restrict x, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]);
  return s;
}

FTATTN_CLONES static double sum_abs_d(const float* __restrict x, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += std::fabs(static_cast<double>(x[i]));
  return s;
}

FTATTN_CLONES static void scale_row(float* __restrict x, int64_t n, float alpha) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

FTATTN_CLONES static void add_d(double* __restrict acc, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<double>(x[i]);
}

FTATTN_CLONES static void add_abs_d(double* __restrict acc, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += std::fabs(static_cast<double>(x[i]));
}

FTATTN_CLONES static void add_sq_d(double* __restrict acc, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
}

FTATTN_CLONES static bool all_finite(const float* __restrict x, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= !std::isfinite(x[i]);
  return !bad;
}

// For n keys and values: ks += sum_j k_j, ka += sum_j |k_j| (fp64, [D]), and per key
// knorm_j >= ||k_j||_2 and, per group g of PV_GROUP head dims, vsum[g * gs + j] =
// sum_{d in g} v_jd and vabs[g * gs + j] = sum_{d in g} |v_jd|, in 16-lane fp32
// vector code (for decoding, where each key serves one query row, these sums were
// the largest part of a call in fp64). ks and ka: fp32 partials of KV_CHUNK keys per
// dim, flushed to fp64 (within KV_CHUNK u of the exact sums relative to ka, which the
// row check's bound adds). vsum and vabs: at most 5 terms per lane (a group is 4
// whole vectors and a zero-padded tail) and a tree of 4 levels, so within 9 u of the
// exact sums relative to vabs (the PV bound adds 10 u). knorm: the fp32 square root of
// an fp32 sum of squares, within about 12 + D / 16 u, raised by 2^-15 to stay above
// the true norm it scales a bound with, plus sqrt(D) 2^-74 for the squares lost to
// underflow (each square loses at most 2^-149: sum |k_d|^2 <= sq + D 2^-148).
constexpr int64_t KV_CHUNK = 8;
constexpr int64_t KV_PREFETCH = 16;
FTATTN_CLONES static void key_value_sums(const float* __restrict K, const float* __restrict V, int64_t n, int64_t D,
                                         double* __restrict ks, double* __restrict ka, double* __restrict knorm,
                                         float* __restrict vsum, float* __restrict vabs, float* __restrict vmax,
                                         int64_t gs) {
  using namespace vec;
  alignas(64) float ks32[256 + W], ka32[256 + W], tail[W];
  const int64_t Dv = (D / W) * W;  // dims in whole vectors
  const double sqrt_d_floor = std::sqrt(static_cast<double>(D)) * 0x1p-74;
  std::fill(ks32, ks32 + D, 0.f);
  std::fill(ka32, ka32 + D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = K + j * D;
    const float* vj = V + j * D;
    if (j + KV_PREFETCH < n)  // the first pass over the tile when decoding: fetch ahead
      for (int64_t d = 0; d < D; d += 64 / sizeof(float)) {  // one 64-byte line at a time
        __builtin_prefetch(kj + KV_PREFETCH * D + d);
        __builtin_prefetch(vj + KV_PREFETCH * D + d);
      }
    f16 sq = f16{};
    float sq_t = 0.f;
    for (int64_t d = 0; d < Dv; d += W) {
      const f16 x = load(kj + d);
      store(ks32 + d, load(ks32 + d) + x);
      store(ka32 + d, load(ka32 + d) + vec::abs(x));
      sq += x * x;
    }
    for (int64_t d = Dv; d < D; ++d) {
      const float x = kj[d];
      ks32[d] += x;
      ka32[d] += std::fabs(x);
      sq_t += x * x;
    }
    knorm[j] = static_cast<double>(std::sqrt(hsum(sq) + sq_t)) * (1.0 + 0x1p-15) + sqrt_d_floor;
    if ((j + 1) % KV_CHUNK == 0 || j == n - 1) {
      for (int64_t d = 0; d < D; ++d) {
        ks[d] += static_cast<double>(ks32[d]);
        ka[d] += static_cast<double>(ka32[d]);
        ks32[d] = ka32[d] = 0.f;
      }
    }
    f16 vm = f16{};
    for (int64_t g = 0, d0 = 0; d0 < D; ++g, d0 += PV_GROUP) {
      const int64_t d1 = std::min<int64_t>(D, d0 + PV_GROUP);
      f16 vs = f16{}, va = f16{};
      int64_t d = d0;
      for (; d + W <= d1; d += W) {
        const f16 y = load(vj + d);
        vs += y;
        va += vec::abs(y);
        vm = vec::abs(y) > vm ? vec::abs(y) : vm;
      }
      if (d < d1) {
        std::fill(tail, tail + W, 0.f);
        std::copy(vj + d, vj + d1, tail);
        const f16 y = load(tail);
        vs += y;
        va += vec::abs(y);
        vm = vec::abs(y) > vm ? vec::abs(y) : vm;
      }
      vsum[g * gs + j] = hsum(vs);
      vabs[g * gs + j] = hsum(va);
    }
    vmax[j] = hmax(vm);  // (a NaN lane is dropped: the value's NaN reaches the output anyway)
  }
}

// ---------------------------------------------------------------------------
// GEMMs on row-major fp32 blocks.

// C[m x n] (+)= A[m x k] * B, with B [n x k] (transposed, S = Q K^T) or [k x n]
// (acc += P V) in row-major fp32 blocks. BLAS sgemm_ where torch exports it, else
// at::mm. k_slice > 0 sums the product over slices of k_slice of the inner dimension,
// one GEMM each with beta = 1 after the first: see STACK_D_SLICE.
static void gemm(bool b_transposed, bool accumulate, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, int64_t k_slice) {
  if (m == 0 || n == 0) return;
  const int64_t step = k_slice > 0 ? k_slice : std::max<int64_t>(k, 1);
  for (int64_t k0 = 0; k0 < k; k0 += step) {
    const int64_t kk = std::min(step, k - k0);
    const float* Bk = b_transposed ? B + k0 : B + k0 * ldb;
    const bool add = accumulate || k0 > 0;
    if (sgemm_ != nullptr) {
      // column-major view: C^T (n x m) (+)= B' (n x k) * A^T (k x m)
      const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(kk);
      const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
      const float one = 1.f, beta = add ? 1.f : 0.f;
      sgemm_(b_transposed ? "T" : "N", "N", &mi, &ni, &ki, &one, Bk, &la, A + k0, &lb, &beta, C, &lc);
      continue;
    }
    auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor a = at::from_blob(const_cast<float*>(A + k0), {m, kk}, {lda, 1}, opts);
    at::Tensor b = b_transposed ? at::from_blob(const_cast<float*>(Bk), {n, kk}, {ldb, 1}, opts).t()
                                : at::from_blob(const_cast<float*>(Bk), {kk, n}, {ldb, 1}, opts);
    at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
    if (add)
      c.addmm_(a, b);
    else
      at::mm_out(c, a, b);
  }
}

// ---------------------------------------------------------------------------

struct FaultSpec {
  bool active = false;
  int64_t site = 0, batch = 0, head = 0, row = 0, col = 0, dim = 0, bit = -1;
  double value = 0.0;
};

struct Problem {
  const float* q;  // [B, Hq, N, D] fp32 contiguous
  const float* k;  // [B, Hkv, M, D]
  const float* v;
  float* out;      // [B, Hq, N, D] fp32
  int32_t* flags;  // [B, Hq, nblk]
  int64_t B, Hq, Hkv, N, M, D, nblk;
  int groups;  // PV-checksum groups of PV_GROUP head dims
  bool causal;
  float scale;
  int protection;  // 0 off, 1 abft, 2 full
  // Per (b, hkv): sum_j k_j and sum_j |k_j| per key tile [ntiles, D], and per key
  // sum_d v_jd and sum_d |v_jd| [M] (fp64), shared by every query block.
  const double* ksum;
  const double* kabs;
  const float* vsum;  // [B, Hkv, groups, M]
  const float* vabs;
  const float* vmax;  // per key max_d |v_jd| [B, Hkv, M]
  // per key ||k_j||_2 [B, Hkv, M] (scale of the column-checksum bound)
  const double* knorm;
  // the key sums above made per tile inside run_block instead, while the tile is in
  // cache (one query tile per head: nothing to share across query tiles)
  bool inline_sums;
};

// 64-byte aligned storage: MKL's sgemm may take a different path (and round
// differently) for a differently aligned buffer, and protection off / abft / full
// must give the same bits; seen as ulp differences between them before this.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) {
    void* p = std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};

struct Scratch {
  // S has NSUB_MAX rows beyond the tile's: the GEMM that makes S also makes the
  // column-checksum references (sum_i q_i) . k_j of each 64-row sub-block, from the
  // sub-block sums appended to the query rows in Qx (zeros at protection off, so
  // every level runs the same GEMM shape and rounds S the same way).
  std::vector<float, Aligned64<float>> Qx, S, P, acc;
  std::vector<float> m, l;
  // fp64 bookkeeping of the checks (protection >= abft)
  std::vector<double> l2, c, bv, qsum, qabs, rowref, rowmag, cs, ca, tileref, tilemag, qabs1;
  std::vector<double> q2, q2max, qs2max;  // per sub-block: sum_i q_id^2 per dim, its max, max_d (sum_i q_id)^2
  std::vector<float> cs32, ca32, pmax;  // pmax: each row's largest p of the tile
  // per-tile key sums (Problem::inline_sums): sum_j k_j, sum_j |k_j|, ||k_j||, and the
  // per-group sums of v_j and |v_j| at group stride BLOCK_N
  std::vector<double> tile_ks, tile_ka, tile_knorm;
  std::vector<float> tile_vsum, tile_vabs, tile_vmax;
  // per key of the tile: the column check's bound and the score verification's threshold
  std::vector<double> colb;
  std::vector<float> theta;
  Scratch(int64_t D, int64_t M, bool abft)
      : Qx((BLOCK_M + NSUB_MAX) * D), S((BLOCK_M + NSUB_MAX) * BLOCK_N), P(BLOCK_M * BLOCK_N), acc(BLOCK_M * D), m(BLOCK_M),
        l(BLOCK_M) {
    if (!abft) return;
    const int64_t ntiles = (M + BLOCK_N - 1) / BLOCK_N;
    for (auto* v : {&l2, &tileref, &tilemag}) v->resize(BLOCK_M);
    for (auto* v : {&c, &bv}) v->resize(BLOCK_M * MAX_GROUPS);  // [row, group]
    rowref.resize(BLOCK_M * std::max<int64_t>(ntiles, 1));
    rowmag.resize(BLOCK_M * std::max<int64_t>(ntiles, 1));
    for (auto* v : {&qsum, &qabs}) v->resize(NSUB_MAX * D);
    qabs1.resize(NSUB_MAX);
    cs.resize(BLOCK_N);
    ca.resize(BLOCK_N);
    cs32.resize(BLOCK_N);
    ca32.resize(BLOCK_N);
    pmax.resize(BLOCK_M);
    q2.resize(NSUB_MAX * D);
    q2max.resize(NSUB_MAX);
    qs2max.resize(NSUB_MAX);
    tile_ks.resize(D);
    tile_ka.resize(D);
    tile_knorm.resize(BLOCK_N);
    tile_vsum.resize(MAX_GROUPS * BLOCK_N);
    tile_vabs.resize(MAX_GROUPS * BLOCK_N);
    tile_vmax.resize(BLOCK_N);
    colb.resize(BLOCK_N);
    theta.resize(BLOCK_N);
  }
};

// The query rows of one block: rows r0..r1 of the heads h0..h0+hs-1 of batch b,
// which share one key head. hs > 1 only with r0 = 0 and r1 = N <= SUB_M (whole heads,
// stacked: contiguous in q and out); then each head is a sub-block, else sub-blocks
// are SUB_M rows.
struct Block {
  int64_t b, h0, hs, r0, r1;
  int64_t per_head() const { return r1 - r0; }
  int64_t rows() const { return hs * (r1 - r0); }
  int64_t sub_rows() const { return hs > 1 ? r1 - r0 : SUB_M; }
  int64_t nsub() const { return (rows() + sub_rows() - 1) / sub_rows(); }
  // the head and first row (in that head) of sub-block sb
  int64_t head_of(int64_t sb) const { return h0 + sb * sub_rows() / per_head(); }
  int64_t row_of(int64_t sb) const { return r0 + sb * sub_rows() % per_head(); }
  bool holds(int64_t batch, int64_t head, int64_t row) const {
    return batch == b && head >= h0 && head < h0 + hs && row >= r0 && row < r1;
  }
};

// One block through every visible key tile; writes its output rows and the
// failed-check bits of each sub-block to bad[]. INJECT compiles the fault sites in
// (false in production).
template <bool INJECT>
void run_block(const Problem& P, Scratch& w, const Block& blk, const FaultSpec& f, int32_t* bad) {
  const int64_t D = P.D, M = P.M, N = P.N;
  const int64_t b = blk.b, r0 = blk.r0, r1 = blk.r1;
  const int64_t rows = blk.rows(), per_head = blk.per_head(), sub_rows = blk.sub_rows();
  const int64_t hk = blk.h0 / (P.Hq / P.Hkv);
  const float* Q = P.q + ((b * P.Hq + blk.h0) * N + r0) * D;
  const float* K = P.k + (b * P.Hkv + hk) * M * D;
  const float* V = P.v + (b * P.Hkv + hk) * M * D;
  float* O = P.out + ((b * P.Hq + blk.h0) * N + r0) * D;
  const bool abft = P.protection >= 1;
  const int64_t shift = M - N;  // bottom-right causal alignment: key j visible iff j <= i + shift
  const int64_t kv_end = P.causal ? std::min<int64_t>(M, r1 + shift) : M;
  const bool hit = INJECT && f.active && blk.holds(f.batch, f.head, f.row);
  const int64_t fi = hit ? (f.head - blk.h0) * per_head + f.row - r0 : -1;  // the fault's row in the block
  const int64_t ntiles_all = (M + BLOCK_N - 1) / BLOCK_N;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const double sqrtD = std::sqrt(static_cast<double>(D));
  const int64_t nsub = blk.nsub();
  for (int64_t sb = 0; sb < NSUB_MAX; ++sb) bad[sb] = 0;

  std::fill(w.m.begin(), w.m.begin() + rows, NEG_INF);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.f);
  std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.f);
  float* Qx = w.Qx.data();
  std::copy(Q, Q + rows * D, Qx);
  std::fill(Qx + rows * D, Qx + (rows + nsub) * D, 0.f);
  if (abft) {
    std::fill(w.l2.begin(), w.l2.begin() + rows, 0.0);
    std::fill(w.c.begin(), w.c.begin() + rows * MAX_GROUPS, 0.0);
    std::fill(w.bv.begin(), w.bv.begin() + rows * MAX_GROUPS, 0.0);
    // row-checksum references for every key tile this block visits, in fp64:
    // q_i . sum_j k_j and |q_i| . sum_j |k_j| per tile
    const int64_t nt = (std::max<int64_t>(kv_end, 0) + BLOCK_N - 1) / BLOCK_N;
    const int64_t base = (b * P.Hkv + hk) * ntiles_all;
    // column references, per 64-row sub-block: sum_i q_i (fp64, rounded once to fp32) as
    // an extra row of Qx; for the bounds, sum_i |q_i| and sum_i q_i^2 per dim
    std::fill(w.qsum.begin(), w.qsum.begin() + nsub * D, 0.0);
    std::fill(w.qabs.begin(), w.qabs.begin() + nsub * D, 0.0);
    std::fill(w.q2.begin(), w.q2.begin() + nsub * D, 0.0);
    for (int64_t i = 0; i < rows; ++i) {
      add_d(w.qsum.data() + (i / sub_rows) * D, Q + i * D, D);
      add_abs_d(w.qabs.data() + (i / sub_rows) * D, Q + i * D, D);
      add_sq_d(w.q2.data() + (i / sub_rows) * D, Q + i * D, D);
    }
    for (int64_t sb = 0; sb < nsub; ++sb) {
      double q2max = 0.0, qs2max = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        Qx[(rows + sb) * D + d] = static_cast<float>(w.qsum[sb * D + d]);
        const double qs = static_cast<double>(Qx[(rows + sb) * D + d]);
        q2max = std::max(q2max, w.q2[sb * D + d]);
        qs2max = std::max(qs2max, qs * qs);
      }
      w.q2max[sb] = q2max;
      w.qs2max[sb] = qs2max;
      w.qabs1[sb] = std::accumulate(w.qabs.begin() + sb * D, w.qabs.begin() + (sb + 1) * D, 0.0);
    }
    if (!P.inline_sums)
      dots_d(Q, rows, D, P.ksum + base * D, P.kabs + base * D, nt, ntiles_all, w.rowref.data(), w.rowmag.data());
  }
  int64_t ntiles = 0;
  float* S = w.S.data();
  float* Pm = w.P.data();
  // row sums: the noise of S, the fp32 partial sums of CHUNK terms, and those of
  // KV_CHUNK keys in the per-tile key sums of the reference
  const double row_factor = (KAPPA * sqrtD + 1.0 + vec::CHUNK + KV_CHUNK) * U32;

  for (int64_t n0 = 0; n0 < std::max<int64_t>(kv_end, 0); n0 += BLOCK_N) {
    const int64_t cols = std::min<int64_t>(BLOCK_N, kv_end - n0);
    const bool in_tile = hit && f.col >= n0 && f.col < n0 + cols;
    ++ntiles;
    // row-checksum references of this tile: |error of S_ij| ~ u sqrt(D) sum_d
    // |q_id k_jd| (random rounding), so a row sum is bounded by
    // kappa u sqrt(D) |q_i| . sum_j |k_j|
    const double* ref = w.rowref.data() + n0 / BLOCK_N;  // stride ntiles_all
    const double* mag = w.rowmag.data() + n0 / BLOCK_N;
    int64_t ld = ntiles_all;
    const double* knorm = abft ? P.knorm + (b * P.Hkv + hk) * M + n0 : nullptr;
    const float* vsum = abft ? P.vsum + (b * P.Hkv + hk) * P.groups * M + n0 : nullptr;
    const float* vabs = abft ? P.vabs + (b * P.Hkv + hk) * P.groups * M + n0 : nullptr;
    const float* vmax = abft ? P.vmax + (b * P.Hkv + hk) * M + n0 : nullptr;
    int64_t gs = M;  // group stride of vsum, vabs
    if (abft && (P.inline_sums || cols != std::min<int64_t>(BLOCK_N, M - n0))) {
      // this tile's key sums over its visible keys and the row references from them:
      // every tile when the sums are made per tile, else the one tile of this block
      // cut by the causal limit (per key, knorm and the sums of v are those of the
      // per-call sums; the sums over keys cover only its first cols keys). Before the
      // GEMM: the first read of the tile, with prefetching, leaving K and V in cache
      std::fill(w.tile_ks.begin(), w.tile_ks.end(), 0.0);
      std::fill(w.tile_ka.begin(), w.tile_ka.end(), 0.0);
      key_value_sums(K + n0 * D, V + n0 * D, cols, D, w.tile_ks.data(), w.tile_ka.data(), w.tile_knorm.data(),
                     w.tile_vsum.data(), w.tile_vabs.data(), w.tile_vmax.data(), BLOCK_N);
      dots_d(Q, rows, D, w.tile_ks.data(), w.tile_ka.data(), 1, 1, w.tileref.data(), w.tilemag.data());
      ref = w.tileref.data();
      mag = w.tilemag.data();
      ld = 1;
      knorm = w.tile_knorm.data();
      vsum = w.tile_vsum.data();
      vabs = w.tile_vabs.data();
      vmax = w.tile_vmax.data();
      gs = BLOCK_N;
    }
    // ---- S = Q K^T in fp32, and the column references in rows rows..rows+nsub ----
    gemm(true, false, rows + nsub, cols, D, Qx, D, K + n0 * D, D, S, BLOCK_N, blk.hs > 1 ? STACK_D_SLICE : 0);
    if (in_tile && f.site == kScores) {
      float& x = S[fi * BLOCK_N + (f.col - n0)];
      x = corrupt(x, f.bit, f.value);
    }
    memory_barrier();
    const SoftmaxRowFn row_fn = softmax_row_fn(P.protection, false, P.groups);
    // ---- row by row, while the row of S and P is in L1: scale, mask, max and the
    // ABFT sums; the online softmax with its checks; the normaliser ----
    for (int64_t sb = 0; sb < nsub; ++sb) {
      const int64_t i0 = sb * sub_rows, i1 = std::min<int64_t>(rows, i0 + sub_rows);
      if (abft) {
        std::fill(w.cs.begin(), w.cs.begin() + cols, 0.0);
        std::fill(w.ca.begin(), w.ca.begin() + cols, 0.0);
        std::fill(w.cs32.begin(), w.cs32.begin() + cols, 0.f);
        std::fill(w.ca32.begin(), w.ca32.begin() + cols, 0.f);
      }
      for (int64_t i = i0; i < i1; ++i) {
        // last visible key of the tile
        const int64_t limit = P.causal ? (r0 + i % per_head + shift - n0) : cols - 1;
        const float* Si = S + i * BLOCK_N;
        float* Pi = Pm + i * BLOCK_N;
        const float m_old = w.m[i];
        float mx;
        if (abft) {
          double rs;
          mx = row_max_sums(Si, cols, limit, &rs, w.cs32.data(), w.ca32.data());
          if ((i - i0) % vec::ROW_CHUNK == vec::ROW_CHUNK - 1 || i == i1 - 1)
            flush_cols(w.cs32.data(), w.cs.data(), w.ca32.data(), w.ca.data(), cols);
          // underflow: D + 1 operations per S_ij; the reference's fp32 key sums, 2^-150
          // per key and dim, times |q_id| (sum_d |q_id| <= qabs1 of the sub-block)
          const double row_abs = ETA * static_cast<double>(cols) * (static_cast<double>(D + 1) + w.qabs1[sb]);
          if (!(std::fabs(rs - ref[i * ld]) <= row_factor * mag[i * ld] + row_abs)) bad[sb] |= kRowChecksum;
        } else {
          mx = row_max(Si, cols, limit);
        }
        float m_new = (mx != mx) ? mx : std::max(m_old, mx);
        if (in_tile && f.site == kRowmax && fi == i) m_new = corrupt(m_new, f.bit, f.value);
        opaque(m_new);
        w.m[i] = m_new;
        if (abft && !(m_new == std::max(m_old, mx) && (m_new == NEG_INF || std::isfinite(m_new))))
          bad[sb] |= kRowmaxInvariant;
        // no visible key yet: the row adds nothing (p == 0, alpha == 1); the first
        // visible one zeroes the (empty) history: alpha == 0, also at scale 0
        const bool empty = m_new == NEG_INF;
        const float alpha = empty ? 1.f : m_old == NEG_INF ? 0.f : exp_neg((m_old - m_new) * P.scale);
        RowFault rf;
        const bool hit_p = in_tile && f.site == kProbs && fi == i;
        if (hit_p) rf = RowFault{f.col - n0, f.bit, f.value};
        RowStats st;
        (hit_p ? softmax_row_fn(P.protection, true, P.groups) : row_fn)(Si, Pi, cols, empty ? -1 : limit, P.scale,
                                                                        m_new, vsum, vabs, gs, rf, st);
        memory_barrier();
        const float psum = st.psum;
        float l_new = alpha * w.l[i] + psum;
        if (in_tile && f.site == kRowsum && fi == i) l_new = corrupt(l_new, f.bit, f.value);
        opaque(l_new);
        w.l[i] = l_new;
        if (abft) {
          if (!(st.pmin >= 0.f && st.pmax <= 1.f && std::isfinite(psum))) bad[sb] |= kProbsRange;
          if (!empty) {
            // the tile either raised the max (its argmax gets p == 1) or kept it (alpha == 1)
            if (!(alpha == 1.f || st.pmax == 1.f) || !(alpha >= 0.f && alpha <= 1.f)) bad[sb] |= kRowmaxInvariant;
            if (st.dmr_bad) bad[sb] |= kSoftmaxDmr;
          } else if (!(st.pmax == 0.f)) {
            bad[sb] |= kProbsRange;
          }
          // independent fp64 bookkeeping of l and of the PV checksum, same alpha and p
          const double a = static_cast<double>(alpha);
          w.l2[i] = a * w.l2[i] + st.ws;
          for (int g = 0; g < P.groups; ++g) {
            w.c[i * MAX_GROUPS + g] = a * w.c[i * MAX_GROUPS + g] + st.wa[g];
            w.bv[i * MAX_GROUPS + g] = a * w.bv[i * MAX_GROUPS + g] + st.wb[g];
          }
        }
        if (abft) w.pmax[i] = empty ? 0.f : st.pmax;
        if (alpha != 1.f) scale_row(w.acc.data() + i * D, D, alpha);
      }
      if (abft) {
        // the column check, with each key's bound (underflow: D + 1 operations per S_ij,
        // i1 - i0 + 1 values of S per column, and sum_i q_i rounded to fp32, 2^-150 per
        // dim times |k_jd| <= ||k_j||), and the score verification of the keys whose
        // score a fault could move harmfully within that bound
        const float* colref = S + (rows + sb) * BLOCK_N;
        const double col_abs = ETA * static_cast<double>((i1 - i0 + 1) * (D + 1)) + static_cast<double>(D) * 0x1p-150;
        const ColumnBound cb{KAPPA * sqrtD * U32, std::sqrt(static_cast<double>(i1 - i0) * w.q2max[sb]),
                             std::sqrt(w.qs2max[sb]), col_abs};
        const float theta_low =
            column_bounds(cb, knorm, w.ca.data(), colref, vmax, P.scale, cols, w.colb.data(), w.theta.data());
        if (col_check_fails(w.cs.data(), colref, w.colb.data(), cols)) bad[sb] |= kColChecksum;
        for (int64_t i = i0; i < i1; ++i) {
          if (!(w.pmax[i] >= theta_low * w.l[i]) || w.m[i] == NEG_INF) continue;
          const int64_t limit = P.causal ? (r0 + i % per_head + shift - n0) : cols - 1;
          if (scores_mismatch(Qx + i * D, K + n0 * D, D, S + i * BLOCK_N, Pm + i * BLOCK_N, w.theta.data(), w.l[i],
                              std::min<int64_t>(cols, limit + 1)))
            bad[sb] |= kScoreRecompute;
        }
      }
    }
    // ---- acc += P V in fp32 ----
    gemm(false, true, rows, D, cols, Pm, BLOCK_N, V + n0 * D, D, w.acc.data(), D, blk.hs > 1 ? STACK_KEY_SLICE : 0);
    if (in_tile && f.site == kAcc) {
      float& x = w.acc[fi * D + f.dim];
      x = corrupt(x, f.bit, f.value);
    }
    memory_barrier();
  }

  // ---- final normalisation and the end-of-row checks ----
  // PV checksum: kappa sqrt(depth) of random rounding in acc, plus the fp32 partials
  // of c (CHUNK terms), the fp32 per-key sums of V (9 u) and their products (1 u);
  // l: worst-case fp32 summation of l itself, plus the partials of l2
  const double pv_factor = (KAPPA * std::sqrt(static_cast<double>(BLOCK_N + 2 * ntiles)) + 10.0 + vec::CHUNK) * U32;
  const double depth_l = static_cast<double>(BLOCK_N + 2 * ntiles + 9 + vec::CHUNK);
  for (int64_t i = 0; i < rows; ++i) {
    float* Oi = O + i * D;
    const float* Ai = w.acc.data() + i * D;
    const float l = w.l[i];
    const int64_t visible =
        P.causal ? std::min<int64_t>(M, std::max<int64_t>(r0 + i % per_head + shift + 1, 0)) : M;
    if (visible == 0) {  // no key to attend to: zeros, by definition
      std::fill(Oi, Oi + D, 0.f);
      if (hit && f.site == kOutput && fi == i) Oi[f.dim] = corrupt(Oi[f.dim], f.bit, f.value);
      memory_barrier();
      if (abft && !all_finite(Oi, D)) bad[i / sub_rows] |= kOutputCheck;
      if (abft && sum_abs_d(Oi, D) != 0.0) bad[i / sub_rows] |= kOutputCheck;
      continue;
    }
    double acc_sum = 0.0;
    if (abft) {
      bool pv_bad = false;
      for (int g = 0; g < P.groups; ++g) {
        const int64_t d0 = g * PV_GROUP, d1 = std::min<int64_t>(D, d0 + PV_GROUP);
        const double part = sum_d(Ai + d0, d1 - d0);
        acc_sum += part;
        // underflow: per key, the product and sum of acc and of c, the per-key sum of v
        // over the group's dims; per tile, the rescale of acc and c
        const double pv_abs = ETA * static_cast<double>((d1 - d0 + 2) * (visible + 2 * ntiles + vec::CHUNK));
        pv_bad |= !(std::fabs(part - w.c[i * MAX_GROUPS + g]) <= pv_factor * w.bv[i * MAX_GROUPS + g] + pv_abs);
      }
      if (pv_bad) bad[i / sub_rows] |= kPvChecksum;
      const double l2 = w.l2[i];
      if (!(std::fabs(static_cast<double>(l) - l2) <= depth_l * U32 * l2) ||
          !(l2 >= 1.0 - depth_l * U32 && l2 <= static_cast<double>(visible) * (1.0 + depth_l * U32)))
        bad[i / sub_rows] |= kRowsumInvariant;
    }
    for (int64_t d = 0; d < D; ++d) Oi[d] = Ai[d] / l;
    if (hit && f.site == kOutput && fi == i) Oi[f.dim] = corrupt(Oi[f.dim], f.bit, f.value);
    memory_barrier();
    if (abft) {
      // each O_d = fl(acc_d / l) is within u |O_d| + 2^-150: the sums agree within
      // u sum |O| + D 2^-150
      const double osum = sum_d(Oi, D), oabs = sum_abs_d(Oi, D);
      const double ref = acc_sum / static_cast<double>(l);
      if (!(std::fabs(osum - ref) <= 4.0 * U32 * oabs + ETA * static_cast<double>(D)) || !std::isfinite(oabs))
        bad[i / sub_rows] |= kOutputCheck;
    }
  }
}

// q rows r0..r1 and every key / value the tile ending at row tile_end reads.
bool block_inputs_finite(const Problem& P, int64_t b, int64_t h, int64_t r0, int64_t r1, int64_t tile_end) {
  const int64_t D = P.D, M = P.M;
  const int64_t hk = h / (P.Hq / P.Hkv);
  const int64_t kv_end = P.causal ? std::min<int64_t>(M, tile_end + M - P.N) : M;
  const int64_t keys = std::max<int64_t>(kv_end, 0);
  return all_finite(P.q + ((b * P.Hq + h) * P.N + r0) * D, (r1 - r0) * D) &&
         all_finite(P.k + (b * P.Hkv + hk) * M * D, keys * D) &&
         all_finite(P.v + (b * P.Hkv + hk) * M * D, keys * D);
}

// First pass, then, per 64-row sub-block with a failed check: non-finite input is
// reported as such; anything else makes the tile recompute once (a transient fault
// does not repeat) and the sub-block is CORRECTED or, if it fails again, UNCORRECTED.
void process_block(const Problem& P, Scratch& w, bool recompute, const Block& blk, const FaultSpec& f) {
  const int64_t nsub = blk.nsub();
  const bool targeted = f.active && blk.holds(f.batch, f.head, f.row);
  int32_t bits[NSUB_MAX], again[NSUB_MAX];
  if (targeted)
    run_block<true>(P, w, blk, f, bits);
  else
    run_block<false>(P, w, blk, f, bits);
  bool redo = false;
  for (int64_t sb = 0; sb < nsub; ++sb) {
    if (!(bits[sb] & kCheckMask)) continue;
    const int64_t s0 = blk.row_of(sb), s1 = std::min<int64_t>(blk.r1, s0 + blk.sub_rows());
    if (!block_inputs_finite(P, blk.b, blk.head_of(sb), s0, s1, blk.r1))
      bits[sb] |= kNonfiniteInput;
    else
      redo = true;
  }
  if (redo && recompute) {
    run_block<false>(P, w, blk, f, again);
    for (int64_t sb = 0; sb < nsub; ++sb)
      if ((bits[sb] & kCheckMask) && !(bits[sb] & kNonfiniteInput))
        bits[sb] |= (again[sb] & kCheckMask) ? kUncorrected : kCorrected;
  }
  for (int64_t sb = 0; sb < nsub; ++sb)
    P.flags[(blk.b * P.Hq + blk.head_of(sb)) * P.nblk + blk.row_of(sb) / SUB_M] = bits[sb];
}

// Per-call sums over K and V shared by every query block (protection >= abft).
struct KvSums {
  std::vector<double> ksum, kabs, knorm;
  std::vector<float> vsum, vabs, vmax;
};

void precompute_sums(Problem& P, KvSums& sums) {
  const int64_t D = P.D, M = P.M;
  const int64_t ntiles = (M + BLOCK_N - 1) / BLOCK_N;
  sums.ksum.assign(P.B * P.Hkv * ntiles * D, 0.0);
  sums.kabs.assign(P.B * P.Hkv * ntiles * D, 0.0);
  sums.vsum.resize(P.B * P.Hkv * P.groups * M);
  sums.vabs.resize(P.B * P.Hkv * P.groups * M);
  sums.vmax.resize(P.B * P.Hkv * M);
  sums.knorm.resize(P.B * P.Hkv * M);
  at::parallel_for(0, P.B * P.Hkv * ntiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / ntiles, t = idx % ntiles;
      const float* K = P.k + bh * M * D;
      const float* V = P.v + bh * M * D;
      const int64_t j1 = std::min<int64_t>(M, (t + 1) * BLOCK_N);
      const int64_t j0 = t * BLOCK_N;
      key_value_sums(K + j0 * D, V + j0 * D, j1 - j0, D, &sums.ksum[idx * D], &sums.kabs[idx * D],
                     &sums.knorm[bh * M + j0], &sums.vsum[bh * P.groups * M + j0],
                     &sums.vabs[bh * P.groups * M + j0], &sums.vmax[bh * M + j0], M);
    }
  });
  P.ksum = sums.ksum.data();
  P.kabs = sums.kabs.data();
  P.vsum = sums.vsum.data();
  P.vabs = sums.vabs.data();
  P.vmax = sums.vmax.data();
  P.knorm = sums.knorm.data();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "ftattn.attention: q, k, v must be 4-D [batch, heads, seq, head_dim]; got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "ftattn.attention: q, k, v must share one dtype; got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type(), ". Cast them to one of float16, bfloat16, float32.");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "ftattn.attention: dtype ", dt,
              " is not supported; use float16, bfloat16 or float32");
  TORCH_CHECK(k.sizes() == v.sizes(), "ftattn.attention: k and v must have the same shape; got k ", k.sizes(),
              " and v ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0), "ftattn.attention: batch of q (", q.size(0), ") and k (", k.size(0),
              ") differ");
  TORCH_CHECK(q.size(3) == k.size(3), "ftattn.attention: head_dim of q (", q.size(3), ") and k (", k.size(3),
              ") differ");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256, "ftattn.attention: head_dim ", q.size(3),
              " is not supported; use 1..256");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "ftattn.attention: query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ") for grouped-query attention");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale, int64_t protection, bool recompute,
                                                     at::OptionalIntArrayRef fault,
                                                     std::optional<double> fault_value) {
  check_inputs(q, k, v);
  TORCH_CHECK(std::isfinite(scale), "ftattn.attention: scale must be finite, got ", scale);
  TORCH_CHECK(protection >= 0 && protection <= 2, "ftattn.attention: protection ", protection,
              " must be 0 (off), 1 (abft) or 2 (full)");
  // the kernel scales (S - max) and so needs scale >= 0: softmax(q k^T scale) ==
  // softmax((-q) k^T |scale|)
  const at::Tensor qf = scale < 0 ? q.to(at::kFloat).neg().contiguous() : q.to(at::kFloat).contiguous();
  if (scale < 0) scale = -scale;
  const at::Tensor kf = k.to(at::kFloat).contiguous();
  const at::Tensor vf = v.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3), Hkv = k.size(1), M = k.size(2);
  const int64_t nblk = (N + SUB_M - 1) / SUB_M;  // report blocks
  const int64_t ntile_m = (N + BLOCK_M - 1) / BLOCK_M;
  at::Tensor out = at::empty({B, Hq, N, D}, qf.options());
  at::Tensor flags = at::zeros({B, Hq, nblk}, q.options().dtype(at::kInt));
  if (B * Hq * N == 0) return {out.to(q.scalar_type()), flags};  // no query row (Hq = 0 too: no key-head group)

  FaultSpec f;
  if (fault.has_value()) {
    const auto fv = *fault;
    TORCH_CHECK(static_cast<int64_t>(fv.size()) == kFaultFields,
                "ftattn.attention: fault must be [site, batch, head, row, col, dim, bit], got ", fv.size(), " values");
    f.active = true;
    f.site = fv[0], f.batch = fv[1], f.head = fv[2], f.row = fv[3], f.col = fv[4], f.dim = fv[5], f.bit = fv[6];
    TORCH_CHECK(f.site >= 0 && f.site < kNumSites, "ftattn.attention: fault site ", f.site, " must be 0..",
                kNumSites - 1);
    TORCH_CHECK(f.batch >= 0 && f.batch < B && f.head >= 0 && f.head < Hq && f.row >= 0 && f.row < N &&
                    f.dim >= 0 && f.dim < D && f.col >= 0 && (f.col < M || f.site == kOutput),
                "ftattn.attention: fault coordinates (batch ", f.batch, ", head ", f.head, ", row ", f.row, ", col ",
                f.col, ", dim ", f.dim, ") out of range for q ", q.sizes(), " and k ", k.sizes());
    TORCH_CHECK(f.bit >= kBitReplace && f.bit <= 31, "ftattn.attention: fault bit ", f.bit, " must be 0..31 (or ",
                kBitReplace, ")");
    TORCH_CHECK(f.bit != kBitReplace || fault_value.has_value(), "ftattn.attention: fault with bit ", kBitReplace,
                " needs fault_value");
    f.value = fault_value.value_or(0.0);
  }

  Problem P{};
  P.q = qf.data_ptr<float>();
  P.k = kf.data_ptr<float>();
  P.v = vf.data_ptr<float>();
  P.out = out.data_ptr<float>();
  P.flags = flags.data_ptr<int32_t>();
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.N = N, P.M = M, P.D = D, P.nblk = nblk;
  P.groups = static_cast<int>((D + PV_GROUP - 1) / PV_GROUP);
  P.causal = causal;
  P.scale = static_cast<float>(scale);
  P.protection = static_cast<int>(protection);
  // the query heads of a key head: stacked into blocks of `stack` heads when each has
  // at most SUB_M rows, in `chunks` blocks per key head (per query tile)
  const int64_t group = Hq / Hkv;
  const int64_t stack = N >= 1 && N <= SUB_M ? std::min({group, MAX_STACK, BLOCK_M / N}) : 1;
  const int64_t chunks = (group + stack - 1) / stack;
  KvSums sums;
  // per tile in the block when a key head has at most two blocks (decode, B4 H8 D128
  // at M 4096 / 32768, unstacked: Hkv 8 full 19.5 -> 10.5 / 155 -> 94 ms, Hkv 4 12.0
  // -> 12.0 / 111 -> 75 ms; with 4 blocks sharing, making the sums once per key head
  // was faster: 4.6 vs 5.7 / 82 vs 85 ms)
  P.inline_sums = ntile_m == 1 && chunks <= 2;
  if (protection >= 1 && M > 0 && !P.inline_sums) precompute_sums(P, sums);

  if (N > 0) {
    // at least ~4 MFLOP per task: small (decode-sized) calls stay on one thread,
    // where waking the pool costs more than the work (and spins under load)
    const int64_t block_flops = 4 * std::min<int64_t>(stack * N, BLOCK_M) * std::max<int64_t>(M, 1) * D;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(block_flops, 1));
    // Tiles are handed out one at a time from a shared counter, not as one static
    // range per thread: on a machine shared with other jobs a thread that loses its
    // core for a while leaves its tiles to the others instead of holding up the call
    // (each tile is computed independently, so the result does not depend on which
    // thread takes it).
    const int64_t ntasks = B * Hkv * chunks * ntile_m;
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), (ntasks + grain - 1) / grain);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
      Scratch w(D, M, protection >= 1);
      for (int64_t idx = next.fetch_add(1); idx < ntasks; idx = next.fetch_add(1)) {
        const int64_t tile = idx % ntile_m, chunk = idx / ntile_m % chunks, bk = idx / ntile_m / chunks;
        const int64_t h0 = bk % Hkv * group + chunk * stack;
        const int64_t r0 = tile * BLOCK_M;
        process_block(P, w, recompute, Block{bk / Hkv, h0, std::min(stack, group - chunk * stack), r0,
                                             std::min<int64_t>(N, r0 + BLOCK_M)}, f);
      }
    });
  }
  return {out.to(q.scalar_type()), flags};
}

}  // namespace

TORCH_LIBRARY_IMPL(ftattn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
}

}  // namespace ftattn
