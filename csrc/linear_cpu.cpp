// ftattn.linear on the CPU: y = x W^T + b with the product through the library GEMM
// (torch's: sgemm for fp32; bf16 x bf16 -> fp32 on oneDNN's brgemm where the CPU has bf16
// dot products (gemm16.h), else MKL's bf16 GEMM; MKL's fp16 x fp16 -> fp32 GEMM for fp16;
// so the checks see the fp32 accumulators before bias and the down-cast), checked by row
// checksums over blocks of output features.
//
// The check, per row i of x and block b of block_o output features:
//   sum_{o in b} acc[i, o]  vs  x_i . (W^T e_b)   and
//   sum_{o in b} w_o acc[i, o]  vs  x_i . (W^T w_b)
// (w: checksum_weight, fault_contract.h, of o's place in the block: a warp's +-2^k deltas,
// the same bit of 32 outputs sharing an exponent, can cancel in the plain sum, 290x the harm
// threshold at x = [[1]], W = 1.25, 1.75, ... (found by review); they rarely cancel in both)
// with W^T e_b and W^T w_b cached per weight (ftattn/linear.py: computed in fp64 and kept so, the
// reference then made in fp64; or, for bf16 inputs of many blocks, as bf16 hi + mid + lo parts
// for the same 16-bit GEMM). The bound is statistical, from the data (never a fixed
// number): kappa standard deviations of the rounding of the block's fp32 accumulators,
// kappa sqrt(K) u sqrt(sum_{o in b} ||x_i o W_o||^2) = kappa sqrt(K) u sqrt(x_i^2 . mag_b),
// mag_b = sum_{o in b} W_o^2 cached with the checksums, plus the fp64 reference's rounding
// and an underflow term (ftattn/linear.py check_factor; the bf16 parts' references on
// the bf16 GEMM add their own fp32 rounding: (W^T e_b)^2 in its mag_b). Outlier channels
// of x enter through x_i^2, as in the attention kernel's score bound.
//
// A failed check is settled by ftattn/linear.py (_settle: the product made again, compared
// bit for bit, the weight's checksums made anew). With recompute (this op called directly)
// a failed check recomputes the whole product (one more GEMM; bit-identical to a clean
// call, the GEMM being deterministic) and checks it again: CORRECTED when it passes,
// UNCORRECTED when it fails again.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "fault_contract.h"  // sites, check bits, the fault encoding (ftattn/contract.py)
#include "blas.h"            // gemm_rm: the fp32 GEMM (BLAS sgemm_)
#include "gemm16.h"          // linear_bf16, bf16_gemm_ready (oneDNN brgemm)
#include "vec.h"             // FTATTN_CLONES, the 16-lane vector types

extern "C" {
// MKL's GEMMs with 16-bit inputs and an fp32 result (cblas, LP64). torch's CPU library
// exports them when it links MKL; weak, so a torch without them runs the product on
// fp32 copies instead (slower, as accurate).
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace ftattn {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enums
constexpr double kKappa = 8.0;                                 // standard deviations, as in attention
constexpr double kU32 = 0x1p-24;                               // unit roundoff of fp32
constexpr double kEta = 0x1p-149;                              // absolute error per fp32 multiply-add (underflow)
// up to this many checksum blocks (out <= 16 * 128) fp32 x gets its references per row
// (rows_refs), without the skinny GEMMs; and at any number where the rows are fewer than
// a report block per thread (decode): the skinny GEMMs' fp64 copy of x and their calls
// cost more there (x [1, 1024] . W [2816, 1024]: check 0.05 -> 0.015 ms, measured)
constexpr int64_t kFusedBlocks = 16;
// the weighted checksum's difference past which a row's block is compared with a second
// product (check_block; ftattn/linear.py WEIGHTED_VERIFY, kernels/linear.py)
constexpr double kWeightedVerify = 0.25;

using Gemm16 = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                        float*, int);

Gemm16 gemm16(at::ScalarType st) {
  if (st == at::kBFloat16) return cblas_gemm_bf16bf16f32;
  if (st == at::kHalf) return cblas_gemm_f16f16f32;
  return nullptr;
}

// The underflow term per operation of the product's bounds: 2^-149 (kEta) for fp32, 2^-126
// for 16-bit inputs, whose product runs on a 16-bit GEMM (bf16: oneDNN's brgemm, else MKL's)
// that flushes results below 2^-126 to 0 on AMX / AVX512-BF16 (bf16 x and W of ~2^-64 each
// raised the row check on clean data before).
double product_eta(at::ScalarType st) { return st != at::kFloat ? 0x1p-126 : kEta; }

// Whether a bf16 product of T rows runs on MKL's bf16 GEMM rather than brgemm (gemm16.h):
// on a CPU with AMX, for more than 64 rows. Measured on a 2-core Xeon with AMX-BF16,
// ftattn.linear at protection off over F.linear, paired, brgemm / MKL: [4096, 4096] at T 65
// 2.33 / 1.25, T 512 1.87 / 1.24, T 2048 2.05 / 1.46; MiniLM's [1536, 384] at T 1024
// 3.79 / 2.10; [1024, 2816] at T 512 1.25 / 1.25; at T 16 brgemm's path is the faster (0.79
// / 1.35). On the AMD EPYC (AVX512-BF16, no AMX) MKL's bf16 GEMM runs at sgemm's speed, so
// brgemm keeps every length there.
bool mkl_bf16_rows(int64_t T, Gemm16 fn) {
#if defined(__x86_64__)
  static const bool amx = __builtin_cpu_supports("amx-bf16");
  return amx && fn != nullptr && T > 64;
#else
  return false;
#endif
}

// a [T, K] column-major (a transposed view, as the backward's dY^T: stride (1, ld >= T)),
// which the products and the references (cols_refs) read as it is
inline bool column_major(const at::Tensor& a) {
  return a.dim() == 2 && !a.is_contiguous() && a.stride(0) == 1 && a.stride(1) >= a.size(0) &&
         a.stride(1) < INT_MAX;
}

// fp32 a [T, K] times b^T for b [R, K] (blas.h: IEEE fp32 at any matmul precision).
at::Tensor product_f32(const at::Tensor& a, const at::Tensor& b) {
  const int64_t T = a.size(0), K = a.size(1), R = b.size(0);
  if (T >= INT_MAX || K >= INT_MAX || R >= INT_MAX) return at::mm(a, b.t());
  at::Tensor out = at::empty({T, R}, a.options());
  if (T == 0 || R == 0) return out;
  if (K == 0) return out.zero_();
  const bool a_cols = column_major(a);  // (read as it is)
  const at::Tensor ac = a.is_contiguous() || a_cols ? a : a.contiguous();
  const int64_t lda = a_cols ? a.stride(1) : K;
  if (b.stride(1) == 1 && b.stride(0) >= K && b.stride(0) < INT_MAX) {
    gemm_rm(a_cols, true, false, T, R, K, ac.data_ptr<float>(), lda, b.data_ptr<float>(), b.stride(0),
            out.data_ptr<float>(), R);
  } else if (b.stride(0) == 1 && b.stride(1) >= R && b.stride(1) < INT_MAX) {  // b^T contiguous (a Conv1D weight)
    gemm_rm(a_cols, false, false, T, R, K, ac.data_ptr<float>(), lda, b.data_ptr<float>(), b.stride(1),
            out.data_ptr<float>(), R);
  } else {
    const at::Tensor bc = b.contiguous();
    gemm_rm(a_cols, true, false, T, R, K, ac.data_ptr<float>(), lda, bc.data_ptr<float>(), K,
            out.data_ptr<float>(), R);
  }
  return out;
}

// a [T, K] times b^T for b [R, K] (a row-major, b either way round): fp32 [T, R], the
// accumulators of the library GEMM.
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  const int64_t T = a.size(0), K = a.size(1), R = b.size(0);
  const Gemm16 fn = gemm16(a.scalar_type());
  if (a.scalar_type() == at::kFloat) return product_f32(a, b);
  if (a.scalar_type() == at::kBFloat16 && bf16_gemm_ready() && !mkl_bf16_rows(T, fn)) {  // brgemm (gemm16.h)
    at::Tensor out = at::empty({T, R}, a.options().dtype(at::kFloat));
    if (T == 0 || R == 0) return out;
    if (K == 0) return out.zero_();
    const at::Tensor ac = a.is_contiguous() ? a : a.contiguous();
    const at::Tensor bc = b.stride(1) == 1 && b.stride(0) >= K ? b : b.contiguous();
    linear_bf16(static_cast<const uint16_t*>(ac.data_ptr()), T, K, static_cast<const uint16_t*>(bc.data_ptr()),
                bc.stride(0), R, out.data_ptr<float>());
    return out;
  }
  if (fn == nullptr || T >= INT_MAX || K >= INT_MAX || R >= INT_MAX)
    return product_f32(a.to(at::kFloat), b.to(at::kFloat));
  at::Tensor out = at::empty({T, R}, a.options().dtype(at::kFloat));
  if (T == 0 || R == 0) return out;
  if (K == 0) return out.zero_();
  const bool a_cols = column_major(a);  // (read as it is)
  const at::Tensor ac = a.is_contiguous() || a_cols ? a : a.contiguous();
  at::Tensor bc = b;
  int transb = kTrans, ldb = static_cast<int>(K);
  if (b.stride(1) == 1 && b.stride(0) >= K && b.stride(0) < INT_MAX) {
    ldb = static_cast<int>(b.stride(0));
  } else if (b.stride(0) == 1 && b.stride(1) >= R && b.stride(1) < INT_MAX) {  // b^T contiguous (a Conv1D weight)
    transb = kNoTrans, ldb = static_cast<int>(b.stride(1));
  } else {
    bc = b.contiguous();
  }
  fn(kRowMajor, a_cols ? kTrans : kNoTrans, transb, static_cast<int>(T), static_cast<int>(R), static_cast<int>(K), 1.f,
     static_cast<const uint16_t*>(ac.data_ptr()), static_cast<int>(a_cols ? a.stride(1) : K),
     static_cast<const uint16_t*>(bc.data_ptr()),
     ldb, 0.f, out.data_ptr<float>(), static_cast<int>(R));
  return out;
}

