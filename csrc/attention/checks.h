// The checks on S: row maxima with the ABFT sums, the column check, the column bounds
// and the score verification.
// Part of the CPU attention kernel: included once, by csrc/attention_cpu.cpp (one
// translation unit, so every helper stays inlinable).
#pragma once

#include "common.h"

namespace ftattn {
namespace {

// The maximum of the raw scores S_j over the visible keys (j <= limit), for R rows at
// stride ld that see the same keys. Scores
// are scaled later, as (S_j - max) * scale, so the argmax gives exp(0) == 1 exactly
// and no scaled copy of the row is stored (scale >= 0; the caller flips the sign of
// q for a negative one). A NaN score does not enter the max (it makes its p NaN,
// and so the row sum and the output); a row whose visible scores are all NaN
// gets NaN, so that it cannot be taken for a row with no visible key. SUMS adds
// the ABFT sums of the raw scores, from the same loads: each row's sum
// rs[r] = sum_j S_rj and the column partial sums cs32[j] += sum_r S_rj and ca32[j] +=
// sum_r |S_rj| (fp32, flushed to fp64 by flush_cols every ROW_CHUNK rows), over every
// column of the tile. Four rows at a time load and store the column partials once per
// four rows instead of once per row (their loads and stores were most of the sums'
// cost), and add their four values as ((x0 + x1) + (x2 + x3)): within the same
// ROW_CHUNK u as one at a time.
template <int R, typename T>
FTATTN_VEC_INLINE T sum_rows(const T* x) {
  static_assert(R == 1 || R == 4, "one row or four");
  if constexpr (R == 1)
    return x[0];
  else
    return (x[0] + x[1]) + (x[2] + x[3]);
}

template <bool SUMS, int R, typename V>
FTATTN_VEC_INLINE void row_max_body(const float* __restrict S, int64_t ld, int64_t n, int64_t limit,
                                    float* __restrict mx, double* __restrict rs, float* __restrict cs32,
                                    float* __restrict ca32) {
  using namespace vec;
  const int64_t visible = std::min<int64_t>(n, std::max<int64_t>(limit + 1, 0));
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  constexpr int64_t L = Lanes<V>;  // (16 lanes with AVX-512, else 8: vec::Lanes)
  V mxv[R];
  d8 racc[R];
  double rtail[R];
  float mt[R];
  for (int r = 0; r < R; ++r) mxv[r] = V{} + NEG_INF, racc[r] = d8{}, rtail[r] = 0.0, mt[r] = NEG_INF;
  // the column sums of R rows at j (vectors or single values)
  const auto add_columns = [&](int64_t j, const auto* x) {
    using T = std::remove_const_t<std::remove_reference_t<decltype(x[0])>>;
    T ax[R];
    if constexpr (std::is_same_v<T, V>) {
      for (int r = 0; r < R; ++r) ax[r] = vec::abs(x[r]);
      store_v(cs32 + j, load_v<V>(cs32 + j) + sum_rows<R>(x));
      store_v(ca32 + j, load_v<V>(ca32 + j) + sum_rows<R>(ax));
    } else {
      for (int r = 0; r < R; ++r) ax[r] = std::fabs(x[r]);
      cs32[j] += sum_rows<R>(x);
      ca32[j] += sum_rows<R>(ax);
    }
  };
  // keys j..end: whole vectors, CHUNK per partial sum, then single keys; SEE: into the max
  int64_t j = 0;
  const auto span = [&](int64_t end, auto see, bool singles) {
    constexpr bool SEE = decltype(see)::value;
    while (j + L <= end) {
      V part[R] = {};
      for (int64_t c = 0; c < CHUNK && j + L <= end; ++c, j += L) {
        V x[R];
        for (int r = 0; r < R; ++r) {
          x[r] = load_v<V>(S + r * ld + j);
          if constexpr (SEE) mxv[r] = x[r] > mxv[r] ? x[r] : mxv[r];
          part[r] += x[r];
        }
        if constexpr (SUMS) add_columns(j, x);
      }
      if constexpr (SUMS)
        for (int r = 0; r < R; ++r) racc[r] += widen_sum(part[r]);
    }
    if (!singles) return;
    for (; j < end; ++j) {
      float x[R];
      for (int r = 0; r < R; ++r) {
        x[r] = S[r * ld + j];
        if constexpr (SEE) mt[r] = x[r] > mt[r] ? x[r] : mt[r];
        rtail[r] += static_cast<double>(x[r]);
      }
      if constexpr (SUMS) add_columns(j, x);
    }
  };
  span(visible, std::true_type{}, false);
  // the vector across the last visible key (a causal tile's rows end anywhere in it):
  // its visible lanes into the max, all into the sums, where the tile holds the whole vector
  if (j < visible && j + L <= n) {
    const auto vis = lanes_below<V>(visible - j);
    V x[R];
    for (int r = 0; r < R; ++r) {
      x[r] = load_v<V>(S + r * ld + j);
      const V xv = vis ? x[r] : V{} + NEG_INF;
      mxv[r] = xv > mxv[r] ? xv : mxv[r];
      if constexpr (SUMS) racc[r] += widen_sum(x[r]);
    }
    if constexpr (SUMS) add_columns(j, x);
    j += L;
  }
  span(visible, std::true_type{}, true);
  // masked keys: still in the sums (the references cover the whole tile)
  if constexpr (SUMS) span(n, std::false_type{}, true);
  for (int r = 0; r < R; ++r) {
    if constexpr (SUMS) rs[r] = hsum(racc[r]) + rtail[r];
    const float vmx = tree(mxv[r], Max{});  // (NaN never enters a lane)
    mx[r] = vmx > mt[r] ? vmx : mt[r];
    if (mx[r] == NEG_INF) {  // rare: every visible score -inf or NaN
      for (int64_t t = 0; t < visible; ++t)
        if (S[r * ld + t] != S[r * ld + t]) {
          mx[r] = std::numeric_limits<float>::quiet_NaN();
          break;
        }
    }
  }
}

FTATTN_CLONES static float row_max(const float* __restrict S, int64_t n, int64_t limit) {
  float mx;
  if (wide_vectors()) row_max_body<false, 1, vec::f16>(S, 0, n, limit, &mx, nullptr, nullptr, nullptr);
  else row_max_body<false, 1, vec::f8>(S, 0, n, limit, &mx, nullptr, nullptr, nullptr);
  return mx;
}

FTATTN_CLONES static float row_max_sums(const float* __restrict S, int64_t n, int64_t limit, double* __restrict rs,
                                        float* __restrict cs32, float* __restrict ca32) {
  float mx;
  if (wide_vectors()) row_max_body<true, 1, vec::f16>(S, 0, n, limit, &mx, rs, cs32, ca32);
  else row_max_body<true, 1, vec::f8>(S, 0, n, limit, &mx, rs, cs32, ca32);
  return mx;
}

// row_max_sums for four consecutive rows (at stride ld) that see every key of the tile.
FTATTN_CLONES static void row_max_sums4(const float* __restrict S, int64_t ld, int64_t n, float* __restrict mx,
                                        double* __restrict rs, float* __restrict cs32, float* __restrict ca32) {
  if (wide_vectors()) row_max_body<true, 4, vec::f16>(S, ld, n, n - 1, mx, rs, cs32, ca32);
  else row_max_body<true, 4, vec::f8>(S, ld, n, n - 1, mx, rs, cs32, ca32);
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
  // (eight keys a vector, the division in fp32: under `omp simd` GCC 12 left this loop
  // scalar, one fp64 division per key, 3 % of a fp32 forward at protection full. The
  // denominator is rounded once to fp32, the quotient once, and TAU_VERIFY (2^-12) taken
  // 2^-21 smaller, so each theta_j is below the fp32 rounding of the exact quotient: at
  // least the keys verified before, never fewer; for a normal fp32 denominator: a subnormal one
  // gives theta > 1e34, where no key is verified either way. NaN gives 0: every key verified.)
  using vec::d8;
  using vec::f8;
  const float tau = static_cast<float>(TAU_VERIFY) * (1.f - 0x1p-21f), cap = 3.0e38f;
  // (|v_j|_inf + 1) x (1 + x), in fp64 lanes or one fp64 value
  const auto denominator = [](auto x, auto vm, auto one) { return (vm + one) * (x * (one + x)); };
  f8 lowv = f8{} + std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    d8 cv;
    std::memcpy(&cv, colb + j, sizeof(cv));
    const d8 den = denominator(cv * s2, __builtin_convertvector(vec::load_v<f8>(vmax + j), d8), d8{} + 1.0);
    const f8 t = tau / __builtin_convertvector(den, f8);
    f8 c = t < cap ? t : cap;
    c = t == t ? c : f8{};
    vec::store_v(theta + j, c);
    lowv = c < lowv ? c : lowv;
  }
  float low = vec::tree(lowv, vec::Min{});
  for (; j < n; ++j) {
    const float t = tau / static_cast<float>(denominator(colb[j] * s2, static_cast<double>(vmax[j]), 1.0));
    const float c = t < cap ? t : cap;
    theta[j] = t == t ? c : 0.f;
    low = theta[j] < low ? theta[j] : low;
  }
  if (!(xmax <= 0.5)) {
    low = std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < n; ++k) {
      theta[k] = verify_threshold(colb[k], vmax[k], scale);
      low = theta[k] < low ? theta[k] : low;
    }
  }
  return low;
}

