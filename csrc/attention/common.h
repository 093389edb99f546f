// Tiles, thresholds, the two exponentials and the fault corruption.
// Part of the CPU attention kernel: included once, by csrc/attention_cpu.cpp (one
// translation unit, so every helper stays inlinable).
#pragma once

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
#include <type_traits>
#include <numeric>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "blas.h"            // gemm_rm: the fp32 GEMM (BLAS sgemm_)
#include "fault_contract.h"  // sites, check bits, the fault encoding (ftattn/contract.py)
#include "gemm16.h"          // the bf16 GEMM (oneDNN brgemm): bf16_gemm_ready, gemm_bf16
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>  // (declares the AVX512-BF16 builtins of bf16_round_hw)
#endif
#include "vec.h"  // FTATTN_CLONES, the 16-lane vector types and their reductions

extern "C" {
// MKL's thread count for the calling thread (0: the global one again), its C entry point (the
// lower-case name torch exports is the Fortran one, which takes a pointer); weak, as above
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}


namespace ftattn {
namespace {

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
  // default-initialised, not zeroed: the tile buffers (about 1 MB) are written before
  // they are read, and zeroing them was 30 % of a decode step's attention call (perf)
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    if constexpr (sizeof...(Args) == 0) {
#ifdef FTATTN_POISON_SCRATCH  // (a test build: every unwritten value a NaN)
      ::new (static_cast<void*>(p)) U(std::numeric_limits<U>::quiet_NaN());
#else
      ::new (static_cast<void*>(p)) U;
#endif
    } else {
      ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
  }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};

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
// Rows per column checksum: a sub-block's rows are checked in groups of COL_ROWS (where
// its rows divide into them; else the sub-block is one group), each with its reference
// row sum_i q_i . k_j; the flags stay per sub-block. The column bound grows with the
// rows it sums, and the score verification (scores_mismatch) checks every key whose
// probability reaches a threshold inversely proportional to it: on the real MiniLM's
// attention (B8 H12 N128 D32, six layers) 64-row groups sent 3.6 keys a row to the fp64
// verification (23 % of the abft kernel's time), 32-row groups 2.0, 16-row groups 1.1.
constexpr int64_t COL_ROWS = 32;
constexpr int64_t NGROUP_MAX = BLOCK_M / COL_ROWS > MAX_STACK ? BLOCK_M / COL_ROWS : MAX_STACK;
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

// The PV check's second checksum (protection full): over every head dim, sum_d w_d acc_d
// against sum_j p_j (sum_d w_d v_jd), with weights w_d = checksum_weight(d) from a hash of d
// (fault_contract.h: odd multiples of 2^-26 in (-1/4, 1/4), mean 0: w_d v_jd rounds once; |w_d| < PV_WEIGHT_MAX
// scales the plain check's bound, and keeps sum_d w_d v_jd over D <= 256 dims within the largest
// 64-dim group's sum of |v|, so it overflows fp32 no sooner than the plain sums: with weights up
// to 1 it did, from |v| ~ 3e36, a false alarm, found by review).
// A warp flips one bit of 32 consecutive dims of an accumulator row; where the values share an
// exponent the deltas are +-2^k with signs from the data, and with probability ~0.14 they sum to
// 0 in the plain checksum (the random and targeted warp campaigns passed 11 harmful ones over
// 6,656, their sums below 1/8 of the bound). The weighted sum of such a pattern is 2^k sum_d +-w_d:
// with 24-bit weights it comes within the bound of 0 for ~1 sign pattern in 10^5 (with the 8-bit
// weights before 2026-12-07, exactly 0 for ~1 in 500), so both vanish together rarely enough that
// the campaigns find none (the weights are fixed: data made to cancel in both exist) (one weighted sum for all groups: a warp lies in one group, and one more product per
// score at every head dim). The same weights in ftattn/reference.py and kernels/attention.py.
constexpr float pv_weight(int64_t d) { return checksum_weight(d); }  // (fault_contract.h)
constexpr double PV_WEIGHT_MAX = kChecksumWeightMax;
// A checksum whose bound exceeds this many times the harm threshold of what it checks (in the
// same units) cannot see every harmful fault: the row is made again and compared bit for bit
// (the forward's PV checksum, csrc/attention/block.h; the backward's dQ, dK, dV checks).
constexpr double PV_BLIND = 3.0;
struct PvWeights {
  alignas(64) float w[MAX_GROUPS * PV_GROUP + 16];  // (+16: a 16-lane load at a group's tail)
  constexpr PvWeights() : w{} {
    for (int64_t d = 0; d < MAX_GROUPS * PV_GROUP + 16; ++d) w[d] = pv_weight(d);
  }
};
inline constexpr PvWeights PV_WEIGHTS{};

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
// The same per operation where a product runs on the bf16 GEMM, which flushes results
// below 2^-126 to 0 (FTZ) instead of rounding them to a subnormal.
constexpr double ETA_FTZ = 0x1p-126;
// |d| within bound, and the bound finite. A bound is made of the data's magnitude sums, which
// overflow (fp32 partials of |v| or dO . v from ~1e36) only on operands near fp32's range,
// where the compared sums may overflow too or may not; an infinite bound then passed any
// difference, a fault included (review: an `acc` fault, 87 % of the output, unflagged at
// |v| ~ 1.3e37). The checks with nothing behind them (the PV checksums; the backward's dQ,
// dK, dV checksums) fail instead, and ftattn/attention.py runs the call again on operands
// scaled by powers of two, where every sum is in range. (The checks of S and dP keep `<=`:
// there an infinite column bound sends every entry to the fp64 verification, by design.)
FTATTN_VEC_INLINE bool within(double d, double bound) { return d <= bound && bound <= 1.7976931348623157e308; }

// bf16 as bits: of an fp32 value that is a bf16 value (exact: its low 16 bits are 0), and
// the nearest one to any fp32 value (ties to even; Inf and NaN stay so).
FTATTN_VEC_INLINE uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return static_cast<uint16_t>(u >> 16);
}
FTATTN_VEC_INLINE uint16_t bf16_nearest(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7F800000u) == 0x7F800000u) return static_cast<uint16_t>(u >> 16);  // (Inf, NaN)
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
// The bf16 the bf16 GEMM is given for x: the nearest, 0 (with x's sign) below 2^-126, which
// the GEMM reads as 0 anyway, so what the checks sum is what the product reads.
FTATTN_VEC_INLINE uint16_t bf16_gemm_bits(float x) {
  const uint16_t h = bf16_nearest(x);
  return (h & 0x7F80u) == 0 ? static_cast<uint16_t>(h & 0x8000u) : h;
}
FTATTN_VEC_INLINE float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// One value rounded as VCVTNEPS2BF16 rounds it (bf16_round_hw, below): a subnormal x read as
// (signed) 0, a NaN quieted, else bf16_gemm_bits.
FTATTN_VEC_INLINE uint16_t bf16_gemm_bits_daz(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7F800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return bf16_gemm_bits(x);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// bf16 rounding in one instruction, VCVTNEPS2BF16 (AVX512-BF16): nearest, ties to even, as
// bf16_nearest; it reads a subnormal x as 0, so the result is 0 below 2^-126 where
// bf16_gemm_bits gives 2^-126 to x within 2^-135 of it (either way the bf16 the product reads,
// which the checks sum), and it quiets a signalling NaN. Only in functions of
// FTATTN_BF16_CVT_TARGET (the clones' x86-64-v4 lacks it), picked at run time where
// bf16_hw_round(); their values one at a time go through bf16_gemm_bits_daz, which rounds as
// the instruction does (a row's rounding must not depend on which of its keys run as a vector:
// at abft and full a partly masked last vector can run key by key where off runs it whole).
// (The target adds the AVX-512 subsets to the compiler's own: "arch=x86-64-v4" would narrow a
// -march=native or sapphirerapids build, whose always-inline helpers then fail to inline.)
#define FTATTN_BF16_CVT 1
#define FTATTN_BF16_CVT_TARGET \
  __attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx512bf16")))

typedef uint16_t bf16x16 __attribute__((vector_size(32)));
FTATTN_VEC_INLINE bf16x16 bf16_round_hw(vec::f16 x) {
  return reinterpret_cast<bf16x16>(__builtin_ia32_cvtneps2bf16_v16sf(x));
}
// the fp32 values of 16 bf16 (one VPMOVZXWD and a shift: GCC 12 made four of convertvector)
FTATTN_VEC_INLINE vec::f16 bf16_widen_hw(bf16x16 h) {
  typedef short s16 __attribute__((vector_size(32)));
  typedef int i16 __attribute__((vector_size(64)));
  const i16 w = __builtin_ia32_pmovzxwd512_mask(reinterpret_cast<s16>(h), i16{}, 0xFFFF);
  return reinterpret_cast<vec::f16>(w << 16);
}
#else
#define FTATTN_BF16_CVT 0
#endif

// Whether the bf16 roundings for the bf16 GEMM run on VCVTNEPS2BF16: the AVX-512 code runs
// (16 lanes) on a CPU with AVX512-BF16, unless FTATTN_BF16_CVT=0 (read per call: the tests
// compare both ways).
inline bool bf16_hw_round() {
#if FTATTN_BF16_CVT
  static const bool hw = wide_vectors() && __builtin_cpu_supports("avx512bf16");
  if (!hw) return false;
  const char* env = std::getenv("FTATTN_BF16_CVT");
  return env == nullptr || std::strcmp(env, "0") != 0;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------
// Element-wise math. Two exponentials with different reductions and different
// polynomials, so the redundant softmax cannot be merged with the first one.


// Both exponentials are branch-free and written once for a float and for 16 lanes.
// Rounding by adding C = 1.5 * 2^23 + 127 leaves n + 127 in the low mantissa bits of
// the sum, so shifting its bits left by 23 gives 2^n with no float-to-int
// conversion; the argument is clamped where n + 127 reaches 0, and the result there
// is 0 (or a value below 2^-125, far inside every tolerance).
constexpr float ROUND_C = 12583039.0f;  // 1.5 * 2^23 + 127

// A constant the compiler may not fold into its use (still hoisted out of loops): a
// clamp `lo > x ? lo : x` against a folded constant vector compiled to a compare and a
// masked move, two instructions, against a register one max (vmaxps, which returns x
// where x is NaN, as the clamp must).
FTATTN_VEC_INLINE float unfolded(float c) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(c));  // (in an SSE / AVX register)
#elif defined(__aarch64__)
  asm("" : "+w"(c));  // (in a SIMD / FP register)
#else
  asm("" : "+m"(c));  // (through memory: any target)
#endif
  return c;
}

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
FTATTN_VEC_INLINE vec::f8 pow2_bits(vec::f8 t) {
  return reinterpret_cast<vec::f8>(reinterpret_cast<vec::u8>(t) << 23);
}