// What the checks compare, per row and block (see the top of the file).
struct CheckRefs {
  float* acc;        // [T, out]; the bias is added to each row once it is checked
  const float* bias;  // [out] or nullptr
  double* ref;   // [T, 2 nb] (plain, weighted) or [T, 3 x 2 nb] (hi + mid + lo of those)
  float* mag;    // [T, 2 nb], of x_i / scale_i
  float* scale;  // [T], powers of two
  const at::Tensor* x;
  int64_t T, out, bo, nb;
  bool split;
  double factor;  // times sqrt(mag)
  double abs;     // underflow
  double sum_u;   // times sum |acc| of a block: the fp32 partial sums of the block sum
  const float* wts;  // [bo]: the weighted sums' weights (checksum_weight of the place in the block)
  // set: the check makes each row's ref, mag and scale first, from the checksums
  // wsum / magc [2 nb, K] (row_refs), in the same pass (x and the row's y read once, one
  // parallel region instead of two)
  const double* wsum = nullptr;
  const float* magc = nullptr;
  // > 0: the harm threshold of the output's dtype, and blind blocks (blind_block) set kBlind
  double tau = 0.0;
};

// A row's block whose check cannot see every harmful fault (kBlind: ftattn/linear.py _settle
// makes the product again and compares the rows): 2 bound > tau max(1, max_o |y_o|), the
// row's harm threshold (FAULT_MODEL.md), for the row's largest bound over its blocks; where
// 2 bound stays below it, a harmful fault moves its block's sum by more than twice the bound,
// which no rounding within the bound hides (a fault that itself raised the row's largest |y|
// leaves a sliver of tau^2 |y| unproven; the Triton kernel, whose programs see one block of
// a row, takes the block's largest |y|: more blind rows, never fewer). Big input channels whose products
// cancel in y (100 x 1 and 100 x -1 at K = 31: faults of 2x the harm threshold inside the
// bound) make such blocks; normal data, x ~ N(0, 1) and W ~ N(0, 1 / K), sit near 0.25 at
// K = 4096 and 0.5 at K = 14336 (4 bound there made every call blind: found by review).
inline bool blind_block(double bound, double tau, double max_abs) {
  return !(2.0 * bound <= tau * std::max(1.0, max_abs));
}

// Row kernels with explicit 16-lane vectors (csrc/vec.h), one clone per ISA: the
// default build targets baseline x86-64, where plain loops stay SSE2 (and a float max
// reduction does not vectorise at all).
typedef uint16_t h16 __attribute__((vector_size(32)));  // 16 bfloat16 bit patterns