// true when the fp32 product s of a and b (D terms) disagrees with a . b in fp64 (exact
// products) beyond noise (||a o b||_2 + |a . b|) + floor, the fp32 GEMM's rounding (see
// TAU_VERIFY); *bound (when given) gets that bound.
// (W: the lanes of the caller's vectors, vec::Lanes: where they are 16 (AVX-512), sixteen dims
// are converted at a time as one fp64 vector pair, two vcvtps2pd zmm under GCC 12, where eight
// at a time took two xmm conversions and an insert each; the same sums in the same order.)
template <int W>
FTATTN_VEC_INLINE bool entry_mismatch(const float* __restrict a, const float* __restrict b, int64_t D, float s,
                                      double noise, double floor, double* bound) {
  // (eight fp64 lanes and tree reductions: an `omp simd reduction` ended in 16 dependent
  // scalar adds, the cost of a verification at D = 32)
  using vec::d8;
  d8 tv = d8{}, nv = d8{};
  int64_t d = 0;
  if constexpr (W == 16) {
    for (; d + 16 <= D; d += 16) {
      vec::f16 av, bv;
      std::memcpy(&av, a + d, sizeof(av));
      std::memcpy(&bv, b + d, sizeof(bv));
      const vec::d16 x2 = __builtin_convertvector(av, vec::d16) * __builtin_convertvector(bv, vec::d16);  // (exact)
      d8 lo, hi;
      vec::halves(x2, lo, hi);
      tv += lo;
      nv += lo * lo;
      tv += hi;
      nv += hi * hi;
    }
  }
  for (; d + 8 <= D; d += 8) {
    vec::f8 av, bv;
    std::memcpy(&av, a + d, sizeof(av));
    std::memcpy(&bv, b + d, sizeof(bv));
    const d8 x = __builtin_convertvector(av, d8) * __builtin_convertvector(bv, d8);  // (exact)
    tv += x;
    nv += x * x;
  }
  double t = vec::hsum(tv), n2 = vec::hsum(nv);
  for (; d < D; ++d) {
    const double x = static_cast<double>(a[d]) * static_cast<double>(b[d]);
    t += x;
    n2 += x * x;
  }
  if (bound != nullptr) {
    *bound = noise * (std::sqrt(n2) + std::fabs(t)) + floor;
    return !within(std::fabs(static_cast<double>(s) - t), *bound);
  }
  // without the bound itself, no square root: |s - t| - noise |t| - floor = r is within
  // noise sqrt(n2) iff r <= 0 or r^2 <= noise^2 n2 (a NaN r is a mismatch)
  const double r = std::fabs(static_cast<double>(s) - t) - (noise * std::fabs(t) + floor);
  if (r <= 0.0) return false;
  return !within(r * r, noise * noise * n2);
}