// The library GEMMs of a kernel task on its own thread, for the task's lifetime (RAII): a
// task runs inside the pool's parallel region, where MKL runs sequentially, except where
// the call has one worker, whose task runs on the caller's thread outside it and MKL split
// its GEMMs over every thread: the bits then depended on the thread count (a call with one
// query row differed by ~1e-7 between 1 and 2 threads; found by review). With this every
// task's GEMMs round alike, whatever the thread count.
struct SequentialBlas {
  int prev = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;
};

// exp(x) for x <= 0 (x = (S - max) * scale) as 2^(x log2 e): n = round(x log2 e),
// f = x log2 e - n in one multiply-add, and the Cephes exp2f minimax polynomial for
// 2^f (about 1 ulp); 0 below -88. Against a Cody-Waite reduction by ln 2 with the
// expf polynomial, three operations fewer per element; the rounding of log2 e adds
// u|x|/2 to the argument, nothing where p is large enough to count (|x| small).
// exp(0) == 1 exactly, which the invariants rely on.
template <typename T>
FTATTN_VEC_INLINE T exp_neg(T x) {
  const T lo = T{} + unfolded(-88.0f);
  x = lo > x ? lo : x;  // NaN passes through
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

// Keep the compiler from assuming a value is what it just computed, so a check
// after an injection point (or a real upset) re-reads it.
static inline void opaque(float& x) { asm volatile("" : "+m"(x)); }
static inline void memory_barrier() { asm volatile("" ::: "memory"); }
inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
// The lanes of a float vector as uint32 (their bits).
template <typename V>
struct LaneBits;
template <>
struct LaneBits<vec::f16> {
  using type = vec::u16;
};
template <>
struct LaneBits<vec::f8> {
  using type = vec::u8;
};

// (the fault itself, corrupt(), is in fault_contract.h)

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
}  // namespace vec

}  // namespace
}  // namespace ftattn