FTATTN_VEC_INLINE vec::f16 load16(const float* p) { return vec::load(p); }
FTATTN_VEC_INLINE vec::f16 load16(const uint16_t* p) {  // bfloat16 -> float: the bits, shifted
  h16 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<vec::f16>(__builtin_convertvector(h, vec::u16) << 16);
}
FTATTN_VEC_INLINE void store16(float* p, vec::f16 v) { vec::store(p, v); }
FTATTN_VEC_INLINE void store16(uint16_t* p, vec::f16 v) {  // float -> bfloat16, to nearest even (v: squares)
  vec::u16 u = reinterpret_cast<vec::u16>(v);
  u += 0x7FFFu + ((u >> 16) & 1u);
  const h16 h = __builtin_convertvector(u >> 16, h16);
  std::memcpy(p, &h, sizeof(h));
}
inline float load1(float f) { return f; }
inline float load1(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline void store1(float* o, float v) { *o = v; }
inline void store1(uint16_t* o, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u += 0x7FFFu + ((u >> 16) & 1u);
  *o = static_cast<uint16_t>(u >> 16);
}

// One row: x_j^2 / scale^2 into o, scale a power of two near max_j |x_j| (exact scaling,
// so the squares neither underflow nor overflow; 1 for a zero or non-finite row).
template <typename In, typename Out>
FTATTN_VEC_INLINE float row_squares(const In* __restrict x, int64_t K, Out* __restrict o) {
  using namespace vec;
  f16 mv = f16{};
  int64_t j = 0;
  for (; j + 16 <= K; j += 16) {
    const f16 v = vec::abs(load16(x + j));
    mv = v > mv ? v : mv;  // (NaN never enters: a NaN row's scale comes out 1 or its max)
  }
  float m = hmax(mv);
  for (; j < K; ++j) {
    const float v = std::fabs(load1(x[j]));
    m = v > m ? v : m;
  }
  int e = 0;
  std::frexp(m, &e);  // m = f 2^e, f in [1/2, 1)
  // (2^(1 - e) at most 2^127: a row below 2^-127 gave 2^128 = inf, its squares NaN, and was
  // reported as non-finite input, hiding a fault there; found by review)
  const float inv = (m > 0.f && std::isfinite(m)) ? std::ldexp(1.f, std::min(1 - e, 127)) : 1.f;
  j = 0;
  for (; j + 16 <= K; j += 16) {
    const f16 v = load16(x + j) * inv;
    store16(o + j, v * v);
  }
  for (; j < K; ++j) {
    const float v = load1(x[j]) * inv;
    store1(o + j, v * v);
  }
  return 1.f / inv;
}
#define FTATTN_ROW_SQUARES(name, In, Out)                                                          \
  FTATTN_CLONES float name(const In* x, int64_t K, Out* o) { return row_squares<In, Out>(x, K, o); }
FTATTN_ROW_SQUARES(row_squares_ff, float, float)
FTATTN_ROW_SQUARES(row_squares_fb, float, uint16_t)
FTATTN_ROW_SQUARES(row_squares_bb, uint16_t, uint16_t)
FTATTN_ROW_SQUARES(row_squares_bf, uint16_t, float)
#undef FTATTN_ROW_SQUARES
inline float row_squares_any(const float* x, int64_t K, float* o) { return row_squares_ff(x, K, o); }
inline float row_squares_any(const float* x, int64_t K, uint16_t* o) { return row_squares_fb(x, K, o); }
inline float row_squares_any(const uint16_t* x, int64_t K, uint16_t* o) { return row_squares_bb(x, K, o); }
inline float row_squares_any(const uint16_t* x, int64_t K, float* o) { return row_squares_bf(x, K, o); }
inline float row_squares_any(const at::Half* x, int64_t K, float* o) {  // (fp16: scalar, rare)
  float m = 0.f;
  for (int64_t j = 0; j < K; ++j) m = std::max(m, std::fabs(static_cast<float>(x[j])));
  int e = 0;
  std::frexp(m, &e);
  const float inv = (m > 0.f && std::isfinite(m)) ? std::ldexp(1.f, std::min(1 - e, 127)) : 1.f;
  for (int64_t j = 0; j < K; ++j) o[j] = (static_cast<float>(x[j]) * inv) * (static_cast<float>(x[j]) * inv);
  return 1.f / inv;
}
inline float row_squares_any(const at::Half* x, int64_t K, uint16_t* o) {
  std::vector<float> tmp(K);
  const float sc = row_squares_any(x, K, tmp.data());
  for (int64_t j = 0; j < K; ++j) store1(o + j, tmp[j]);
  return sc;
}

// sum_o a_o and sum_o |a_o| of one block, and the same of w_o a_o (w: the weighted
// checksum's weights, from the block's first output): L fp32 partial sums (one vector of V,
// 16 or 8 lanes) of at most ceil(n / L) terms each, added in fp64: within (ceil(n / 8) + 1) u
// sum |a| of the exact sum (one more u for the weighted products). Then the bias (when given)
// is added to the block in the same pass, and max_o |a_o + bias_o| (y's largest in the block,
// for blind_block) taken.
// (On 16-lane vectors in the AVX2 code the abs and the partials went through the stack:
// the check of x [1024, 384] . W [384, 384] was 10 % of the call there.)
struct BlockSums {
  double sum, sum_abs, wsum, wsum_abs;
  float max_abs;
};
template <typename V>
FTATTN_VEC_INLINE void block_sums_v(float* a, int64_t n, const float* bias, const float* w, BlockSums& r) {
  using namespace vec;
  constexpr int64_t L = Lanes<V>;
  V s = V{}, m = V{}, mx = V{}, ws = V{}, wm = V{};
  int64_t o = 0;
  for (; o + L <= n; o += L) {
    const V v = load_v<V>(a + o);
    s += v;
    m += vec::abs(v);
    const V vw = v * load_v<V>(w + o);
    ws += vw;
    wm += vec::abs(vw);
    const V y = bias != nullptr ? v + load_v<V>(bias + o) : v;
    if (bias != nullptr) store_v(a + o, y);
    const V ya = vec::abs(y);
    mx = ya > mx ? ya : mx;  // (NaN stays out: a NaN row fails its check anyway)
  }
  double t = 0.0, ta = 0.0, tw = 0.0, twa = 0.0;
  float ymax = tree(mx, Max{});
  for (; o < n; ++o) {
    const double v = static_cast<double>(a[o]), vw = v * static_cast<double>(w[o]);
    t += v, ta += std::fabs(v), tw += vw, twa += std::fabs(vw);
    if (bias != nullptr) a[o] += bias[o];
    ymax = std::fabs(a[o]) > ymax ? std::fabs(a[o]) : ymax;
  }
  r.max_abs = ymax;
  // the partials in fp64, as a tree (16 dependent scalar adds were a third of this
  // function's time)
  r.sum = t + hsum(widen_sum(s));
  r.sum_abs = ta + hsum(widen_sum(m));
  r.wsum = tw + hsum(widen_sum(ws));
  r.wsum_abs = twa + hsum(widen_sum(wm));
}
FTATTN_CLONES void block_sums(float* a, int64_t n, const float* bias, const float* w, BlockSums& r) {
  if (wide_vectors())
    block_sums_v<vec::f16>(a, n, bias, w, r);
  else
    block_sums_v<vec::f8>(a, n, bias, w, r);
}

// The references of one row without a GEMM (few checksum blocks: x is read once, from L1,
// instead of streamed through two skinny GEMMs and a buffer of squares):
// ref_b = x . wsum_b in fp64 lanes (wsum fp64: products of fp32 values exact, summed in
// fp64) and mag_b = (x / scale)^2 . magc_b in fp32 lanes (16 or 8: vec::Lanes; the rounding
// statistics of a GEMM's dot product, or better) for each of nb blocks.
// Blocks go G at a time, 2 G independent accumulators: one block at a time was bound by
// the add latency (perf: a quarter of the FMA throughput). Returns scale.
// (On vectors of the clone's width, V: a 16-lane max went lane by lane through the stack in
// the AVX2 code and the 2 G 16-lane accumulators spilled there; the check of a MiniLM-shaped
// layer, x [1024, 384] . W [384, 384], cost 36 % of the product on AVX2 against 11 % on AVX-512.)
template <typename V>
FTATTN_VEC_INLINE V load_in(const float* p) {
  return vec::load_v<V>(p);
}
template <typename V>
FTATTN_VEC_INLINE V load_in(const uint16_t* p) {  // bfloat16 -> float: the bits, shifted
  if constexpr (vec::Lanes<V> == 16) {
    return load16(p);
  } else {
    typedef uint16_t h8 __attribute__((vector_size(16)));
    h8 h;
    std::memcpy(&h, p, sizeof(h));
    return reinterpret_cast<V>(__builtin_convertvector(h, vec::u8) << 16);
  }
}

// r += the lanes of v times the fp64 values at w (exact products), on 8 fp64 lanes: the
// low and high halves of 16 lanes into two accumulators (one dependency chain each)
template <typename V>
FTATTN_VEC_INLINE void add_times_fp64(V v, const double* __restrict w, vec::d8& r0, vec::d8& r1) {
  vec::d8 a;
  std::memcpy(&a, w, sizeof(a));
  if constexpr (vec::Lanes<V> == 16) {
    vec::d8 lo, hi, b;
    vec::halves(__builtin_convertvector(v, vec::d16), lo, hi);
    std::memcpy(&b, w + 8, sizeof(b));
    r0 += lo * a;
    r1 += hi * b;
  } else {
    r0 += __builtin_convertvector(v, vec::d8) * a;
  }
}

template <int G, typename V, typename In>
FTATTN_VEC_INLINE void row_refs_group(const In* __restrict x, int64_t K, float inv, const double* __restrict wsum,
                                      const float* __restrict magc, double* __restrict ref, float* __restrict mag) {
  using namespace vec;
  constexpr int64_t L = Lanes<V>;
  d8 r0[G], r1[G];
  V q[G];
  for (int g = 0; g < G; ++g) r0[g] = r1[g] = d8{}, q[g] = V{};
  int64_t j = 0;
  for (; j + L <= K; j += L) {
    const V v = load_in<V>(x + j), vs = v * inv, v2 = vs * vs;
    for (int g = 0; g < G; ++g) {
      add_times_fp64(v, wsum + g * K + j, r0[g], r1[g]);
      q[g] += v2 * load_v<V>(magc + g * K + j);
    }
  }
  for (int g = 0; g < G; ++g) {
    double rt = hsum(r0[g] + r1[g]);
    float qt = tree(q[g], Add{});
    for (int64_t t = j; t < K; ++t) {
      const float v = load1(x[t]), vs = v * inv;
      rt += static_cast<double>(v) * wsum[g * K + t];
      qt += vs * vs * magc[g * K + t];
    }
    ref[g] = rt;
    mag[g] = qt;
  }
}

// 1 / the power of two near m = a row's largest |x_j|, which scales its squares (exact); 1 for
// a zero or non-finite m
inline float inv_scale(float m) {
  int e = 0;
  std::frexp(m, &e);
  return (m > 0.f && std::isfinite(m)) ? std::ldexp(1.f, std::min(1 - e, 127)) : 1.f;
}

// The power of two near a row's largest |x_j| whose inverse scales the squares (exact: row_refs).
template <typename V, typename In>
FTATTN_VEC_INLINE float row_inv(const In* __restrict x, int64_t K) {
  using namespace vec;
  constexpr int64_t L = Lanes<V>;
  // (four running maxima: one was bound by its latency)
  V m0 = V{}, m1 = V{}, m2 = V{}, m3 = V{};
  int64_t j = 0;
  for (; j + 4 * L <= K; j += 4 * L) {
    const V v0 = vec::abs(load_in<V>(x + j)), v1 = vec::abs(load_in<V>(x + j + L));
    const V v2 = vec::abs(load_in<V>(x + j + 2 * L)), v3 = vec::abs(load_in<V>(x + j + 3 * L));
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
    m2 = v2 > m2 ? v2 : m2;
    m3 = v3 > m3 ? v3 : m3;
  }
  for (; j + L <= K; j += L) {
    const V v = vec::abs(load_in<V>(x + j));
    m0 = v > m0 ? v : m0;
  }
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  m0 = m2 > m0 ? m2 : m0;
  float m = tree(m0, Max{});
  for (; j < K; ++j) {
    const float v = std::fabs(load1(x[j]));
    m = v > m ? v : m;
  }
  return inv_scale(m);
}

template <typename V, typename In>
FTATTN_VEC_INLINE float row_refs(const In* __restrict x, int64_t K, const double* __restrict wsum,
                                 const float* __restrict magc, int64_t nb, double* __restrict ref,
                                 float* __restrict mag) {
  const float inv = row_inv<V>(x, K);
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) row_refs_group<4, V>(x, K, inv, wsum + b * K, magc + b * K, ref + b, mag + b);
  if (nb - b == 3) row_refs_group<3, V>(x, K, inv, wsum + b * K, magc + b * K, ref + b, mag + b);
  if (nb - b == 2) row_refs_group<2, V>(x, K, inv, wsum + b * K, magc + b * K, ref + b, mag + b);
  if (nb - b == 1) row_refs_group<1, V>(x, K, inv, wsum + b * K, magc + b * K, ref + b, mag + b);
  return 1.f / inv;
}
// row_refs for n rows of x [n, K] (a report block's, up to 64) and the checksum columns
// c0 .. c1, the input features in chunks of kRefsChunk: the rows' chunk converted once (fp64
// x and fp32 (x / scale)^2, into a buffer), then R rows at a time run over every pair of
// columns (their chunk, fp64 wsum and fp32 magc, 12 bytes per column and feature, in L2),
// and each chunk's dot products are added to the row's ref (fp64) and mag (fp32). Row by
// row, each row streamed all of wsum and magc (3 MB at W [4096, 4096]) from L3 and
// converted x once per group of columns; the check of x [1024, 384] . W [1536, 384] bf16
// took 0.85 ms against 0.63 ms now, the references of x [64, 1024] . W [2816, 1024] fp32
// 0.33 ms against 0.19 (paired calls, abft / off 1.18 -> 1.11). The order of the sums is
// fixed by K alone: the same bits at any thread count.
constexpr int64_t kRefsChunk = 256;
// up to this many checksum columns (out <= 512), row_refs row by row: the chunks' buffer
// costs more than it saves there (x [1024, 1536] . W [384, 1536] fp32, 6 columns: check
// 0.65 ms row by row, 1.04 in chunks; measured)
constexpr int64_t kRowRefsColumns = 8;
struct RefsScratch {
  std::vector<double> xd;  // [n][chunk] fp64 x
  std::vector<float> x2;   // [n][chunk] (x / scale)^2
};
template <int R, typename V>
FTATTN_VEC_INLINE void refs_chunk(const double* __restrict xd, const float* __restrict x2, int64_t n,
                                  const double* __restrict w, const float* __restrict mc, int64_t K,
                                  double* __restrict ref, float* __restrict mag, int64_t nc) {
  using namespace vec;
  constexpr int64_t L = Lanes<V>;
  d8 r0[R][2], r1[R][2];
  V q[R][2];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 2; ++g) r0[r][g] = r1[r][g] = d8{}, q[r][g] = V{};
  for (int64_t j = 0; j < n; j += L)
    for (int r = 0; r < R; ++r) {
      const V v2 = load_v<V>(x2 + r * kRefsChunk + j);
      const double* xr = xd + r * kRefsChunk + j;
      for (int g = 0; g < 2; ++g) {
        d8 xa, wa;
        std::memcpy(&xa, xr, sizeof(xa));
        std::memcpy(&wa, w + g * K + j, sizeof(wa));
        r0[r][g] += xa * wa;
        if constexpr (L == 16) {
          d8 xb, wb;
          std::memcpy(&xb, xr + 8, sizeof(xb));
          std::memcpy(&wb, w + g * K + j + 8, sizeof(wb));
          r1[r][g] += xb * wb;
        }
        q[r][g] += v2 * load_v<V>(mc + g * K + j);
      }
    }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 2; ++g) {
      ref[r * nc + g] += hsum(r0[r][g] + r1[r][g]);
      mag[r * nc + g] += tree(q[r][g], Add{});
    }
}
template <int R, typename V, typename In>
FTATTN_VEC_INLINE void rows_refs(const In* __restrict x, int64_t rows, int64_t K, const double* __restrict wsum,
                                 const float* __restrict magc, int64_t nc, int64_t c0, int64_t c1,
                                 double* __restrict ref, float* __restrict mag, float* __restrict scale) {
  using namespace vec;
  constexpr int64_t L = Lanes<V>;
  static thread_local RefsScratch buf;
  std::vector<float> inv(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    inv[r] = row_inv<V>(x + r * K, K);
    if (c0 == 0) scale[r] = 1.f / inv[r];
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(ref + r * nc + c0, ref + r * nc + c1, 0.0);
    std::fill(mag + r * nc + c0, mag + r * nc + c1, 0.f);
  }
  const int64_t kv = K - K % L;  // the vector part; the rest is each row's scalar tail
  if (buf.xd.size() < static_cast<size_t>(rows * kRefsChunk)) {
    buf.xd.resize(rows * kRefsChunk);
    buf.x2.resize(rows * kRefsChunk);
  }
  double* xd = buf.xd.data();
  float* x2 = buf.x2.data();
  for (int64_t j0 = 0; j0 < kv; j0 += kRefsChunk) {
    const int64_t n = std::min(kRefsChunk, kv - j0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; j += L) {
        const V v = load_in<V>(x + r * K + j0 + j), vs = v * inv[r];
        if constexpr (L == 16) {
          d8 lo, hi;
          halves(__builtin_convertvector(v, d16), lo, hi);
          std::memcpy(xd + r * kRefsChunk + j, &lo, sizeof(lo));
          std::memcpy(xd + r * kRefsChunk + j + 8, &hi, sizeof(hi));
        } else {
          const d8 d = __builtin_convertvector(v, d8);
          std::memcpy(xd + r * kRefsChunk + j, &d, sizeof(d));
        }
        store_v(x2 + r * kRefsChunk + j, vs * vs);
      }
    // (R rows' chunk, 12 R KB, stays in L1 while every pair of columns passes; the columns'
    // chunk, 12 nc KB, in L2)
    int64_t r = 0;
    for (; r + R <= rows; r += R)
      for (int64_t b = c0; b < c1; b += 2)  // (nc = 2 nb, c0 and c1: even)
        refs_chunk<R, V>(xd + r * kRefsChunk, x2 + r * kRefsChunk, n, wsum + b * K + j0, magc + b * K + j0, K,
                         ref + r * nc + b, mag + r * nc + b, nc);
    for (; r < rows; ++r)
      for (int64_t b = c0; b < c1; b += 2)
        refs_chunk<1, V>(xd + r * kRefsChunk, x2 + r * kRefsChunk, n, wsum + b * K + j0, magc + b * K + j0, K,
                         ref + r * nc + b, mag + r * nc + b, nc);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t col = c0; col < c1; ++col) {
      double rt = ref[r * nc + col];
      float qt = mag[r * nc + col];
      for (int64_t t = kv; t < K; ++t) {
        const float v = load1(x[r * K + t]), vs = v * inv[r];
        rt += static_cast<double>(v) * wsum[col * K + t];
        qt += vs * vs * magc[col * K + t];
      }
      ref[r * nc + col] = rt;
      mag[r * nc + col] = qt;
    }
}
template <typename In>
FTATTN_VEC_INLINE void rows_refs_n(const In* x, int64_t n, int64_t K, const double* w, const float* m, int64_t nc,
                                   int64_t c0, int64_t c1, double* r, float* q, float* scale) {
  if (nc <= kRowRefsColumns) {  // (few columns: row by row, x converted in registers)
    for (int64_t i = 0; i < n; ++i)
      if (c0 == 0)
        scale[i] = wide_vectors() ? row_refs<vec::f16>(x + i * K, K, w, m, nc, r + i * nc, q + i * nc)
                                  : row_refs<vec::f8>(x + i * K, K, w, m, nc, r + i * nc, q + i * nc);
    return;
  }
  // (4 rows at a time on 16-lane registers: 24 accumulators; 2 on 8-lane ones, where a fp64 d8 is two)
  for (int64_t i = 0; i < n; i += kReportBlockM) {
    const int64_t rows = std::min(kReportBlockM, n - i);
    if (wide_vectors())
      rows_refs<4, vec::f16>(x + i * K, rows, K, w, m, nc, c0, c1, r + i * nc, q + i * nc, scale + i);
    else
      rows_refs<2, vec::f8>(x + i * K, rows, K, w, m, nc, c0, c1, r + i * nc, q + i * nc, scale + i);
  }
}
FTATTN_CLONES void rows_refs_f(const float* x, int64_t n, int64_t K, const double* w, const float* m, int64_t nc,
                              int64_t c0, int64_t c1, double* r, float* q, float* scale) {
  rows_refs_n(x, n, K, w, m, nc, c0, c1, r, q, scale);
}
FTATTN_CLONES void rows_refs_b(const uint16_t* x, int64_t n, int64_t K, const double* w, const float* m,
                              int64_t nc, int64_t c0, int64_t c1, double* r, float* q, float* scale) {
  rows_refs_n(x, n, K, w, m, nc, c0, c1, r, q, scale);
}
// Rows i0 .. i1 of x (contiguous [T, K], any supported dtype): their references and scales
// (rows_refs; fp16 row by row, through fp32).
// (columns c0 .. c1 of nc, even; fp16 all of them)
void rows_refs_any(const at::Tensor& x, int64_t i0, int64_t i1, const double* w, const float* m, int64_t nc,
                   double* ref, float* mag, float* scale, int64_t c0 = 0, int64_t c1 = -1) {
  const int64_t K = x.size(1);
  if (c1 < 0) c1 = nc;
  switch (x.scalar_type()) {
    case at::kBFloat16:
      rows_refs_b(reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()) + i0 * K, i1 - i0, K, w, m, nc,
                  c0, c1, ref + i0 * nc, mag + i0 * nc, scale + i0);
      return;
    case at::kHalf: {  // (fp16: rare; each row converted to fp32 first)
      std::vector<float> xf(static_cast<size_t>(K));
      const at::Half* xh = x.const_data_ptr<at::Half>();
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = 0; j < K; ++j) xf[j] = static_cast<float>(xh[i * K + j]);
        rows_refs_f(xf.data(), 1, K, w, m, nc, c0, c1, ref + i * nc, mag + i * nc, scale + i);
      }
      return;
    }
    default:
      rows_refs_f(x.const_data_ptr<float>() + i0 * K, i1 - i0, K, w, m, nc, c0, c1, ref + i0 * nc, mag + i0 * nc,
                  scale + i0);
  }
}