// e^x - 1 from above for x >= 0: x (1 + x) up to x = 1/2 (e^x - 1 - x = x^2 (1/2 + x/6 + ...)
// <= x^2 there), which is where the noise bounds of verified entries live (~1e-6); a libm
// expm1 per verified key was 0.7 % of a protected MiniLM forward. NaN stays NaN.
FTATTN_VEC_INLINE double grow_bound(double x) { return x <= 0.5 ? x * (1.0 + x) : std::expm1(x); }

// A change within each verified key's noise bound b_j passes the comparison above, and on
// data whose products are large and cancel (outlier channels) b_j is wide: there 32 keys
// each moved by a third of it (a warp's fault) changed the output by 1.1 tau while fp32's
// own rounding of those scores moved it by up to 0.65 tau from the exact scores, so no
// bound against exact arithmetic tells the two apart. Where the verified keys' noise
// could hide harm, sum_j p_j (e^{scale b_j} - 1) (|v_j|_inf + 1) >= TAU_VERIFY l (the
// score verification's own criterion, summed over its keys), protection full makes the
// tile's S again by the same GEMM call, which rounds alike, and it must agree bit for bit
// (DMR): on data of that kind one more QK^T product a tile (full / off at N = 2048 with two
// x20 channels: 1.69, abft 1.16); on normal data it next to never runs. abft leaves
// such changes uncovered, as it leaves probs.
//
// true when a key with p_j >= theta_j l has a score S_j that disagrees with q . k_j
// recomputed in fp64 (keys j < n: the visible ones of the tile); *hidden (when given:
// protection full) gets sum_j p_j (e^{scale b_j} - 1) (|v_j|_inf + 1) over those keys.
// (On vectors V, 16 or 8 lanes: on 16 the AVX2 code took each vector's compare apart lane by
// lane through the stack, 25 % of a full forward at MiniLM's shape there.)
template <typename V>
__attribute__((always_inline)) static inline bool scores_mismatch_body(
    const float* __restrict q, const float* __restrict K, int64_t D, const float* __restrict S,
    const float* __restrict p, const float* __restrict theta, const float* __restrict vmax, float l, float scale,
    int64_t n, double eta, double* hidden) {
  using namespace vec;
  using M = decltype(V{} < V{});  // the compare's lane mask
  constexpr int64_t L = Lanes<V>;
  const double noise = KAPPA * std::sqrt(static_cast<double>(D)) * U32;
  const double floor = eta * static_cast<double>(D + 1);
  const double sc = std::fabs(static_cast<double>(scale));
  bool bad = false;
  double h = 0.0;
  const auto visit = [&](int64_t j) {
    if (hidden == nullptr) {  // (abft: no bound needed, no square root)
      bad |= entry_mismatch<L>(q, K + j * D, D, S[j], noise, floor, nullptr);
      return;
    }
    double b;
    bad |= entry_mismatch<L>(q, K + j * D, D, S[j], noise, floor, &b);
    h += static_cast<double>(p[j]) * grow_bound(sc * b) * (static_cast<double>(vmax[j]) + 1.0);
  };
  // candidates p_j >= theta_j l, a vector at a time (most vectors have none; a NaN p
  // is the probability-range check's, as elsewhere)
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const M hit = load_v<V>(p + j) >= load_v<V>(theta + j) * l;  // (a compare: no fused multiply-add)
    for (uint32_t lanes = mask_bits(hit); lanes != 0; lanes &= lanes - 1) visit(j + __builtin_ctz(lanes));
  }
  for (; j < n; ++j)
    if (p[j] >= theta[j] * l) visit(j);
  if (hidden != nullptr) *hidden = h;
  return bad;
}
FTATTN_CLONES static bool scores_mismatch(const float* __restrict q, const float* __restrict K, int64_t D,
                                          const float* __restrict S, const float* __restrict p,
                                          const float* __restrict theta, const float* __restrict vmax, float l,
                                          float scale, int64_t n, double eta, double* hidden) {
  return wide_vectors() ? scores_mismatch_body<vec::f16>(q, K, D, S, p, theta, vmax, l, scale, n, eta, hidden)
                        : scores_mismatch_body<vec::f8>(q, K, D, S, p, theta, vmax, l, scale, n, eta, hidden);
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

}  // namespace
}  // namespace ftattn
