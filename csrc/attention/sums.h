// Per-block and per-tile sums of q, k and v, and the sliced GEMM.
// Part of the CPU attention kernel: included once, by csrc/attention_cpu.cpp (one
// translation unit, so every helper stays inlinable).
#pragma once

#include "common.h"

namespace ftattn {
namespace {

// For rows x_i of X [n x D] (fp32): ref[i * ld + t] = x_i . y_t and mag[i * ld + t] = |x_i| .
// yabs_t for t < nt, with y, yabs [nt x D] fp64.
// (Four tiles a pass: x_i converted to fp64 once for them, eight fp64 accumulators, eight dims
// each, added in one transposing tree, reduce8: one dot per tile had converted x_i again for
// each tile and ended each of its two sums in a tree of its own, half of this function's time,
// 1.3 % of a fp32 forward at protection full, B1 H8 N2048 D64.)
typedef int64_t i64x8 __attribute__((vector_size(64)));
// the sums of eight vectors' lanes, the k-th in lane k
FTATTN_VEC_INLINE vec::d8 reduce8(vec::d8 v0, vec::d8 v1, vec::d8 v2, vec::d8 v3, vec::d8 v4, vec::d8 v5,
                                  vec::d8 v6, vec::d8 v7) {
  const auto pairs = [](vec::d8 a, vec::d8 b) {  // a0+a1, b0+b1, a2+a3, b2+b3, ..
    return __builtin_shuffle(a, b, i64x8{0, 8, 2, 10, 4, 12, 6, 14}) +
           __builtin_shuffle(a, b, i64x8{1, 9, 3, 11, 5, 13, 7, 15});
  };
  const auto quads = [](vec::d8 a, vec::d8 b) {
    return __builtin_shuffle(a, b, i64x8{0, 1, 8, 9, 4, 5, 12, 13}) +
           __builtin_shuffle(a, b, i64x8{2, 3, 10, 11, 6, 7, 14, 15});
  };
  const vec::d8 lo = quads(pairs(v0, v1), pairs(v2, v3)), hi = quads(pairs(v4, v5), pairs(v6, v7));
  return __builtin_shuffle(lo, hi, i64x8{0, 1, 2, 3, 8, 9, 10, 11}) +
         __builtin_shuffle(lo, hi, i64x8{4, 5, 6, 7, 12, 13, 14, 15});
}

// RN rows x TN tiles (RN TN <= 4) into one reduce8: four tiles of a row, or, with one tile
// (a call of at most 512 keys, and the per-tile references), four rows a pass, where one row
// left six of reduce8's eight vectors empty (half of this function's work at D = 32).
template <int RN, int TN>
FTATTN_VEC_INLINE void dots_d_tiles(const float* __restrict X, int64_t D, const double* __restrict y,
                                    const double* __restrict yabs, double* __restrict ref,
                                    double* __restrict mag, int64_t ld) {
  static_assert(RN * TN <= 4, "eight accumulators");
  using namespace vec;
  const auto load_d = [](const double* p) {
    d8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  d8 s[4] = {}, a[4] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int r = 0; r < RN; ++r) {
      const d8 x = __builtin_convertvector(load_v<f8>(X + r * D + d), d8), xa = vec::abs(x);
      for (int t = 0; t < TN; ++t) {
        s[r * TN + t] += x * load_d(y + t * D + d);
        a[r * TN + t] += xa * load_d(yabs + t * D + d);
      }
    }
  }
  const d8 sum = reduce8(s[0], s[1], s[2], s[3], a[0], a[1], a[2], a[3]);
  for (int r = 0; r < RN; ++r)
    for (int t = 0; t < TN; ++t) {
      double st = sum[r * TN + t], at = sum[4 + r * TN + t];
      for (int64_t e = d; e < D; ++e) {
        const double x = static_cast<double>(X[r * D + e]);
        st += x * y[t * D + e];
        at += std::fabs(x) * yabs[t * D + e];
      }
      ref[r * ld + t] = st;
      mag[r * ld + t] = at;
    }
}

FTATTN_CLONES static void dots_d(const float* __restrict X, int64_t n, int64_t D, const double* __restrict y,
                                 const double* __restrict yabs, int64_t nt, int64_t ld, double* __restrict ref,
                                 double* __restrict mag) {
  int64_t i = 0;
  if (nt == 1)  // four rows a pass
    for (; i + 4 <= n; i += 4) dots_d_tiles<4, 1>(X + i * D, D, y, yabs, ref + i * ld, mag + i * ld, ld);
  for (; i < n; ++i) {
    const float* xi = X + i * D;
    double* ri = ref + i * ld;
    double* mi = mag + i * ld;
    int64_t t = 0;
    for (; t + 4 <= nt; t += 4) dots_d_tiles<1, 4>(xi, D, y + t * D, yabs + t * D, ri + t, mi + t, ld);
    switch (nt - t) {  // (the count a template argument: accumulators in registers)
      case 3: dots_d_tiles<1, 3>(xi, D, y + t * D, yabs + t * D, ri + t, mi + t, ld); break;
      case 2: dots_d_tiles<1, 2>(xi, D, y + t * D, yabs + t * D, ri + t, mi + t, ld); break;
      case 1: dots_d_tiles<1, 1>(xi, D, y + t * D, yabs + t * D, ri + t, mi + t, ld); break;
      default: break;
    }
  }
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

// Per sub-block sb of `sub` rows of X [n x D], n >= 1: sum[sb * D + d] = sum_i x_id,
// abs[...] = sum_i |x_id| and (when given) sq[...] = sum_i x_id^2 (fp64), the rows added
// in order, 32 dims at a time in registers (row by row, loading and storing the sums per
// row, was most of a query block's preparation at D = 32).
FTATTN_CLONES static void block_row_sums(const float* __restrict X, int64_t n, int64_t sub, int64_t D,
                                         double* __restrict sum, double* __restrict abs, double* __restrict sq) {
  using namespace vec;
  constexpr int V = 4;  // d8 vectors of dims per pass over the rows
  for (int64_t i0 = 0, sb = 0; i0 < n; i0 += sub, ++sb) {
    const int64_t i1 = std::min<int64_t>(n, i0 + sub);
    double* s = sum + sb * D;
    double* a = abs + sb * D;
    double* q = sq != nullptr ? sq + sb * D : nullptr;
    int64_t d = 0;
    for (; d + 8 <= D; d += V * 8) {
      const int nv = static_cast<int>(std::min<int64_t>(V, (D - d) / 8));
      d8 vs[V], va[V], vq[V];
      for (int c = 0; c < V; ++c) vs[c] = va[c] = vq[c] = d8{};
      for (int64_t i = i0; i < i1; ++i) {
        for (int c = 0; c < nv; ++c) {
          f8 xf;
          std::memcpy(&xf, X + i * D + d + 8 * c, sizeof(xf));
          const d8 x = __builtin_convertvector(xf, d8);
          vs[c] += x;
          va[c] += vec::abs(x);
          vq[c] += x * x;
        }
      }
      for (int c = 0; c < nv; ++c) {
        std::memcpy(s + d + 8 * c, &vs[c], sizeof(d8));
        std::memcpy(a + d + 8 * c, &va[c], sizeof(d8));
        if (q != nullptr) std::memcpy(q + d + 8 * c, &vq[c], sizeof(d8));
      }
      if (nv < V) {
        d += nv * 8;
        break;
      }
    }
    for (; d < D; ++d) {
      double vs = 0.0, va = 0.0, vq = 0.0;
      for (int64_t i = i0; i < i1; ++i) {
        const double x = static_cast<double>(X[i * D + d]);
        vs += x;
        va += std::fabs(x);
        vq += x * x;
      }
      s[d] = vs, a[d] = va;
      if (q != nullptr) q[d] = vq;
    }
  }
}

// The output row and the sums its checks compare, in one pass: O_d = A_d / l; per group
// of `group` dims sum_d A_d (fp64) into parts[g], and where wpart is not null the weighted
// sum of the PV check's second checksum over every dim, sum_d w_d A_d (PV_WEIGHTS; each
// product exact in fp64: 24 + 24 bits), into *wpart.
FTATTN_CLONES static void finish_row(const float* __restrict A, float* __restrict O, int64_t D, float l,
                                     int64_t group, double* __restrict parts, double* __restrict wpart) {
  // (explicit vectors and tree reductions: an `omp simd reduction` of three sums ended in
  // 24 dependent scalar adds, most of this function's time at D = 32)
  using namespace vec;
  d8 pw = d8{};
  double pwt = 0.0;
  for (int64_t d0 = 0, g = 0; d0 < D; d0 += group, ++g) {
    const int64_t d1 = d0 + group < D ? d0 + group : D;
    d8 p = d8{};
    int64_t d = d0;
    for (; d + W <= d1; d += W) {
      const f16 a = load(A + d);
      store(O + d, a / l);
      f8 lo, hi;
      halves(a, lo, hi);
      const d8 lo64 = __builtin_convertvector(lo, d8), hi64 = __builtin_convertvector(hi, d8);
      p += lo64 + hi64;
      if (wpart != nullptr) {
        f8 wlo, whi;
        halves(load(PV_WEIGHTS.w + d), wlo, whi);
        pw += lo64 * __builtin_convertvector(wlo, d8) + hi64 * __builtin_convertvector(whi, d8);
      }
    }
    double pt = hsum(p);
    for (; d < d1; ++d) {
      pt += static_cast<double>(A[d]);
      pwt += static_cast<double>(A[d]) * static_cast<double>(PV_WEIGHTS.w[d]);
      O[d] = A[d] / l;
    }
    parts[g] = pt;
  }
  if (wpart != nullptr) *wpart = hsum(pw) + pwt;
}

// Whether every O_d is A_d / l, divided again (the final normalisation checked element by
// element: a sum over the dims let a warp's fault cancel in it); NaN anywhere fails.
// First a screen without division: O_d = fl(A_d / l) is within u of A_d / l and O_d l, rounded,
// within u more, so |O_d l - A_d| <= (2u + u^2) |A_d| (2^-22 |A_d| allowed: twice that) where
// nothing is subnormal; only a row with a dim outside (a fault; an infinite or NaN A_d; or a
// subnormal quotient or product, which no relative bound holds) is divided again. The screen
// passes changes of O up to about 2^-21 of it (mantissa bits 0-2), far below any harm (2^-10); the division per output
// element was 2.5 % of a full forward at B8 H12 N128 D32 (MiniLM's heads), as much as the
// output itself (perf). (An absolute term for the subnormal case, l 2^-148, was itself
// subnormal: its every addition took a microcode assist, 19x the division's cost, measured.)
FTATTN_CLONES static bool output_matches(const float* __restrict A, const float* __restrict O, int64_t D, float l) {
  const float rel = 0x1p-22f;
  int out = 0;
#pragma omp simd reduction(| : out)
  for (int64_t d = 0; d < D; ++d) out |= !(std::fabs(O[d] * l - A[d]) <= rel * std::fabs(A[d]));
  if (!out) return true;
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t d = 0; d < D; ++d) bad |= !(O[d] == A[d] / l);
  return !bad;
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
// exact sums relative to vabs (the PV bound adds 10 u). WEIGHTED (protection full): also the
// weighted sum of the PV check's second checksum over every head dim, vsum[G * gs + j] =
// sum_d w_d v_jd (G groups; w_d = PV_WEIGHTS, |w_d| < 1/4: one rounding per product, at most 5 G
// terms per lane and the tree: within (5 G + 5) u of the exact sum relative to sum_g vabs / 4,
// which is at most the largest group's vabs: no overflow before the plain sums'). knorm: the fp32 square root of
// an fp32 sum of squares, within about 12 + D / 16 u, raised by 2^-15 to stay above
// the true norm it scales a bound with, plus sqrt(D) 2^-74 for the squares lost to
// underflow (each square loses at most 2^-149: sum |k_d|^2 <= sq + D 2^-148).
constexpr int64_t KV_CHUNK = 8;
constexpr int64_t KV_PREFETCH = 16;
// (Written on vectors VT of 16 or 8 lanes, vec::Lanes, 16 dims a step either way: NV = 16 / L
// vectors, whose lane-wise sums, added before the tree, are the 16-lane vector's halves, so
// both widths give the same bits. On 16-lane vectors the AVX2 code did the max of |v| lane by
// lane through the stack: 13 % of a full forward at MiniLM's shape there.)
template <typename VT, bool WEIGHTED>
__attribute__((always_inline)) static inline void key_value_sums_body(
    const float* __restrict K, const float* __restrict V, int64_t n, int64_t D, double* __restrict ks,
    double* __restrict ka, double* __restrict knorm, float* __restrict vsum, float* __restrict vabs,
    float* __restrict vmax, int64_t gs) {
  using namespace vec;
  constexpr int64_t L = Lanes<VT>, NV = W / L;
  alignas(64) float ks32[256 + W], ka32[256 + W], tail[W];
  const int64_t Dv = (D / W) * W;  // dims in whole 16-dim steps
  const double sqrt_d_floor = std::sqrt(static_cast<double>(D)) * 0x1p-74;
  const int64_t G = (D + PV_GROUP - 1) / PV_GROUP;
  const auto sum_of = [](const VT* x) {  // NV vectors -> one, then its tree
    VT t = x[0];
    for (int64_t u = 1; u < NV; ++u) t += x[u];
    return t;
  };
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
    VT sq[NV];
    for (int64_t u = 0; u < NV; ++u) sq[u] = VT{};
    float sq_t = 0.f;
    for (int64_t d = 0; d < Dv; d += W)
      for (int64_t u = 0; u < NV; ++u) {
        const int64_t e = d + u * L;
        const VT x = load_v<VT>(kj + e);
        store_v(ks32 + e, load_v<VT>(ks32 + e) + x);
        store_v(ka32 + e, load_v<VT>(ka32 + e) + vec::abs(x));
        sq[u] += x * x;
      }
    for (int64_t d = Dv; d < D; ++d) {
      const float x = kj[d];
      ks32[d] += x;
      ka32[d] += std::fabs(x);
      sq_t += x * x;
    }
    knorm[j] = static_cast<double>(std::sqrt(tree(sum_of(sq), Add{}) + sq_t)) * (1.0 + 0x1p-15) + sqrt_d_floor;
    if ((j + 1) % KV_CHUNK == 0 || j == n - 1) {
      for (int64_t d = 0; d < D; ++d) {
        ks[d] += static_cast<double>(ks32[d]);
        ka[d] += static_cast<double>(ka32[d]);
        ks32[d] = ka32[d] = 0.f;
      }
    }
    VT vm[NV], vw[NV];
    for (int64_t u = 0; u < NV; ++u) vm[u] = vw[u] = VT{};
    for (int64_t g = 0, d0 = 0; d0 < D; ++g, d0 += PV_GROUP) {
      const int64_t d1 = std::min<int64_t>(D, d0 + PV_GROUP);
      VT vs[NV], va[NV];
      for (int64_t u = 0; u < NV; ++u) vs[u] = va[u] = VT{};
      const auto add = [&](const float* y16, int64_t d) {
        for (int64_t u = 0; u < NV; ++u) {
          const VT y = load_v<VT>(y16 + u * L), a = vec::abs(y);
          vs[u] += y;
          va[u] += a;
          vm[u] = a > vm[u] ? a : vm[u];
          if constexpr (WEIGHTED) vw[u] += y * load_v<VT>(PV_WEIGHTS.w + d + u * L);
        }
      };
      int64_t d = d0;
      for (; d + W <= d1; d += W) add(vj + d, d);
      if (d < d1) {  // (the tail's zeros add 0 times any weight)
        std::fill(tail, tail + W, 0.f);
        std::copy(vj + d, vj + d1, tail);
        add(tail, d);
      }
      vsum[g * gs + j] = tree(sum_of(vs), Add{});
      vabs[g * gs + j] = tree(sum_of(va), Add{});
    }
    if constexpr (WEIGHTED) vsum[G * gs + j] = tree(sum_of(vw), Add{});
    VT m = vm[0];
    for (int64_t u = 1; u < NV; ++u) m = vm[u] > m ? vm[u] : m;
    vmax[j] = tree(m, Max{});  // (a NaN lane is dropped: the value's NaN reaches the output anyway)
  }
}
FTATTN_CLONES static void key_value_sums(const float* __restrict K, const float* __restrict V, int64_t n, int64_t D,
                                         double* __restrict ks, double* __restrict ka, double* __restrict knorm,
                                         float* __restrict vsum, float* __restrict vabs, float* __restrict vmax,
                                         int64_t gs, bool weighted) {
  if (wide_vectors()) {
    if (weighted)
      key_value_sums_body<vec::f16, true>(K, V, n, D, ks, ka, knorm, vsum, vabs, vmax, gs);
    else
      key_value_sums_body<vec::f16, false>(K, V, n, D, ks, ka, knorm, vsum, vabs, vmax, gs);
  } else if (weighted) {
    key_value_sums_body<vec::f8, true>(K, V, n, D, ks, ka, knorm, vsum, vabs, vmax, gs);
  } else {
    key_value_sums_body<vec::f8, false>(K, V, n, D, ks, ka, knorm, vsum, vabs, vmax, gs);
  }
}

// ---------------------------------------------------------------------------
// GEMMs on row-major fp32 blocks.

// C[m x n] (+)= A[m x k] * B, with B [n x k] (transposed, S = Q K^T) or [k x n]
// (acc += P V) in row-major fp32 blocks (gemm_rm). k_slice > 0 sums the product over
// slices of k_slice of the inner dimension, one GEMM each with beta = 1 after the
// first: see STACK_D_SLICE.
static void gemm(bool b_transposed, bool accumulate, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float* C, int64_t ldc, int64_t k_slice) {
  if (m == 0 || n == 0) return;
  const int64_t step = k_slice > 0 ? k_slice : std::max<int64_t>(k, 1);
  for (int64_t k0 = 0; k0 < k; k0 += step) {
    const int64_t kk = std::min(step, k - k0);
    const float* Bk = b_transposed ? B + k0 : B + k0 * ldb;
    gemm_rm(false, b_transposed, accumulate || k0 > 0, m, n, kk, A + k0, lda, Bk, ldb, C, ldc);
  }
}

// The bf16 GEMM's rows of A = [rows block rows (bf16 values, so exact); ng reference rows
// (fp32 sums)]: out gets the block's rows, then each reference row as hi, mid and lo, three
// bf16 rows (at rows + g, rows + ng + g, rows + 2 ng + g) whose sum is its fp32 value (8 + 8
// + 8 bits of the 24; a part below 2^-126 is read as 0 by the GEMM, which the column bounds
// allow for).
static void bf16_rows_split(const float* X, int64_t rows, int64_t ng, int64_t D, uint16_t* out) {
  for (int64_t x = 0; x < rows * D; ++x) out[x] = bf16_bits(X[x]);
  for (int64_t x = 0; x < ng * D; ++x) {
    const float v = X[rows * D + x];
    const uint16_t hi = bf16_nearest(v);
    const float r = v - bf16_value(hi);  // (exact)
    const uint16_t mid = bf16_nearest(r);
    out[rows * D + x] = hi;
    out[(rows + ng) * D + x] = mid;
    out[(rows + 2 * ng) * D + x] = bf16_nearest(r - bf16_value(mid));
  }
}

// Operands of the bf16 GEMM from k or v (bf16 [B, Hkv, M, D], contiguous) packed once per
// call as it reads them (pack_vnni), per key head of each sample (keys [first(b), first(b) +
// count(b))), instead of per tile for every block of queries: parts[i] = (x, transposed):
// transposed, X^T in panels of 64 keys (ceil(D / 2) pair rows each; S = Q K^T, dP = dO V^T);
// else X in panels of 64 head dims (ceil(count(b) / 2) pair rows of the sample's keys; P V,
// dS K). Part i of key head h of batch b at starts[i] + (b Hkv + h) stride (null where x is);
// the tensor holds them. Prob: the forward's Problem or the backward's BwdProblem (B, Hkv, M,
// D, key_first, key_count).
template <typename Prob>
static at::Tensor pack_per_key_head(const Prob& P, const std::vector<std::pair<const uint16_t*, bool>>& parts,
                                    std::vector<const uint32_t*>& starts, int64_t& stride) {
  const int64_t B = P.B, Hkv = P.Hkv, M = P.M, D = P.D;
  std::vector<int64_t> offset(parts.size());
  stride = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    offset[i] = stride;
    if (parts[i].first != nullptr)
      stride += parts[i].second ? (M + 63) / 64 * ((D + 1) / 2) * 64 : (D + 63) / 64 * ((M + 1) / 2) * 64;
  }
  at::Tensor buf = at::empty({std::max<int64_t>(B * Hkv * stride, 1)}, at::kInt);
  uint32_t* base = reinterpret_cast<uint32_t*>(buf.data_ptr<int32_t>());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(M * D, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, k0 = P.key_first(b), Mb = P.key_count(b);
      for (size_t p = 0; p < parts.size(); ++p) {
        if (parts[p].first == nullptr) continue;
        const uint16_t* x = parts[p].first + (i * M + k0) * D;
        uint32_t* out = base + i * stride + offset[p];
        if (parts[p].second)
          pack_vnni(true, D, Mb, x, D, out);
        else
          pack_vnni(false, Mb, D, x, D, out);
      }
    }
  });
  starts.assign(parts.size(), nullptr);
  for (size_t i = 0; i < parts.size(); ++i)
    if (parts[i].first != nullptr) starts[i] = base + offset[i];
  return buf;
}