// The references of rows of x given column-major, x = A^T for A [K, ld] row-major (x_i the
// i-th column of A: the backward's dW = dY^T X, whose x is dY^T), without the transposed copy
// of x that the row kernels need (0.2 ms of dW's 1.85 at dY [256, 1024] fp32, measured): the
// L rows i .. i + L - 1 in the lanes of one vector, input feature t their L contiguous values
// in row t of A, times a broadcast of each checksum column's wsum / magc at t. The same sums
// as row_refs (ref in fp64 of exact products, mag in fp32 of (x_i / scale_i)^2, scale_i the
// power of two of row_inv), in another order: per lane over t, chunks of kRefsChunk summed
// apart and their totals added in turn (fixed by K: the same bits at any thread count).
// G columns per pass over the chunk (3 G accumulators: 24 of 32 registers on 16 lanes).
template <int G, typename V, typename In>
FTATTN_VEC_INLINE void cols_refs_group(const In* __restrict a, int64_t ld, int64_t K, V inv,
                                       const double* __restrict wsum, const float* __restrict magc,
                                       double* __restrict ref_t, float* __restrict mag_t) {
  using namespace vec;
  constexpr int64_t L = Lanes<V>;
  for (int64_t t0 = 0; t0 < K; t0 += kRefsChunk) {
    const int64_t t1 = std::min(K, t0 + kRefsChunk);
    d8 r0[G], r1[G];
    V q[G];
    for (int g = 0; g < G; ++g) r0[g] = r1[g] = d8{}, q[g] = V{};
    for (int64_t t = t0; t < t1; ++t) {
      const V v = load_in<V>(a + t * ld), vs = v * inv, v2 = vs * vs;
      d8 lo, hi;
      if constexpr (L == 16)
        halves(__builtin_convertvector(v, d16), lo, hi);
      else
        lo = __builtin_convertvector(v, d8), hi = d8{};
      for (int g = 0; g < G; ++g) {
        const double w = wsum[g * K + t];
        r0[g] += lo * w;
        if constexpr (L == 16) r1[g] += hi * w;
        q[g] += v2 * magc[g * K + t];
      }
    }
    for (int g = 0; g < G; ++g) {
      alignas(64) double rl[16];
      alignas(64) float ql[16];
      std::memcpy(rl, &r0[g], sizeof(d8));
      std::memcpy(rl + 8, &r1[g], sizeof(d8));
      std::memcpy(ql, &q[g], sizeof(V));
      for (int64_t l = 0; l < L; ++l) ref_t[g * L + l] += rl[l], mag_t[g * L + l] += ql[l];
    }
  }
}
template <typename V, typename In>
FTATTN_VEC_INLINE void cols_refs(const In* __restrict x, int64_t ld, int64_t K, int64_t i0, int64_t i1,
                                 const double* __restrict wsum, const float* __restrict magc, int64_t nc,
                                 double* __restrict ref, float* __restrict mag, float* __restrict scale) {
  using namespace vec;
  constexpr int64_t L = Lanes<V>;
  constexpr int G = L == 16 ? 8 : 4;
  static thread_local std::vector<In> pad;  // a last group of fewer than L rows, zero-padded [K, L]
  alignas(64) double ref_t[G * 16];
  alignas(64) float mag_t[G * 16], inv_l[16];
  for (int64_t i = i0; i < i1; i += L) {
    const int64_t n = std::min(L, i1 - i);
    const In* a = x + i;
    int64_t lda = ld;
    if (n < L) {
      pad.assign(static_cast<size_t>(K * L), In{});
      for (int64_t t = 0; t < K; ++t)
        for (int64_t l = 0; l < n; ++l) pad[t * L + l] = x[t * ld + i + l];
      a = pad.data(), lda = L;
    }
    // row_inv's scale per lane: the largest |x_it| over t (NaN skipped)
    V m = V{};
    for (int64_t t = 0; t < K; ++t) {
      const V v = vec::abs(load_in<V>(a + t * lda));
      m = v > m ? v : m;
    }
    std::memcpy(inv_l, &m, sizeof(V));
    for (int64_t l = 0; l < L; ++l) {
      inv_l[l] = inv_scale(inv_l[l]);
      if (l < n) scale[i + l] = 1.f / inv_l[l];
    }
    V inv;
    std::memcpy(&inv, inv_l, sizeof(V));
    const auto emit = [&](int64_t c, int g_n) {
      for (int g = 0; g < g_n; ++g)
        for (int64_t l = 0; l < n; ++l)
          ref[(i + l) * nc + c + g] = ref_t[g * L + l], mag[(i + l) * nc + c + g] = mag_t[g * L + l];
    };
    int64_t c = 0;
    for (; c + G <= nc; c += G) {
      std::fill(ref_t, ref_t + G * L, 0.0);
      std::fill(mag_t, mag_t + G * L, 0.f);
      cols_refs_group<G, V>(a, lda, K, inv, wsum + c * K, magc + c * K, ref_t, mag_t);
      emit(c, G);
    }
    for (; c + 2 <= nc; c += 2) {  // (nc = 2 nb: even)
      std::fill(ref_t, ref_t + 2 * L, 0.0);
      std::fill(mag_t, mag_t + 2 * L, 0.f);
      cols_refs_group<2, V>(a, lda, K, inv, wsum + c * K, magc + c * K, ref_t, mag_t);
      emit(c, 2);
    }
  }
}
template <typename In>
FTATTN_VEC_INLINE void cols_refs_lanes(const In* x, int64_t ld, int64_t K, int64_t i0, int64_t i1, const double* w,
                                       const float* m, int64_t nc, double* r, float* q, float* scale) {
  if (wide_vectors())
    cols_refs<vec::f16>(x, ld, K, i0, i1, w, m, nc, r, q, scale);
  else
    cols_refs<vec::f8>(x, ld, K, i0, i1, w, m, nc, r, q, scale);
}
FTATTN_CLONES void cols_refs_f(const float* x, int64_t ld, int64_t K, int64_t i0, int64_t i1, const double* w,
                              const float* m, int64_t nc, double* r, float* q, float* scale) {
  cols_refs_lanes(x, ld, K, i0, i1, w, m, nc, r, q, scale);
}
FTATTN_CLONES void cols_refs_b(const uint16_t* x, int64_t ld, int64_t K, int64_t i0, int64_t i1, const double* w,
                              const float* m, int64_t nc, double* r, float* q, float* scale) {
  cols_refs_lanes(x, ld, K, i0, i1, w, m, nc, r, q, scale);
}
// x [T, K] column-major (stride (1, ld)), fp32 or bf16: every row's references, rows in
// parallel, L at a time (cols_refs).
void cols_refs_any(const at::Tensor& x, const double* w, const float* m, int64_t nc, double* ref, float* mag,
                   float* scale) {
  const int64_t T = x.size(0), K = x.size(1), ld = x.stride(1), L = vector_lanes();
  const int64_t groups = (T + L - 1) / L;
  at::parallel_for(0, groups, std::max<int64_t>(1, (int64_t{1} << 12) / std::max<int64_t>(K * nc, 1)),
                   [&](int64_t g0, int64_t g1) {
                     const int64_t i0 = g0 * L, i1 = std::min(T, g1 * L);
                     if (x.scalar_type() == at::kBFloat16)
                       cols_refs_b(reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()), ld, K, i0,
                                   i1, w, m, nc, ref, mag, scale);
                     else
                       cols_refs_f(x.const_data_ptr<float>(), ld, K, i0, i1, w, m, nc, ref, mag, scale);
                   });
}

// x_i^2 / scale_i^2 into x2 (float, or bfloat16 bits), the scales into scale; rows in parallel.
template <typename In, typename Out>
void scaled_squares(const In* x, int64_t T, int64_t K, Out* x2, float* scale) {
  at::parallel_for(0, T, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) scale[i] = row_squares_any(x + i * K, K, x2 + i * K);
  });
}

template <typename In>
void scaled_squares_to(const In* x, int64_t T, int64_t K, at::Tensor& x2, float* scale) {
  if (x2.scalar_type() == at::kFloat)
    scaled_squares(x, T, K, x2.data_ptr<float>(), scale);
  else
    scaled_squares(x, T, K, reinterpret_cast<uint16_t*>(x2.data_ptr<at::BFloat16>()), scale);
}

bool row_finite(const at::Tensor& x, int64_t i) { return at::isfinite(x[i]).all().item<bool>(); }

// The check bits of report block blk (rows blk * kReportBlockM ...).
int32_t check_block(const CheckRefs& c, int64_t blk) {
  int32_t bits = 0;
  const int64_t i1 = std::min<int64_t>(c.T, (blk + 1) * kReportBlockM);
  const int64_t nc = 2 * c.nb;  // checksum columns: nb plain, nb weighted
  const int64_t ref_ld = c.split ? 3 * nc : nc;
  if (c.wsum != nullptr) rows_refs_any(*c.x, blk * kReportBlockM, i1, c.wsum, c.magc, nc, c.ref, c.mag, c.scale);
  for (int64_t i = blk * kReportBlockM; i < i1; ++i) {
    float* a = c.acc + i * c.out;
    const double sc = static_cast<double>(c.scale[i]);
    bool bad = false, nonfinite_ref = false, blind = false, near = false;
    double worst = 0.0, row_max = 0.0;  // the row's largest bound and |y| (blind_block)
    for (int64_t b = 0; b < c.nb; ++b) {
      const int64_t o0 = b * c.bo, o1 = std::min(c.out, o0 + c.bo);
      BlockSums bs;
      block_sums(a + o0, o1 - o0, c.bias != nullptr ? c.bias + o0 : nullptr, c.wts, bs);
      row_max = std::max(row_max, static_cast<double>(bs.max_abs));
      // the plain column b, then the weighted one nb + b
      for (int w = 0; w < 2; ++w) {
        const int64_t col = b + w * c.nb;
        const double s = w ? bs.wsum : bs.sum, sa = w ? bs.wsum_abs : bs.sum_abs;
        double r = c.ref[i * ref_ld + col];
        if (c.split) r += c.ref[i * ref_ld + nc + col] + c.ref[i * ref_ld + 2 * nc + col];
        const double m = static_cast<double>(c.mag[i * nc + col]);
        if ((!std::isfinite(m) || !std::isfinite(r)) && std::isfinite(s)) {
          // finite x and W (NaN or Inf in either reaches the block's sum s) whose magnitudes
          // overflow fp32 (|W| from ~1e18: sum_o W_o^2), or 0 x inf, or whose checksums
          // overflow bf16's parts (|W| ~ 1e37): no bound or no reference (an infinite bound
          // passed any fault; the row was reported as non-finite input: found by review); the
          // block is blind, a second product decides (whatever the row's other blocks: a row
          // whose sums overflow elsewhere is reported as non-finite input, and this keeps its
          // fault in sight: x86-64-v3 build, bf16 W of 1e37)
          blind = true;
          continue;
        }
        if (!std::isfinite(r)) nonfinite_ref = true;
        // (a non-finite sum fails however large its bound: sum |acc| is then infinite too)
        const double bound = c.factor * std::sqrt(m) * sc + c.abs + (w ? c.sum_u + kU32 : c.sum_u) * sa;
        if (!(std::fabs(s - r) <= bound) || !std::isfinite(s)) bad = true;
        // a weighted difference above kWeightedVerify of its bound: a warp whose deltas cancel in
        // the plain sum may leave only that much here (review: 0.9 of it, K = 4097, 2x the harm
        // threshold); clean rows sit below 0.15 of it (normal data, K 256..14336), 0.25 on
        // constant data. Blind: _settle compares a second product.
        if (w && !(std::fabs(s - r) <= kWeightedVerify * bound)) near = true;
        worst = std::max(worst, bound);
      }
    }
    if (c.tau > 0.0 && (blind || (!bad && (near || blind_block(worst, c.tau, row_max))))) bits |= kBlind;
    // a failed comparison on non-finite x (or a weight with NaN/Inf: its checksums are
    // not finite) is bad input, not a fault
    if (bad) bits |= (nonfinite_ref || !row_finite(*c.x, i)) ? kNonfiniteInput : kGemmRowChecksum;
  }
  return bits;
}