// The three products of each reference row (rows + g, rows + ng + g, rows + 2 ng + g of C)
// added in fp64 and rounded once, into row rows + g.
static void fold_bf16_refs(int64_t rows, int64_t ng, int64_t n, float* C, int64_t ldc) {
  for (int64_t g = 0; g < ng; ++g) {
    float* hi = C + (rows + g) * ldc;
    const float* mid = C + (rows + ng + g) * ldc;
    const float* lo = C + (rows + 2 * ng + g) * ldc;
    for (int64_t j = 0; j < n; ++j)
      hi[j] = static_cast<float>(static_cast<double>(hi[j]) + static_cast<double>(mid[j]) + static_cast<double>(lo[j]));
  }
}
// C[rows + ng, n] = A B^T on the bf16 GEMM for A from bf16_rows_split ([rows + 3 ng, D])
// and B [n, D] bf16 (row-major, ldc C's row stride, which has room for rows + 3 ng rows),
// the reference rows folded (fold_bf16_refs).
static void gemm_bf16_refs(const uint16_t* A, int64_t rows, int64_t ng, int64_t n, int64_t D, const uint16_t* B,
                           float* C, int64_t ldc) {
  if (n == 0 || rows + ng == 0) return;
  gemm_bf16(false, true, rows + 3 * ng, n, D, A, D, B, D, 0.f, C, ldc);
  fold_bf16_refs(rows, ng, n, C, ldc);
}
// The same for B's rows as pack_vnni(true, D, ..) made them (panels of 64 keys, panel_stride
// words apart): the forward's keys, packed once per call (pack_keys_values).
static void gemm_bf16_refs_packed(const uint16_t* A, int64_t rows, int64_t ng, int64_t n, int64_t D,
                                  const uint32_t* Bp, int64_t panel_stride, float* C, int64_t ldc) {
  if (n == 0 || rows + ng == 0) return;
  gemm_bf16_packed(rows + 3 * ng, n, D, A, D, Bp, panel_stride, 0.f, C, ldc);
  fold_bf16_refs(rows, ng, n, C, ldc);
}

}  // namespace
}  // namespace ftattn