void check_all(const CheckRefs& c, int32_t* flags, int64_t nblk) {
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) flags[blk] = check_block(c, blk);
  });
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& ref_cols,
                                                  const std::optional<at::Tensor>& mag_cols, int64_t block_o,
                                                  int64_t protection, bool recompute,
                                                  std::optional<at::IntArrayRef> fault,
                                                  std::optional<double> fault_value) {
  // (the kernel's own ATen calls, views included, skip autograd and view tracking: ~1 us a call)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2, "ftattn.linear: x must be [..., in] and weight [out, in], got ",
              x.sizes(), " and ", weight.sizes());
  const int64_t K = x.size(-1), out = weight.size(0);
  int64_t T = 1;  // the rows: x's leading dims flattened
  for (int64_t d = 0; d + 1 < x.dim(); ++d) T *= x.size(d);
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end() - 1);
  y_shape.push_back(out);
  TORCH_CHECK(weight.size(1) == K, "ftattn.linear: x has ", K, " features, weight ", weight.sizes(), " takes ",
              weight.size(1));
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "ftattn.linear: dtype must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(weight.scalar_type() == st, "ftattn.linear: x and weight must share one dtype, got ", st, " and ",
              weight.scalar_type());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out && bias->scalar_type() == st,
                "ftattn.linear: bias must be [", out, "] of dtype ", st, ", got ", bias->sizes(), " ",
                bias->scalar_type());
  TORCH_CHECK(protection >= 0 && protection <= 2, "ftattn.linear: protection ", protection,
              " must be 0 (off) or 1 / 2 (abft)");
  const bool checked = protection >= 1;
  const int64_t nb = out > 0 && block_o > 0 ? (out + block_o - 1) / block_o : 0;
  if (checked) {
    TORCH_CHECK(block_o >= 1, "ftattn.linear: block_o must be >= 1, got ", block_o);
    TORCH_CHECK(ref_cols.has_value() && mag_cols.has_value(),
                "ftattn.linear: protection needs the weight's checksums (ref_cols, mag_cols)");
    const bool split = ref_cols->scalar_type() != at::kDouble;
    TORCH_CHECK(ref_cols->dim() == 2 && ref_cols->size(0) == (split ? 6 * nb : 2 * nb) && ref_cols->size(1) == K &&
                    (!split || ref_cols->scalar_type() == st),
                "ftattn.linear: ref_cols ", ref_cols->sizes(), " ", ref_cols->scalar_type(),
                " do not match the weight's checksums for block_o ", block_o,
                " (fp64 [2 nb, K], or hi + mid + lo parts [3 x 2 nb, K] in the weight's dtype; ",
                "ftattn.linear.weight_checksums makes them)");
    TORCH_CHECK(mag_cols->dim() == 2 && mag_cols->size(0) == 2 * nb && mag_cols->size(1) == K &&
                    (mag_cols->scalar_type() == at::kFloat || (split && mag_cols->scalar_type() == st)),
                "ftattn.linear: mag_cols ", mag_cols->sizes(), " ", mag_cols->scalar_type(),
                " do not match the weight's checksums for block_o ", block_o,
                " ([2 nb, K], float32, or in the weight's dtype with hi + mid + lo ref_cols; "
                "ftattn.linear.weight_checksums makes them)");
  }
  FaultSpec f;
  if (fault.has_value()) {
    const std::string fault_error = parse_fault(*fault, fault_value, f);
    TORCH_CHECK(fault_error.empty(), "ftattn.linear: ", fault_error);
    TORCH_CHECK(f.site == kGemm || f.site == kWeight, "ftattn.linear: fault site ", f.site, " must be ", kGemm,
                " (gemm) or ", kWeight, " (weight)");
    TORCH_CHECK(f.batch == 0 && f.head == 0, "ftattn.linear: fault batch and head must be 0");
    if (f.site == kGemm) {
      TORCH_CHECK(f.row >= 0 && f.row < T && f.col >= 0 && f.col < out, "ftattn.linear: gemm fault at (", f.row,
                  ", ", f.col, ") is outside y [", T, ", ", out, "]");
    } else {
      TORCH_CHECK(f.row >= 0 && f.row < out && f.dim >= 0 && f.dim < K, "ftattn.linear: weight fault at (", f.row,
                  ", ", f.dim, ") is outside weight [", out, ", ", K, "]");
    }
  }
  // (each ATen call below is a dispatch of ~0.3 us: a decode step's GEMV is tens of us, so
  // the common case, 2-D contiguous fp32 operands, makes none it does not need)
  const auto contiguous = [](const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); };
  const int64_t nblk = (T + kReportBlockM - 1) / kReportBlockM;
  const bool checkable = checked && T > 0 && out > 0 && K > 0;  // (K = 0: y is the bias, exactly)
  const bool split = checkable && ref_cols->scalar_type() != at::kDouble;
  // fp64 checksums: per row without a GEMM (16-bit x, or few blocks); else skinny GEMMs
  // through the library (fp32 x and many blocks: fp64; the bf16 hi + mid + lo parts: the bf16 GEMM)
  const bool fused =
      checkable && !split && mag_cols->scalar_type() == at::kFloat && (st != at::kFloat || nb <= kFusedBlocks || nblk < at::get_num_threads());
  // fp32 or bf16 x column-major (a transposed view: the backward's dY^T) read as it is where
  // the references are made per row (cols_refs) or none are: the product takes it transposed
  // (sgemm, MKL's bf16 GEMM; brgemm copies it)
  const bool x_cols = (st == at::kFloat || st == at::kBFloat16) && column_major(x) && (!checkable || fused);
  const at::Tensor xc = x_cols ? x : contiguous(x.dim() == 2 ? x : x.reshape({T, K}));
  // the weight as this call's product reads it: a weight fault hits the value read
  at::Tensor w_read = weight;
  if (f.active && f.site == kWeight) {
    w_read = weight.clone();
    for (int64_t d = f.dim; d < std::min(K, f.dim + f.ndims); ++d) {
      const float w = w_read[f.row][d].item<float>();
      w_read[f.row][d] = corrupt(w, f.bit, f.value);
    }
  }
  at::Tensor acc = product(xc, w_read);
  if (f.active && f.site == kGemm) {
    float* p = acc.data_ptr<float>() + f.row * out;
    for (int64_t o = f.col; o < std::min(out, f.col + f.ncols); ++o) p[o] = corrupt(p[o], f.bit, f.value);
  }
  const at::Tensor bias_f = !bias.has_value()                  ? at::Tensor()
                            : bias->scalar_type() == at::kFloat ? contiguous(*bias)
                                                                : bias->to(at::kFloat).contiguous();
  bool bias_added = false;
  at::Tensor flags = at::empty({1, 1, nblk}, x.options().dtype(at::kInt));
  std::memset(flags.data_ptr<int32_t>(), 0, sizeof(int32_t) * static_cast<size_t>(nblk));
  if (checkable) {
    // x_i^2 with each row scaled by a power of two near its largest |x_ij| (exact), so the
    // squares neither underflow (x ~ 1e-30) nor overflow; the bound takes the scale back
    // (fused: one buffer of the scales [T] and mag [T, 2 nb], ref [T, 2 nb] in fp64)
    const int64_t nc = 2 * nb;  // checksum columns: nb plain, nb weighted
    // (a few rows, fused: these buffers kept per calling thread; two allocations were ~0.6 us of a
    // decode call's ~8, x [1, 64] . W [64, 64])
    static thread_local std::vector<float> sc_kept;
    static thread_local std::vector<double> ref_kept;
    const bool kept = fused && T * (nc + 1) <= (int64_t{1} << 14);
    if (kept && static_cast<int64_t>(sc_kept.size()) < T * (nc + 1)) sc_kept.resize(static_cast<size_t>(T * (nc + 1)));
    if (kept && static_cast<int64_t>(ref_kept.size()) < T * nc) ref_kept.resize(static_cast<size_t>(T * nc));
    at::Tensor row_scale = kept ? at::Tensor() : at::empty({fused ? T * (nc + 1) : T}, xc.options().dtype(at::kFloat));
    float* sc = kept ? sc_kept.data() : row_scale.data_ptr<float>();
    at::Tensor ref = fused && !kept ? at::empty({T, nc}, xc.options().dtype(at::kDouble)) : at::Tensor(), mag;
    double* refp = kept ? ref_kept.data() : fused ? ref.data_ptr<double>() : nullptr;
    float* magp = sc + T;
    at::Tensor wc, mc;  // (fused: the checksums the check reads; made per row in check_all)
    if (fused) {
      wc = contiguous(*ref_cols), mc = contiguous(*mag_cols);
    } else {
      ref = split ? product(xc, *ref_cols).to(at::kDouble) : at::mm(xc.to(at::kDouble), ref_cols->t());
      at::Tensor x2 = at::empty({T, K}, xc.options().dtype(mag_cols->scalar_type()));
      if (st == at::kBFloat16)
        scaled_squares_to(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), T, K, x2, sc);
      else if (st == at::kHalf)
        scaled_squares_to(xc.data_ptr<at::Half>(), T, K, x2, sc);
      else
        scaled_squares_to(xc.data_ptr<float>(), T, K, x2, sc);
      mag = product(x2, *mag_cols);
      refp = ref.data_ptr<double>(), magp = mag.data_ptr<float>();
    }
    // ftattn/linear.py check_factor: kappa sqrt(K) u for the block's accumulators, within
    // sqrt(x^2 . mag); the fp64 references' rounding, (K + block_o) 2^-52 sqrt(block_o K)
    // times the same; for bf16 hi + mid + lo parts, whose references run on the bf16 GEMM, their
    // fp32 rounding (a second dot product, sqrt(2); mag holds (W^T e_b)^2 too) and the
    // parts' own, 2^-26 sqrt(K); 2^-6 for magnitudes taken in bf16 or fp32; underflow: K + 1
    // operations per accumulator, a block of them and the reference
    const double sqrtK = std::sqrt(static_cast<double>(std::max<int64_t>(K, 1)));
    const double factor =
        split ? (kKappa * sqrtK * kU32 * std::sqrt(2.0) + 0x1p-26 * sqrtK) * (1.0 + 0x1p-6)
              : (kKappa * sqrtK * kU32 + static_cast<double>(K + block_o) * 0x1p-52 *
                                             std::sqrt(static_cast<double>(block_o) * std::max<int64_t>(K, 1))) *
                    (1.0 + 0x1p-6);
    const int64_t lanes = vector_lanes();
    // the weighted sums' weights by place in a block (+16: a 16-lane load at its tail)
    static thread_local std::vector<float> wts;  // (made when block_o changes: kept per thread)
    if (static_cast<int64_t>(wts.size()) != block_o + 16) {
      wts.assign(static_cast<size_t>(block_o + 16), 0.f);
      for (int64_t o = 0; o < block_o; ++o) wts[o] = checksum_weight(o);
    }
    CheckRefs c{acc.data_ptr<float>(),
                bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
                refp, magp, sc, &xc, T, out, block_o, nb, split,
                factor,
                product_eta(st) * static_cast<double>((K + 1) * (block_o + 1)),
                // (block_sums: ceil(block_o / L) + 1 terms per fp32 partial, L the lanes this machine's
                // code adds in)
                static_cast<double>((block_o + lanes - 1) / lanes + 1) * kU32 * (1.0 + 0x1p-20),
                wts.data()};
    if (x_cols) {
      cols_refs_any(xc, wc.data_ptr<double>(), mc.data_ptr<float>(), nc, refp, magp, sc);
    } else if (fused && nblk < at::get_num_threads()) {
      // fewer report blocks than threads (T <= 64 on 2 threads): the references first, in
      // parallel, or one thread would make them all: over rows, or for a few rows (decode,
      // T = 1) and more than kRowRefsColumns columns over pairs of checksum columns (each streams 12 bytes per column and input
      // feature: 11 MB at W [14336, 4096]; x [1, 2816] . W [2816, 1024]: check 0.05 -> 0.015 ms)
      const double* wp = wc.data_ptr<double>();
      const float* mp = mc.data_ptr<float>();
      // (few columns go row by row, whole rows each: over rows; review: the column split
      // left one thread with all of them, x [7, 4096] . W [512, 4096] check 22 -> 45 us)
      if (T >= 4 * at::get_num_threads() || nc <= kRowRefsColumns)
        at::parallel_for(0, T, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(K * nc, 1)),
                         [&](int64_t r0, int64_t r1) { rows_refs_any(xc, r0, r1, wp, mp, nc, refp, magp, sc); });
      else
        at::parallel_for(0, nb, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(2 * K * T, 1)),
                         [&](int64_t p0, int64_t p1) {
                           rows_refs_any(xc, 0, T, wp, mp, nc, refp, magp, sc, 2 * p0, 2 * p1);
                         });
    } else if (fused) {
      c.wsum = wc.data_ptr<double>(), c.magc = mc.data_ptr<float>();  // made in the check's pass
    }
    int32_t* fl = flags.data_ptr<int32_t>();
    c.tau = st == at::kBFloat16 ? 0x1p-7 : 0x1p-10;  // (FAULT_MODEL.md)
    check_all(c, fl, nblk);
    c.tau = 0.0;
    c.wsum = nullptr;
    c.magc = nullptr;  // (made: a second check reads them)
    bias_added = true;
    bool faulty = false;
    for (int64_t b = 0; b < nblk; ++b) faulty |= (fl[b] & kCheckMask) != 0;
    if (faulty && recompute) {
      acc = product(xc, weight);  // the product again, the weight read anew
      at::Tensor again = at::zeros_like(flags);
      c.acc = acc.data_ptr<float>();
      check_all(c, again.data_ptr<int32_t>(), nblk);
      const int32_t* ag = again.data_ptr<int32_t>();
      for (int64_t b = 0; b < nblk; ++b)
        if (fl[b] & kCheckMask) fl[b] |= (ag[b] & kCheckMask) ? kUncorrected : kCorrected;
      // (a blind block's rows are not compared here: with recompute, this op called directly)
    }
  }
  if (bias_f.defined() && !bias_added) acc.add_(bias_f);
  at::Tensor y = st == at::kFloat ? acc : acc.to(st);
  return {x.dim() == 2 ? y : y.view(y_shape), flags};
}

// linear_eager (csrc/ftattn.cpp): linear_fwd at abft (checksums given) or off, no fault, no
// recomputation, and its blocks' flags OR-ed (0: a clean call).
std::tuple<at::Tensor, at::Tensor, c10::SymInt> linear_eager_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             const std::optional<at::Tensor>& ref_cols,
                                                             const std::optional<at::Tensor>& mag_cols,
                                                             int64_t block_o) {
  const bool checked = ref_cols.has_value();
  auto [y, flags] =
      linear_fwd_cpu(x, weight, bias, ref_cols, mag_cols, block_o, checked ? 1 : 0, false, std::nullopt, std::nullopt);
  int32_t any = 0;
  const int32_t* fl = flags.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < flags.numel(); ++b) any |= fl[b];
  return {y, flags, c10::SymInt(any)};
}

// The checksums of a weight W [out, k] for the checked linear layer (ftattn/linear.py
// _block_sums) in one read of W, fp64 accumulators: sums [2 nb, k] (per block b of block_o
// output features W^T e_b, then W^T w_b, w the contract's checksum weights), squares [2 nb, k]
// (sum_{o in b} W_o^2, then sum_{o in b} w_o^2 W_o^2) and row_sums [out] (W e). Made per call
// for the backward's dW = dY^T X, whose "weight" is X^T: there the torch version's seven fp64
// passes, each with its temporaries, took 3.1 ms of a 9.8 ms checked forward + backward (bf16,
// x [512, 1536], W [384, 1536]). Each block's sums (rows of W in memory) or each column's
// (columns in memory, as X^T) are one task's, in a fixed order: the same bits whatever the
// thread count. (w_o W_oj is exact in fp64: 24 + 24 bits.)
template <typename T>
void weight_block_sums_impl(const at::Tensor& w, int64_t block_o, double* sums, double* squares) {
  const int64_t out = w.size(0), k = w.size(1), nb = (out + block_o - 1) / block_o;
  const T* W = w.const_data_ptr<T>();
  const auto val = [](T v) { return static_cast<double>(static_cast<float>(v)); };
  if (w.stride(1) == 1 || k == 1) {  // rows of W in memory: a task per block, its rows in turn
    const int64_t ld = k == 1 ? std::max<int64_t>(w.stride(0), 1) : w.stride(0);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double *s = sums + b * k, *q = squares + b * k, *sw = sums + (nb + b) * k, *qw = squares + (nb + b) * k;
        for (int64_t o = b * block_o; o < std::min(out, (b + 1) * block_o); ++o) {
          const T* row = W + o * ld;
          const double c = static_cast<double>(checksum_weight(o - b * block_o));
#pragma omp simd
          for (int64_t j = 0; j < k; ++j) {
            const double x = val(row[j]), y = x * c;
            s[j] += x;
            q[j] += x * x;
            sw[j] += y;
            qw[j] += y * y;
          }
        }
      }
    });
  } else {  // columns of W in memory (X^T): a task per column, each block's rows reduced in turn
    const at::Tensor wc = w.stride(0) == 1 ? w : w.t().contiguous().t();
    const T* Wc = wc.const_data_ptr<T>();
    const int64_t ld = wc.stride(1);
    // (the weights by place in a block made once: each an integer hash, made per element they
    // were most of this pass, 0.27 ms for X^T of x [256, 512], the backward's dW)
    std::vector<double> cw(static_cast<size_t>(std::min(block_o, out)));
    for (size_t o = 0; o < cw.size(); ++o) cw[o] = static_cast<double>(checksum_weight(static_cast<int64_t>(o)));
    const double* cwp = cw.data();
    at::parallel_for(0, k, 16, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const T* col = Wc + j * ld;
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t o0 = b * block_o, o1 = std::min(out, o0 + block_o);
          const double* c = cwp - o0;
          double s = 0.0, q = 0.0, sw = 0.0, qw = 0.0;
#pragma omp simd reduction(+ : s, q, sw, qw)
          for (int64_t o = o0; o < o1; ++o) {
            const double x = val(col[o]), y = x * c[o];
            s += x;
            q += x * x;
            sw += y;
            qw += y * y;
          }
          sums[b * k + j] = s;
          squares[b * k + j] = q;
          sums[(nb + b) * k + j] = sw;
          squares[(nb + b) * k + j] = qw;
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_block_sums_cpu(const at::Tensor& weight, int64_t block_o,
                                                                      bool with_row_sums) {
  TORCH_CHECK(weight.dim() == 2, "ftattn.linear: weight_block_sums takes a weight [out, in], got ", weight.sizes());
  TORCH_CHECK(block_o >= 1, "ftattn.linear: block_o must be >= 1, got ", block_o);
  const auto st = weight.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "ftattn.linear: weight_block_sums takes float32, bfloat16 or float16, got ", st);
  const int64_t out = weight.size(0), k = weight.size(1), nb = (out + block_o - 1) / block_o;
  const auto opts = weight.options().dtype(at::kDouble);
  at::Tensor sums = at::zeros({2 * nb, k}, opts), squares = at::zeros({2 * nb, k}, opts);
  // (W e: for scrub_weights; 0.045 ms of the 0.1 of X^T's checksums at x [256, 512], which the
  // backward's dW makes per call and never scrubs)
  at::Tensor row_sums = with_row_sums ? at::sum(weight, {1}, false, at::kDouble) : at::empty({0}, opts);
  if (out > 0 && k > 0) {
    double *s = sums.data_ptr<double>(), *q = squares.data_ptr<double>();
    if (st == at::kFloat)
      weight_block_sums_impl<float>(weight, block_o, s, q);
    else if (st == at::kBFloat16)
      weight_block_sums_impl<c10::BFloat16>(weight, block_o, s, q);
    else
      weight_block_sums_impl<c10::Half>(weight, block_o, s, q);
  }
  return {sums, squares, row_sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(ftattn, CPU, m) {
  m.impl("linear_fwd", &linear_fwd_cpu);
  m.impl("linear_eager", &linear_eager_cpu);
  m.impl("weight_block_sums", &weight_block_sums_cpu);
}

}  // namespace ftattn
