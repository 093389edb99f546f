// Fault-tolerant attention, CPU backward kernel (the op ftattn::attention_bwd).
//
// Algorithm: the flash-attention-2 backward (Dao 2023) tiled BWD_BM = 64 query rows x
// BWD_BN = 256 keys, one task per (batch, query head): no N x M matrix, no atomics
// (deterministic: a task's dK / dV of its own query head go to a buffer of that head and
// the query heads of a key head are summed in a fixed order after the tasks). Per query
// block: each row's max and normaliser (the log-sum-exp) are the forward's (stats, written by
// attention_fwd: a differentiable call from Python), else a first pass over its key tiles
// makes them; then per key tile
//   S = Q K^T, P = exp((S - m) scale) / l, dP = dO V^T, dS = P (dP - D) with D_i = dO_i . O_i,
//   dV += P^T dO, dK += dS^T Q, dQ += dS K          (five sgemm calls, BLAS)
// and dQ = scale dQ at the end of the block, dK = scale sum_heads dK, dV = sum_heads dV.
//
// Checks (docs/fault_model.md; the same rules as ftattn/reference.py's backward, per tile):
//   S and dP: row checksums per tile (sum_j S_ij vs q_i . sum_j k_j in fp64, bound
//     kappa u sqrt(D) |q_i| . sum_j |k_j|) and column checksums per 32 rows (sum_i S_ij vs
//     fl(sum_i q_i) . k_j, made by the same GEMM as an extra row; bound from the data's spread
//     as the forward's); the entries a fault within the column bound could move
//     harmfully (their probability times the gradients they reach) recomputed in fp64
//     (checks.h's entry_mismatch), and where even that comparison's rounding bound could
//     hide harm, the tile's product computed a second time and compared bit for bit.
//   P: in [0, 1]; each row sums to 1 over its visible keys (0 for a row with none).
//   dS: every entry made again from the checked P and dP and compared bit for bit.
//   dQ, dK, dV: checksums per group of BWD_GROUP head dims: sum_{d in g} dQ_id vs
//     sum_j dS_ij (sum_{d in g} k_jd), made in fp64 by small GEMMs beside the products
//     (and likewise dK from dS^T and q, dV from P^T and dO), bound kappa u sqrt(K + 2) times
//     the same sums of magnitudes.
//   full adds a second P (exp2, its own polynomial).
// A failed check recomputes the task (the query head): a transient fault does not repeat,
// so the gradients equal the clean ones bit for bit. NaN/Inf inputs are reported as such.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "attention/checks.h"
#include "attention/inputs.h"
#include "attention/sums.h"

namespace ftattn {
namespace {

constexpr int64_t BWD_BM = 64;  // query rows per block: one report block
static_assert(BWD_BM == kReportBlockM, "a query block of the backward is a report block");
constexpr int64_t BWD_BN = 256;  // keys per tile
constexpr int64_t BWD_GROUP = 16;  // head dims per checksum group of dQ, dK, dV (ftattn/reference.py)
// Checksum groups of dQ, dK, dV: the groups of BWD_GROUP dims, and at full one more, the
// weighted checksum over every head dim (PV_WEIGHTS, as the forward's PV check): a warp flips
// the same bit of 32 dims, and its +-2^k deltas can cancel in both 16-dim groups' sums (the
// random warp campaign passed a harmful dV warp so, 1 of 3,641).
constexpr int64_t bwd_groups(int64_t D, int protection) {
  return (D + BWD_GROUP - 1) / BWD_GROUP + (protection >= 2 ? 1 : 0);
}
// query rows per column-checksum group of S and dP where they divide a block's rows (else the
// block is one group), and the most groups a block has: each group's reference row rides in
// the GEMM that makes S (dP), as the forward's (csrc/attention/block.h)
constexpr int64_t BWD_COL_ROWS = 32;
constexpr int64_t BWD_NGROUP_MAX = BWD_BM / BWD_COL_ROWS;
// the largest drift (head_backward) with which P is made from the forward's statistics
constexpr double DRIFT_MAX = 0x1p-12;

struct BwdProblem {
  const float *q, *k, *v, *o, *g;  // fp32 contiguous: q, o, g [B, Hq, N, D]; k, v [B, Hkv, M, D]
  float* dq;                       // [B, Hq, N, D], scaled
  float *dkh, *dvh;                // [B, Hq, M, D]: each query head's dK (unscaled) and dV
  int32_t* flags;                  // [B, Hq, nq + nk]
  const float* stats = nullptr;    // the forward's [B, Hq, N, 2] (each row's max score and l), or null
  double eta_fwd = ETA;            // the forward's underflow term per operation of its scores
  // bf16 inputs: k and v as bf16 [B, Hkv, M, D] contiguous, S = Q K^T (k16) and dP = dO V^T
  // (v16) on the bf16 GEMM (null: sgemm), and the underflow term per operation of the
  // bounds on S and dP (ETA, or ETA_FTZ where either runs on the bf16 GEMM)
  const uint16_t *k16 = nullptr, *v16 = nullptr;
  double eta16 = ETA;
  // dV += P^T dO, dK += dS^T Q, dQ += dS K on the bf16 GEMM too (with k16 and v16), P and dS
  // rounded to bf16 for them as the forward rounds P for P V
  bool p16 = false;
  bool bf16_cvt = false;  // P and dS rounded by VCVTNEPS2BF16 (bf16_hw_round, decided once per call)
  // k16 and v16 as the bf16 GEMM reads them, packed once per call (sums.h's
  // pack_per_key_head), per key head h of batch b at x + (b Hkv + h) packed_stride: K^T for
  // S, V^T for dP (panels of 64 keys), K for dQ += dS K (panels of 64 head dims, p16)
  const uint32_t *k16t = nullptr, *v16t = nullptr, *k16n = nullptr;
  int64_t packed_stride = 0;
  int64_t B, Hq, Hkv, N, M, D, nq, nk, G;
  bool causal;
  float scale;
  int protection;
  double tau = 0x1p-10;  // the harm threshold of the inputs' dtype (FAULT_MODEL.md; bf16 2^-7)
  const int64_t* key_start = nullptr;
  const int64_t* key_end = nullptr;
  int64_t key_first(int64_t b) const { return key_start ? key_start[b] : 0; }
  int64_t key_count(int64_t b) const { return key_start ? key_end[b] - key_start[b] : M; }
};

template <typename T>
using AVec = std::vector<T, Aligned64<T>>;

// the stride of the per-key references kept transposed (BwdScratch::rk ...): the keys
// rounded up to 16 lanes
inline int64_t key_stride(int64_t M) { return (M + 15) / 16 * 16; }

struct BwdScratch {
  AVec<float> S, S2, Pm, dP, dS, dQ;
  // the block's rows of q and dO and, after them, each column group's sum (fp32; zeros at
  // protection off, so that every level runs the same GEMM shapes and rounds S and dP alike)
  AVec<float> Qx, Gx;
  // the same as the bf16 GEMM's rows (bf16_rows_split: each column group's sum as three
  // rows, whose products S, S2 and dP hold in 2 BWD_NGROUP_MAX more rows), on first use
  AVec<uint16_t> Qh, Gh;
  std::vector<float> m, rinv, Drow, qmax, gmax;
  std::vector<double> l, drift;
  // the checks (abft)
  AVec<float> dSa;                               // |dS| of the tile
  // the bf16 GEMM's P and dS (BwdProblem::p16): rounded to bf16 (bits, and as fp32 with |dS|
  // for the references of dQ, dK, dV), on first use
  AVec<uint16_t> Pb, dSb;
  AVec<float> Pr, dSr, dSra;
  // the block's bf16 rows of dO and q packed for dV += P^T dO and dK += dS^T Q (pack_vnni),
  // once per block of queries
  AVec<uint32_t> GhP, QhP;
  std::vector<double> rs, rp;                    // per row: sum_j P_ij over its key tiles, as read / as made
  std::vector<double> qsum, qabs, gsum, gabs;    // per column group [NGROUP_MAX x D]
  std::vector<float> qg, gg;                     // per row: group sums of q, then of |q| [BM x 2G]; dO's
  std::vector<float> rq, mq;                      // dQ's references [BM x G]
  std::vector<double> rref, rmag, cs;  // a tile's row references, column sums
  std::vector<double> colb, ca;   // per key of the tile: its column bound, sum_i |X_ij|
  std::vector<double> qsq, gsq;   // per column group [NGROUP_MAX x D]: sum_i q_id^2, sum_i dO_id^2
  std::vector<float> grow, harm;  // per key of the tile (grow: per column group [NGROUP_MAX x BN])
  // per key of the task's key head
  std::vector<float> kmax;
  std::vector<double> knorm, vnorm;  // >= ||k_j||_2, ||v_j||_2
  AVec<float> kgT;  // per key: group sums of k, then of |k|, transposed [2G x ldk], zero beyond Mb
  std::vector<double> tks, tka, tvs, tva;            // per tile [D]
  AVec<float> rk, mk, rvm;                           // dK's references [G x ldk]; dV's [2G x ldk]
  // for the blind rule's bound (group_check): per query row of the block, max_j |dS_ij|; per
  // key of the task, max_i |dS_ij| then max_i P_ij [2 x ldk]; per group, the largest group sum
  // of |k| over the task's keys (wq), of |q| and of |dO| over its queries (wk, wv)
  std::vector<float> dsmax, wq, wk, wv;
  AVec<float> kcol;
  // the entries' verification threshold, TAU_VERIFY times vscale (head_backward), and the
  // largest vscale a task used
  double vscale = 1.0, vscale_used = 1.0;
  std::vector<int32_t> keybits, qbits;
  BwdScratch(int64_t D, int64_t M, int64_t nq, int64_t G, bool abft)
      : S((BWD_BM + 3 * BWD_NGROUP_MAX) * BWD_BN), S2((BWD_BM + 3 * BWD_NGROUP_MAX) * BWD_BN),
        Pm(BWD_BM * BWD_BN), dP((BWD_BM + 3 * BWD_NGROUP_MAX) * BWD_BN), dS(BWD_BM * BWD_BN), Qx((BWD_BM + BWD_NGROUP_MAX) * D),
        Gx((BWD_BM + BWD_NGROUP_MAX) * D),
        dQ(BWD_BM * D), m(BWD_BM), rinv(BWD_BM), Drow(BWD_BM), qmax(BWD_BM), gmax(BWD_BM), l(BWD_BM),
        drift(BWD_BM), knorm(M), keybits(M), qbits(nq) {
    if (!abft) return;
    dSa.resize(BWD_BM * BWD_BN);
    for (auto* x : {&rs, &rp, &rref, &rmag}) x->resize(BWD_BM);
    for (auto* x : {&qsum, &qabs, &gsum, &gabs}) x->resize(BWD_NGROUP_MAX * D);
    for (auto* x : {&qg, &gg}) x->resize(BWD_BM * 2 * G);
    for (auto* x : {&rq, &mq}) x->resize(BWD_BM * G);
    for (auto* x : {&cs, &colb, &ca}) x->resize(BWD_BN);
    for (auto* x : {&qsq, &gsq}) x->resize(BWD_NGROUP_MAX * D);
    grow.resize(BWD_NGROUP_MAX * BWD_BN);
    harm.resize(BWD_BN);
    const int64_t ntiles = (M + BWD_BN - 1) / BWD_BN;
    kmax.resize(M);
    vnorm.resize(M);
    const int64_t ldk = key_stride(M);
    for (auto* x : {&kgT, &rvm}) x->resize(ldk * 2 * G);
    for (auto* x : {&rk, &mk}) x->resize(ldk * G);
    for (auto* x : {&tks, &tka, &tvs, &tva}) x->resize(std::max<int64_t>(ntiles, 1) * D);
    dsmax.resize(BWD_BM);
    for (auto* x : {&wq, &wk, &wv}) x->resize(G);
    kcol.resize(2 * ldk);
  }
};

// ---------------------------------------------------------------------------
// Row kernels (one clone per ISA).

// out[c][j0..j0+NJ L) += sum_i coef[i * cs + c] X[i][j0..j0+NJ L) for c < NC (rows of out at
// stride ld_out): NC x NJ accumulators in registers over all the rows, one load of X per row
// and vector (V: 16 or 8 lanes, vec::Lanes). (Eight chains of multiply-adds where they fit:
// four, over one vector of keys, left half of the two FMA units idle, waiting on latency.)
template <int NC, int NJ, typename V>
FTATTN_VEC_INLINE void columns_block(const float* __restrict X, int64_t ld, int64_t rows,
                                     const float* __restrict coef, int64_t cs, int64_t j0, float* __restrict out,
                                     int64_t ld_out) {
  constexpr int64_t L = vec::Lanes<V>;
  V acc[NJ][NC];
  for (int u = 0; u < NJ; ++u)
    for (int c = 0; c < NC; ++c) acc[u][c] = V{};
  for (int64_t i = 0; i < rows; ++i) {
    V x[NJ];
    for (int u = 0; u < NJ; ++u) x[u] = vec::load_v<V>(X + i * ld + j0 + u * L);
    for (int c = 0; c < NC; ++c) {
      const float a = coef[i * cs + c];
      for (int u = 0; u < NJ; ++u) acc[u][c] += a * x[u];
    }
  }
  for (int u = 0; u < NJ; ++u)
    for (int c = 0; c < NC; ++c) {
      float* o = out + c * ld_out + j0 + u * L;
      vec::store_v(o, vec::load_v<V>(o) + acc[u][c]);
    }
}

// out[c][.] for c < count, in blocks of 4 (then the rest), over NJ vectors of keys from j0.
template <int NJ, typename V>
FTATTN_VEC_INLINE void columns(const float* __restrict X, int64_t ld, int64_t rows, const float* __restrict coef,
                               int64_t cs, int64_t count, int64_t j0, float* __restrict out, int64_t ld_out) {
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) columns_block<4, NJ, V>(X, ld, rows, coef + c, cs, j0, out + c * ld_out, ld_out);
  switch (count - c) {
    case 3: columns_block<3, NJ, V>(X, ld, rows, coef + c, cs, j0, out + c * ld_out, ld_out); break;
    case 2: columns_block<2, NJ, V>(X, ld, rows, coef + c, cs, j0, out + c * ld_out, ld_out); break;
    case 1: columns_block<1, NJ, V>(X, ld, rows, coef + c, cs, j0, out + c * ld_out, ld_out); break;
    default: break;
  }
}

// sums[r * G + g] += X[r] . T[g] over n keys for rows r < NR (at stride ld) and groups g0 <= g <
// g0 + NG (rows of T at stride ldt): NR x NG accumulators (eight chains where NG is 2).
template <int NR, int NG, typename V>
FTATTN_VEC_INLINE void row_dots(const float* __restrict X, int64_t ld, const float* __restrict T, int64_t ldt,
                                int64_t n, int64_t G, int64_t g0, float* __restrict sums) {
  constexpr int64_t L = vec::Lanes<V>;
  const int64_t nv = n / L * L;
  V acc[NR][NG];
  for (int r = 0; r < NR; ++r)
    for (int g = 0; g < NG; ++g) acc[r][g] = V{};
  for (int64_t j = 0; j < nv; j += L) {
    V tv[NG];
    for (int g = 0; g < NG; ++g) tv[g] = vec::load_v<V>(T + (g0 + g) * ldt + j);
    for (int r = 0; r < NR; ++r) {
      const V x = vec::load_v<V>(X + r * ld + j);
      for (int g = 0; g < NG; ++g) acc[r][g] += x * tv[g];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int g = 0; g < NG; ++g) {
      const float* t = T + (g0 + g) * ldt;
      float sum = vec::tree(acc[r][g], vec::Add{});
      for (int64_t j = nv; j < n; ++j) sum += X[r * ld + j] * t[j];
      sums[r * G + g0 + g] += sum;
    }
}

// The checksum references of dQ, dK and dV for one tile of `rows` query rows and n keys,
// accumulated: rq += dS kg and mq += |dS| kga [rows x G], rk += dS^T qg and mk += |dS|^T qga,
// rvm += P^T gg (kgT: the keys' group sums of k, then of |k|, transposed [2G x ldk]; qg / qga
// likewise of q, gg of dO and |dO|, [rows x 2G]; dS, dSa, P [rows x ld], ld >= n rounded up
// to 16; rk, mk [G x ldk] and rvm [2G x ldk] transposed too, from the tile's first key, ldk
// >= its n rounded up to the lanes: the key lanes beyond n land in padding). Five GEMMs with
// G or 2G columns did this through sgemm, whose skinny shapes ran ~16x below its speed on the
// tile's main products (64 x 256 x 4 took as long as 64 x 256 x 64): the largest part of a
// full backward (perf: MKL's sgemm_pst, 6753 samples against 8873 for the five main products,
// B1 H8 N2048 D64 causal). Here the dot products take the rows four at a time, the column
// sums keep four outputs in registers over all the rows and add them where they are kept.
// (fp32, as the GEMMs: the checks' bounds are unchanged. The key sums transposed once per
// head, and the column references kept transposed, not per tile: the transpose and the
// scatter back were a third of this function's time.)
// (On vectors V of the clone's width: 16-lane accumulators went through the stack, lane pairs
// by way of general registers, in the AVX2 code, where this was 18 % of a full forward +
// backward against 6 % on AVX-512.)
template <typename V>
__attribute__((always_inline)) static inline void tile_references_body(
    const float* __restrict dS, const float* __restrict dSa, const float* __restrict P, int64_t ld, int64_t rows,
    int64_t n, int64_t G, const float* __restrict kgT, int64_t ldk, const float* __restrict qg,
    const float* __restrict gg, float* __restrict rq, float* __restrict mq, float* __restrict rk,
    float* __restrict mk, float* __restrict rvm) {
  constexpr int64_t L = vec::Lanes<V>;
  const int64_t G2 = 2 * G, npad = (n + L - 1) / L * L;
  // rq, mq: rows of dS (|dS|) against the G sums of k (|k|), four rows and two groups at a time
  for (int which = 0; which < 2; ++which) {
    const float* X = which == 0 ? dS : dSa;
    const float* T = kgT + (which == 0 ? 0 : G * ldk);
    float* out = which == 0 ? rq : mq;
    int64_t i0 = 0;
    for (; i0 + 4 <= rows; i0 += 4) {
      int64_t g = 0;
      for (; g + 2 <= G; g += 2) row_dots<4, 2, V>(X + i0 * ld, ld, T, ldk, n, G, g, out + i0 * G);
      if (g < G) row_dots<4, 1, V>(X + i0 * ld, ld, T, ldk, n, G, g, out + i0 * G);
    }
    for (; i0 < rows; ++i0)
      for (int64_t g = 0; g < G; ++g) row_dots<1, 1, V>(X + i0 * ld, ld, T, ldk, n, G, g, out + i0 * G);
  }
  // rk, mk, rvm: the columns, over all the rows, two vectors of keys at a time
  int64_t j0 = 0;
  for (; j0 + 2 * L <= npad; j0 += 2 * L) {
    columns<2, V>(dS, ld, rows, qg, G2, G, j0, rk, ldk);
    columns<2, V>(dSa, ld, rows, qg + G, G2, G, j0, mk, ldk);
    columns<2, V>(P, ld, rows, gg, G2, G2, j0, rvm, ldk);
  }
  for (; j0 < npad; j0 += L) {
    columns<1, V>(dS, ld, rows, qg, G2, G, j0, rk, ldk);
    columns<1, V>(dSa, ld, rows, qg + G, G2, G, j0, mk, ldk);
    columns<1, V>(P, ld, rows, gg, G2, G2, j0, rvm, ldk);
  }
}
FTATTN_CLONES static void tile_references(const float* __restrict dS, const float* __restrict dSa,
                                          const float* __restrict P, int64_t ld, int64_t rows, int64_t n,
                                          int64_t G, const float* __restrict kgT, int64_t ldk,
                                          const float* __restrict qg, const float* __restrict gg,
                                          float* __restrict rq, float* __restrict mq, float* __restrict rk,
                                          float* __restrict mk, float* __restrict rvm) {
  if (wide_vectors())
    tile_references_body<vec::f16>(dS, dSa, P, ld, rows, n, G, kgT, ldk, qg, gg, rq, mq, rk, mk, rvm);
  else
    tile_references_body<vec::f8>(dS, dSa, P, ld, rows, n, G, kgT, ldk, qg, gg, rq, mq, rk, mk, rvm);
}

// The first pass over a row of a tile (where the forward's statistics are not used): m <-
// max(m, max_{j < vis} sgn S_j), the forward's raw max (its scores are those of sgn q, sgn
// the sign of scale), and the normaliser l rescaled to it, plus sum_{j < vis} exp((S_j -
// sgn m) scale) (fp64): P as probs_row makes it. On vectors V
// (vec::Lanes: 16 lanes where the code runs AVX-512, else 8, so that GCC 12 emits vector
// selects, the max and the clamp of exp, in the AVX2 clone too).
template <typename V>
__attribute__((always_inline)) static inline void row_lse_body(const float* __restrict S, int64_t vis, float scale,
                                                              float sgn, float* m, double* l) {
  constexpr int64_t L = vec::Lanes<V>;
  float mx = -std::numeric_limits<float>::infinity();
  V mxv = V{} + mx;
  int64_t t = 0;
  for (; t + L <= vis; t += L) {
    const V s = vec::load_v<V>(S + t) * sgn;
    mxv = s > mxv ? s : mxv;  // (NaN never enters a lane)
  }
  for (; t < vis; ++t) {
    const float s = S[t] * sgn;
    mx = s > mx ? s : mx;
  }
  const float vmx = vec::tree(mxv, vec::Max{});
  mx = vmx > mx ? vmx : mx;
  if (!(mx > *m)) mx = *m;  // (NaN scores leave the max: their p is NaN, and so the gradients)
  if (mx == -std::numeric_limits<float>::infinity()) return;
  const float mb = mx * sgn;
  double sum = 0.0;
  int64_t j = 0;
  for (; j + L <= vis; j += L) sum += vec::hsum(vec::widen_sum(exp_neg((vec::load_v<V>(S + j) - mb) * scale)));
  for (; j < vis; ++j) sum += static_cast<double>(exp_neg((S[j] - mb) * scale));
  *l = (*m == -std::numeric_limits<float>::infinity()
            ? 0.0
            : *l * std::exp((static_cast<double>(*m) - static_cast<double>(mx)) * std::fabs(static_cast<double>(scale)))) +
       sum;
  *m = mx;
}
FTATTN_CLONES static void row_lse(const float* __restrict S, int64_t vis, float scale, float sgn, float* m,
                                  double* l) {
  if (wide_vectors()) row_lse_body<vec::f16>(S, vis, scale, sgn, m, l);
  else row_lse_body<vec::f8>(S, vis, scale, sgn, m, l);
}

// P_j = exp((S_j - mb) scale) rinv for j < vis, 0 beyond (the same values at every level): the
// forward's p (softmax.h; mb = sgn m, the raw score at the row's max), so that its normaliser
// serves. SUM (the checks): *sum += sum_j P_j (fp64) of the values as made, before they are
// stored (row_checks sums them as read back).
template <bool SUM, typename V>
__attribute__((always_inline)) static inline void probs_row_body(const float* __restrict S, float* __restrict P,
                                                                int64_t n, int64_t vis, float scale, float m,
                                                                float rinv, double* sum) {
  constexpr int64_t L = vec::Lanes<V>;
  vec::d8 acc = vec::d8{};
  int64_t j = 0;
  for (; j + L <= vis; j += L) {
    const V p = exp_neg((vec::load_v<V>(S + j) - m) * scale) * rinv;
    if constexpr (SUM) acc += vec::widen_sum(p);
    vec::store_v(P + j, p);
  }
  if (j < vis) {  // the vector across the last visible key, its later lanes 0 (rows of BWD_BN, a
                  // multiple of L: in the buffer; one key at a time this tail cost a causal row's
                  // diagonal tile up to 15 scalar exponentials)
    const V p = vec::lanes_below<V>(vis - j) ? exp_neg((vec::load_v<V>(S + j) - m) * scale) * rinv : V{};
    if constexpr (SUM) acc += vec::widen_sum(p);
    vec::store_v(P + j, p);
    j += L;
  }
  for (; j < n; ++j) P[j] = 0.f;
  if constexpr (SUM) *sum += vec::hsum(acc);
}
FTATTN_CLONES static void probs_row(const float* __restrict S, float* __restrict P, int64_t n, int64_t vis,
                                    float scale, float m, float rinv, double* sum) {
  if (sum != nullptr) {
    if (wide_vectors()) probs_row_body<true, vec::f16>(S, P, n, vis, scale, m, rinv, sum);
    else probs_row_body<true, vec::f8>(S, P, n, vis, scale, m, rinv, sum);
  } else {
    if (wide_vectors()) probs_row_body<false, vec::f16>(S, P, n, vis, scale, m, rinv, sum);
    else probs_row_body<false, vec::f8>(S, P, n, vis, scale, m, rinv, sum);
  }
}

// dS_j = P_j (dP_j - D) for j < vis, 0 beyond.
FTATTN_CLONES static void ds_row(const float* __restrict P, const float* __restrict dP, float* __restrict dS,
                                 int64_t n, int64_t vis, float Di) {
#pragma omp simd
  for (int64_t j = 0; j < vis; ++j) dS[j] = P[j] * (dP[j] - Di);
  for (int64_t j = vis; j < n; ++j) dS[j] = 0.f;
}

// The redundant softmax (full): P made again by probs_row's operations from the same S, m,
// scale and 1 / l (copies the compiler cannot see through: a distinct computation), against P
// bit for bit (deterministic: equal unless a fault struck; a tolerance, as the exp2 formulation
// of stops before needed, passed changes of P that harm the gradients where dO is large and
// cancels); true when some visible entry differs. Keys whose score is NaN are left out
// (non-finite input: P and its copy are NaN there, their payloads per the instructions'
// operand order).
template <typename V>
__attribute__((always_inline)) static inline bool probs_dmr_body(const float* __restrict S,
                                                                const float* __restrict P, int64_t vis, float scale,
                                                                float m, float rinv) {
  // (explicit vectors: as an `omp simd` loop GCC 12 left the AVX2 clone scalar, "control flow
  // in loop", though a plain -march=x86-64-v3 build vectorised it; on 8 lanes where the code
  // has no AVX-512, vec::Lanes)
  using namespace vec;
  using U = typename LaneBits<V>::type;
  constexpr int64_t L = Lanes<V>;
  opaque(scale);
  opaque(m);
  opaque(rinv);
  U diff = U{};
  int64_t j = 0;
  for (; j + L <= vis; j += L) {
    const V sv = load_v<V>(S + j);
    const U d = reinterpret_cast<U>(load_v<V>(P + j)) ^ reinterpret_cast<U>(exp_neg((sv - m) * scale) * rinv);
    diff |= sv == sv ? d : U{};
  }
  if (j < vis) {  // the vector across the last visible key (as probs_row), its later lanes out
    const V sv = load_v<V>(S + j);
    const V p2 = vec::lanes_below<V>(vis - j) ? exp_neg((sv - m) * scale) * rinv : V{};
    const U d = reinterpret_cast<U>(load_v<V>(P + j)) ^ reinterpret_cast<U>(p2);
    diff |= vec::lanes_below<V>(vis - j) & (sv == sv) ? d : U{};
  }
  uint32_t any = 0;
  for (int64_t l = 0; l < L; ++l) any |= diff[l];
  return any != 0;
}
FTATTN_CLONES static bool probs_dmr_fails(const float* __restrict S, const float* __restrict P, int64_t vis,
                                          float scale, float m, float rinv) {
  return wide_vectors() ? probs_dmr_body<vec::f16>(S, P, vis, scale, m, rinv)
                        : probs_dmr_body<vec::f8>(S, P, vis, scale, m, rinv);
}

// A row's checks of P and dS, and its sums: P in [0, pcap] (else kProbsRange: pcap is 1, or
// a little more where the forward's statistics serve, head_backward); each dS_j made
// again, P_j (dP_j - D) for a visible key and 0 for a masked one, and compared with the
// stored one (the same fp32 operations on the same operands round alike, so any difference
// is a fault; a NaN dS fails, as the former sum check did: else kDsCheck), at every level; rs +=
// sum_j P_j (fp64) and dSa, the row's |dS| for the references of dQ and dK.
FTATTN_CLONES static int32_t row_checks(const float* __restrict P, const float* __restrict dP,
                                        const float* __restrict dS, int64_t n, int64_t vis, float Di,
                                        float pcap, float* __restrict dSa, double* rs) {
  // (`omp simd` loops, the visible keys then the masked ones: GCC 12 vectorises these in
  // every clone; 16-lane vector-extension code with a compare feeding a select of the
  // stored dS was scalarised under target_clones, 3.5x slower on AVX-512 and on AVX2 alike)
  float pmin = 1.f, pmax = 0.f;
  int differ = 0;
  double r = 0.0;
  const int64_t v = std::min<int64_t>(std::max<int64_t>(vis, 0), n);
#pragma omp simd reduction(min : pmin) reduction(max : pmax) reduction(| : differ) reduction(+ : r)
  for (int64_t j = 0; j < v; ++j) {
    const float p = P[j], s = dS[j];
    const float again = p * (dP[j] - Di);
    pmin = p < pmin ? p : pmin;
    pmax = p > pmax ? p : pmax;
    differ |= !(again == s);
    dSa[j] = std::fabs(s);
    r += static_cast<double>(p);
  }
#pragma omp simd reduction(min : pmin) reduction(max : pmax) reduction(| : differ) reduction(+ : r)
  for (int64_t j = v; j < n; ++j) {
    const float p = P[j], s = dS[j];
    pmin = p < pmin ? p : pmin;
    pmax = p > pmax ? p : pmax;
    differ |= !(s == 0.f);
    dSa[j] = std::fabs(s);
    r += static_cast<double>(p);
  }
  // (a NaN p enters neither the min nor the max: it makes the sum NaN)
  const bool bad_p = !(pmin >= 0.f && pmax <= pcap) || r != r;
  *rs += r;
  return (bad_p ? kProbsRange : 0) | (differ ? kDsCheck : 0);
}

// For the keys j < vis of a row: harm[j], a bound on what a fault the column check misses
// can do to the gradients through entry j (see head_backward: grow[j] = e^{2 colb_j scale}
// - 1 for S, 2 colb_j for dP, raised by 2^-10 against fp32 rounding here); returns the
// largest (NaN: infinity, so that the row is verified).
FTATTN_CLONES static float harm_bounds(const float* __restrict p, const float* __restrict dP,
                                       const float* __restrict grow, const float* __restrict kmax, int64_t vis,
                                       bool scores, float Di, float gmax, float qmax, float ascale,
                                       float* __restrict harm) {
  float hi = 0.f;
  if (scores) {
#pragma omp simd reduction(max : hi)
    for (int64_t j = 0; j < vis; ++j) {
      const float reach = ascale * (kmax[j] > qmax ? kmax[j] : qmax);
      const float h = p[j] * grow[j] * (2.f * (gmax + reach * std::fabs(dP[j] - Di)));
      harm[j] = h == h ? h : std::numeric_limits<float>::infinity();
      hi = harm[j] > hi ? harm[j] : hi;
    }
  } else {
#pragma omp simd reduction(max : hi)
    for (int64_t j = 0; j < vis; ++j) {
      const float h = p[j] * grow[j] * (2.f * ascale * (kmax[j] > qmax ? kmax[j] : qmax));
      harm[j] = h == h ? h : std::numeric_limits<float>::infinity();
      hi = harm[j] > hi ? harm[j] : hi;
    }
  }
  return hi;
}

// The entries j < vis of one row whose harm[j] >= thr (harm_bounds; thr: TAU_VERIFY times the
// task's gradient scale, head_backward): each product
// a . b_j (b_j: row j of Bt) made in fp64 and compared with x[j] (entry_mismatch); returns
// 1 when one disagrees, | 2 when that comparison's own bound could still hide harm
// (scores: p (e^{2 bound scale} - 1) gain, gain = 2 (gmax + reach |dP_j - D|); dP: p 2 bound
// 2 reach), so that the tile's product is made again. (A clone of its own: inlined into
// head_backward, which has none, the fp64 vectors ran on SSE2 and spilled, 2086 perf samples
// against 9559 for the five products at D128 causal, normal data.)
// (The screen harm_j >= thr a vector at a time, vec::mask_bits: a scalar compare and
// branch per key was 38 % of this function's time at B8 H12 N128 D32, MiniLM's shape.)
template <typename V>
__attribute__((always_inline)) static inline int verify_entries_body(
    const float* __restrict a, const float* __restrict Bt, int64_t D, const float* __restrict x,
    const float* __restrict p, const float* __restrict dP, const float* __restrict harm,
    const float* __restrict kmax, int64_t vis, bool scores, float Di, float gmax, float qmax, float ascale,
    double noise, double floor, double thr) {
  using namespace vec;
  constexpr int64_t L = Lanes<V>;
  const float tau = static_cast<float>(thr);
  int found = 0;
  const auto visit = [&](int64_t j) {
    const double pj = static_cast<double>(p[j]);
    const double reach = static_cast<double>(ascale) * std::max(qmax, kmax[j]);
    const double gain =
        scores ? 2.0 * (static_cast<double>(gmax) +
                        reach * std::fabs(static_cast<double>(dP[j]) - static_cast<double>(Di)))
               : 2.0 * reach;
    double bound = 0.0;
    if (entry_mismatch<L>(a, Bt + j * D, D, x[j], noise, floor, &bound)) found |= 1;
    const double hidden =
        scores ? pj * grow_bound(2.0 * bound * static_cast<double>(ascale)) * gain : pj * 2.0 * bound * gain;
    if (!(hidden < thr)) found |= 2;
  };
  int64_t j = 0;
  for (; j + L <= vis; j += L)  // (harm has no NaN: harm_bounds makes it infinity)
    for (uint32_t lanes = mask_bits(load_v<V>(harm + j) >= tau); lanes != 0; lanes &= lanes - 1)
      visit(j + __builtin_ctz(lanes));
  for (; j < vis; ++j)
    if (harm[j] >= tau) visit(j);
  return found;
}
FTATTN_CLONES static int verify_entries(const float* __restrict a, const float* __restrict Bt, int64_t D,
                                        const float* __restrict x, const float* __restrict p,
                                        const float* __restrict dP, const float* __restrict harm,
                                        const float* __restrict kmax, int64_t vis, bool scores, float Di, float gmax,
                                        float qmax, float ascale, double noise, double floor, double thr) {
  return wide_vectors()
             ? verify_entries_body<vec::f16>(a, Bt, D, x, p, dP, harm, kmax, vis, scores, Di, gmax, qmax, ascale,
                                             noise, floor, thr)
             : verify_entries_body<vec::f8>(a, Bt, D, x, p, dP, harm, kmax, vis, scores, Di, gmax, qmax, ascale,
                                            noise, floor, thr);
}

// out[i] = a_i . b_i (fp64) for the rows i < n of A and B [n x D], in fp64 lanes of 8 (in
// head_backward, which has no clones, D_i = dO_i . O_i was a scalar SSE2 loop; with the
// drift's |q_i|^2, 13 % of its own samples at B8 H12 N128 D32).
FTATTN_CLONES static void row_dots_d(const float* __restrict A, const float* __restrict B, int64_t n, int64_t D,
                                     double* __restrict out) {
  using vec::d8;
  for (int64_t i = 0; i < n; ++i) {
    const float* a = A + i * D;
    const float* b = B + i * D;
    d8 acc = d8{};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      vec::f8 av, bv;
      std::memcpy(&av, a + d, sizeof(av));
      std::memcpy(&bv, b + d, sizeof(bv));
      acc += __builtin_convertvector(av, d8) * __builtin_convertvector(bv, d8);
    }
    double s = vec::hsum(acc);
    for (; d < D; ++d) s += static_cast<double>(a[d]) * static_cast<double>(b[d]);
    out[i] = s;
  }
}

// One column group's check of a tile of S (scores) or dP, per key j < n: the bound colb_j =
// row_f (sp norm_j + ca_j) + tiny norm_j + col_abs of |cs_j - ref_j| (true when one exceeds
// it: a NaN fails; colb: work space [n]) and the harm factor grow_j of a fault it misses,
// e^{2 colb_j scale} - 1 from above for S (grow_bound), 2 colb_j for dP, raised by 2^-10
// against fp32 rounding. (A
// clone of its own, the loop in vectors: in head_backward, which has none, it was a quarter
// of that function's own samples at B8 H12 N128 D32.)
FTATTN_CLONES static bool column_group_check(const double* __restrict cs, const double* __restrict ca,
                                             const float* __restrict ref, const double* __restrict norm,
                                             int64_t n, double row_f, double sp, double tiny, double col_abs,
                                             bool scores, double ascale, double* __restrict colb,
                                             float* __restrict grow) {
  int bad = 0;
  const double s2 = 2.0 * ascale;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) {
    colb[j] = row_f * (sp * norm[j] + ca[j]) + tiny * norm[j] + col_abs;
    bad |= !(std::fabs(cs[j] - static_cast<double>(ref[j])) <= colb[j]);
    const double x = scores ? s2 * colb[j] : 2.0 * colb[j];
    // (x (1 + x) >= e^x - 1 up to x = 1/2, grow_bound; beyond, the loop below)
    grow[j] = static_cast<float>((scores ? x * (1.0 + x) : x) * (1.0 + 0x1p-10));
  }
  if (scores)
    for (int64_t j = 0; j < n; ++j)
      if (!(static_cast<double>(grow[j]) <= 0.5))  // (beyond 1/2, or NaN: the exact bound)
        grow[j] = static_cast<float>(grow_bound(s2 * colb[j]) * (1.0 + 0x1p-10));
  return bad != 0;
}

// dst[i] = src[i] alpha for i < n.
FTATTN_CLONES static void scaled_copy(float* __restrict dst, const float* __restrict src, int64_t n, float alpha) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * alpha;
}

// norm[j] >= ||x_j||_2 for the n rows of X [n x D]: the squares summed in fp32 vectors, the
// root raised past their rounding (D + 16) u (a sum of D non-negative terms rounds by at most
// (D - 1) u relative; the tree and the root a little more); a row whose fp32 sum could have
// overflowed or underflowed (above 2^120, below 2^-100) in fp64. (In fp64 lanes, with their
// conversions, these norms of K and V were half of row_dots_d's samples at B8 H12 N128 D32,
// itself a sixth of the sgemm kernels'.)
template <typename V>
__attribute__((always_inline)) static inline void key_norms_body(const float* __restrict X, int64_t n, int64_t D,
                                                                double* __restrict norm) {
  constexpr int64_t L = vec::Lanes<V>;
  const double raise = 1.0 + static_cast<double>(D + 16) * U32;
  for (int64_t j = 0; j < n; ++j) {
    const float* x = X + j * D;
    V acc = V{};
    int64_t d = 0;
    for (; d + L <= D; d += L) {
      const V v = vec::load_v<V>(x + d);
      acc += v * v;
    }
    float s = vec::tree(acc, vec::Add{});
    for (; d < D; ++d) s += x[d] * x[d];
    if (s <= 0x1p120f && s >= 0x1p-100f) {
      norm[j] = std::sqrt(static_cast<double>(s)) * raise;
    } else {  // (also a NaN or zero row: fp64, as before)
      double t = 0.0;
      for (int64_t e = 0; e < D; ++e) t += static_cast<double>(x[e]) * static_cast<double>(x[e]);
      norm[j] = std::sqrt(t) * (1.0 + 0x1p-40);
    }
  }
}
FTATTN_CLONES static void key_norms(const float* __restrict X, int64_t n, int64_t D, double* __restrict norm) {
  if (wide_vectors()) key_norms_body<vec::f16>(X, n, D, norm);
  else key_norms_body<vec::f8>(X, n, D, norm);
}

// For nr (1..4) rows of X at stride ld: each row's sum rsum[r] and their part of the column
// sums cs[j] += sum_r x_rj and ca[j] += sum_r |x_rj| (fp64; the rows added as (x0 + x1) +
// (x2 + x3): the column sums are loaded and stored once per four rows, which was most of their cost).
FTATTN_CLONES static void row_col_sums(const float* __restrict X, int64_t ld, int64_t nr, int64_t n,
                                       double* __restrict rsum, double* __restrict cs, double* __restrict ca) {
  if (nr == 4) {
    const float *x0 = X, *x1 = X + ld, *x2 = X + 2 * ld, *x3 = X + 3 * ld;
    double r0 = 0.0, r1 = 0.0, r2 = 0.0, r3 = 0.0;
#pragma omp simd reduction(+ : r0, r1, r2, r3)
    for (int64_t j = 0; j < n; ++j) {
      const double a = x0[j], b = x1[j], c = x2[j], d = x3[j];
      r0 += a, r1 += b, r2 += c, r3 += d;
      cs[j] += (a + b) + (c + d);
      ca[j] += (std::fabs(a) + std::fabs(b)) + (std::fabs(c) + std::fabs(d));
    }
    rsum[0] = r0, rsum[1] = r1, rsum[2] = r2, rsum[3] = r3;
    return;
  }
  for (int64_t r = 0; r < nr; ++r) {
    const float* x = X + r * ld;
    double t = 0.0;
#pragma omp simd reduction(+ : t)
    for (int64_t j = 0; j < n; ++j) {
      const double v = x[j];
      t += v;
      cs[j] += v;
      ca[j] += std::fabs(v);
    }
    rsum[r] = t;
  }
}

// sum_d x_d and sum_d |x_d| (fp64) and max_d |x_d| over n floats, in fp64 lanes of 8 and
// then the rest: summed one after the other, each group was a chain of dependent fp64 adds
// (group_sums and group_check: 10.7 % of a full backward's samples at B8 H12 N128 D32).
// A NaN x makes the sums NaN and leaves the max alone. WEIGHTED: sum_d w_d x_d instead of
// sum_d x_d (w = PV_WEIGHTS, each product exact in fp64), for weighted_sums.
template <bool WEIGHTED = false>
FTATTN_VEC_INLINE void span_sums(const float* __restrict x, int64_t n, double& s, double& a, double& mx) {
  using vec::d8;
  d8 vs = d8{}, va = d8{}, vm = d8{};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    vec::f8 xf;
    std::memcpy(&xf, x + d, sizeof(xf));
    const d8 xd = __builtin_convertvector(xf, d8), xa = vec::abs(xd);
    if constexpr (WEIGHTED) {
      vec::f8 wf;
      std::memcpy(&wf, PV_WEIGHTS.w + d, sizeof(wf));
      vs += xd * __builtin_convertvector(wf, d8);
    } else {
      vs += xd;
    }
    va += xa;
    vm = xa > vm ? xa : vm;
  }
  s = vec::hsum(vs);
  a = vec::hsum(va);
  mx = vec::tree(vm, vec::Max{});
  for (; d < n; ++d) {
    const double v = static_cast<double>(x[d]), av = std::fabs(v);
    s += WEIGHTED ? v * static_cast<double>(PV_WEIGHTS.w[d]) : v;
    a += av;
    mx = av > mx ? av : mx;
  }
}

// sum_d w_d x_d (fp64; w = PV_WEIGHTS / 4, each product exact) and sum_d |x_d| / 16 >= sum_d
// |w_d x_d| over D floats: the weighted checksum group (bwd_groups). |w_d| < 1/16 keeps both
// within 16 max |x|, as a 16-dim group's sums, so they overflow fp32 no sooner.
FTATTN_VEC_INLINE void weighted_sums(const float* __restrict x, int64_t D, double& s, double& a) {
  double mx;
  span_sums<true>(x, D, s, a, mx);
  s *= 0.25;
  a *= 1.0 / 16.0;
}

// Per row r of X [n x D]: the sums of its groups of BWD_GROUP dims, xg[r * rs + g * gs], then
// those of |x|, xg[r * rs + (G + g) * gs] (fp64, rounded to fp32; rs = 2G, gs = 1 for rows of
// sums, rs = 1, gs = ldk for the keys' transposed ones), and its largest |x|. Where G is one
// more than the groups of D (bwd_groups: full), the last is the weighted checksum's: sum_d w_d
// x_d over every dim, and sum_d |x_d| (|w_d| < 1) for its bound.
FTATTN_CLONES static void group_sums(const float* __restrict X, int64_t n, int64_t D, int64_t G,
                                     float* __restrict xg, int64_t rs, int64_t gs, float* __restrict xmax) {
  const int64_t Gp = (D + BWD_GROUP - 1) / BWD_GROUP;
  for (int64_t r = 0; r < n; ++r) {
    const float* x = X + r * D;
    double mx = 0.0;
    for (int64_t g = 0; g < Gp; ++g) {
      const int64_t d0 = g * BWD_GROUP, d1 = std::min<int64_t>(D, d0 + BWD_GROUP);
      double s, a, m;
      span_sums(x + d0, d1 - d0, s, a, m);
      mx = m > mx ? m : mx;
      xg[r * rs + g * gs] = static_cast<float>(s);
      xg[r * rs + (G + g) * gs] = static_cast<float>(a);
    }
    if (G > Gp) {
      double s, a;
      weighted_sums(x, D, s, a);
      xg[r * rs + Gp * gs] = static_cast<float>(s);
      // (+2^-126: s rounds to fp32 within 2^-150 absolute where it is subnormal, which f >= 2u
      // times this covers per unit of the other operand; a plain group's subnormal sum is exact.
      // Without it, k ~ 1e-42 with dO ~ 1e4 alarmed at full: review)
      xg[r * rs + (G + Gp) * gs] = static_cast<float>(a + 0x1p-126);
    }
    xmax[r] = static_cast<float>(mx);
  }
}

// The largest terms of a tile for the blind rule's bound (group_check): rmax[i] = max(rmax[i],
// max_j dSa_ij) per row, cds[j] = max(cds[j], max_i dSa_ij) and cp[j] = max(cp[j], max_i P_ij)
// per key j < n (dSa = |dS| and P as the references' products read them).
FTATTN_CLONES static void tile_maxima(const float* __restrict dSa, const float* __restrict P, int64_t ld,
                                      int64_t rows, int64_t n, float* __restrict rmax, float* __restrict cds,
                                      float* __restrict cp) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* a = dSa + i * ld;
    const float* p = P + i * ld;
    float m = rmax[i];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      m = a[j] > m ? a[j] : m;
      cds[j] = a[j] > cds[j] ? a[j] : cds[j];
      cp[j] = p[j] > cp[j] ? p[j] : cp[j];
    }
    rmax[i] = m;
  }
}

// The rows r of acc [n x D] whose group sums disagree with their references ref[r * ldr + g *
// gsr] (fp32 GEMMs of the same K terms over the group sums of the other operand) beyond
// (2 kappa sqrt(K + 2) + 2) u mag[r * ldm + g * gsm] + ETA (|g| + 2)(K + 2): each side's rounding
// (kappa u sqrt(K + 2) relative to the sum of magnitudes, as ftattn/reference.py's bound for
// one side) and the rounding of the group sums to fp32. bits[r] |= bit for those rows.
// Harm (protection full): a row whose checksums cannot see every harmful fault gets kBlind, and
// the task is made again and the row compared bit for bit (attention_bwd_cpu's task loop). Harm
// is relative to the gradient (FAULT_MODEL.md: tau max(1, max |g|)), the bound to the
// magnitudes summed; where they cancel (values of 3e3 whose outputs cancel: dK moved 774x the
// threshold unseen) the bound is many times the threshold. In the row's units the threshold
// is H = max(floor, tau max_d |acc_d|) (row_max; else the floor alone: a GQA group's query
// heads add up, and may cancel, in dK and dV), and a row is blind where a group's rounding
// exceeds PV_BLIND H or its difference H / 4 (csrc/attention/block.h PV_BLIND: the forward's
// rule). The rounding there is the check's bound, or, where smaller, its statistical estimate
// from the terms' squares (the check itself keeps the bound: no new alarm): f (||t||_2 + sum_d
// |acc_d|), the terms t of the group's K-term dot products (checked side and reference, both
// within sum_j x_j^2 (sum_d |w_jd|)^2 <= max_j (|x_j| sum_d |w_jd|) mag, the largest term at most
// xmax_r wmax_g) plus the drift of partial sums whose terms share a sign (|sum| of the group's
// accumulators), as the forward's score verification. The bound from sum |t| grows as K and
// the harm as sqrt K: with gradients of ~1e2 and more (fp16 loss scaling), rows of normal data
// went blind from ~500 keys, and a full backward ran twice (1.9x abft at N = M = 1024).
struct Harm {
  double tau = 0.0;  // 0: no blindness test (abft)
  double floor = 0.0;
  bool row_max = false;
};
FTATTN_CLONES static void group_check(const float* acc, int64_t n, int64_t D, int64_t G, const float* ref,
                                      int64_t ldr, int64_t gsr, const float* mag, int64_t ldm, int64_t gsm,
                                      int64_t K, int32_t bit, int32_t* bits, double eta, const Harm& harm,
                                      const float* xmax = nullptr, const float* wmax = nullptr) {
  const double f = (2.0 * KAPPA * std::sqrt(static_cast<double>(K + 2)) + 2.0) * U32;
  const int64_t Gp = (D + BWD_GROUP - 1) / BWD_GROUP;
  for (int64_t r = 0; r < n; ++r) {
    bool bad = false;
    double row_max = 0.0, worst_bound = 0.0, worst_diff = 0.0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t d0 = g < Gp ? g * BWD_GROUP : 0, d1 = g < Gp ? std::min<int64_t>(D, d0 + BWD_GROUP) : D;
      double s, a, m = 0.0;
      if (g < Gp)
        span_sums(acc + r * D + d0, d1 - d0, s, a, m);
      else  // (the weighted checksum: group_sums)
        weighted_sums(acc + r * D, D, s, a);
      const double mg = static_cast<double>(mag[r * ldm + g * gsm]), under = eta * static_cast<double>((d1 - d0 + 2) * (K + 2));
      const double bound = f * mg + under;
      const double diff = std::fabs(s - static_cast<double>(ref[r * ldr + g * gsr]));
      bad |= !within(diff, bound);
      if (g < Gp) {
        row_max = std::max(row_max, m);
        double rounding = bound;
        if (xmax != nullptr) {  // (the statistical estimate, where smaller; 2^-6 for fp32 magnitudes)
          const double top = static_cast<double>(xmax[r]) * static_cast<double>(wmax[g]);
          rounding = std::min(bound, f * (std::sqrt(mg * top) + a) * (1.0 + 0x1p-6) + under);
        }
        worst_bound = std::max(worst_bound, rounding);
        worst_diff = std::max(worst_diff, diff);
      }
    }
    if (bad) {
      bits[r] |= bit;
    } else if (harm.tau > 0.0) {
      const double H = std::max(harm.floor, harm.row_max ? harm.tau * row_max : 0.0);
      if (!(worst_bound <= PV_BLIND * H) || !(worst_diff <= 0.25 * H)) bits[r] |= kBlind;
    }
  }
}

// ---------------------------------------------------------------------------
// One task: query head h of sample b. Writes its dQ rows, its dK / dV buffers and, per
// query block and per key, the check bits of this run into w.qbits and w.keybits.

// X [rows x n] (row stride ld) rounded to the nearest bf16 (ties to even; 0 below 2^-126,
// which the bf16 GEMM reads as 0): its bits in Xb, its value in Xr and, where Xa is given,
// |Xr| in Xa (same stride).
// (one entry k of them from its bits h)
FTATTN_VEC_INLINE void store_bf16(uint16_t h, int64_t k, uint16_t* __restrict Xb, float* __restrict Xr,
                                  float* __restrict Xa) {
  const float x = bf16_value(h);
  Xb[k] = h;
  Xr[k] = x;
  if (Xa != nullptr) Xa[k] = std::fabs(x);
}
FTATTN_CLONES static void round_bf16_bits(const float* __restrict X, int64_t rows, int64_t n, int64_t ld,
                                          uint16_t* __restrict Xb, float* __restrict Xr, float* __restrict Xa) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) store_bf16(bf16_gemm_bits(X[i * ld + j]), i * ld + j, Xb, Xr, Xa);
  }
}
#if FTATTN_BF16_CVT
// The same on VCVTNEPS2BF16 (bf16_round_hw; AVX512-BF16): 16 entries a vector, the rest of a
// row as above (per perf, the bit arithmetic was 9 % of a bf16 forward + backward at off,
// B1 H8 N2048 D64 causal).
FTATTN_BF16_CVT_TARGET static void round_bf16_hw(const float* __restrict X, int64_t rows, int64_t n, int64_t ld,
                                                 uint16_t* __restrict Xb, float* __restrict Xr,
                                                 float* __restrict Xa) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* x = X + i * ld;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const bf16x16 h = bf16_round_hw(vec::load_v<vec::f16>(x + j));
      const vec::f16 r = bf16_widen_hw(h);
      std::memcpy(Xb + i * ld + j, &h, sizeof(h));
      vec::store_v(Xr + i * ld + j, r);
      if (Xa != nullptr) vec::store_v(Xa + i * ld + j, vec::abs(r));
    }
    for (; j < n; ++j) store_bf16(bf16_gemm_bits_daz(x[j]), i * ld + j, Xb, Xr, Xa);  // (as the instruction rounds)
  }
}
#endif
// X [rows, n] (row stride ld) rounded to bf16 for the bf16 GEMM: the bits Xb, their values Xr
// and, where asked, |Xr| (Xa).
static void round_bf16(bool cvt, const float* X, int64_t rows, int64_t n, int64_t ld, uint16_t* Xb, float* Xr,
                       float* Xa) {
#if FTATTN_BF16_CVT
  if (cvt) return round_bf16_hw(X, rows, n, ld, Xb, Xr, Xa);
#endif
  round_bf16_bits(X, rows, n, ld, Xb, Xr, Xa);
}

// The largest |x_i| of n floats; infinity where one is not finite.
FTATTN_CLONES static double abs_max(const float* __restrict x, int64_t n) {
  float m = 0.f;
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    bad |= !(a <= std::numeric_limits<float>::max());
    m = a > m ? a : m;
  }
  return bad ? std::numeric_limits<double>::infinity() : static_cast<double>(m);
}

void head_backward(const BwdProblem& P, BwdScratch& w, int64_t b, int64_t h, const FaultSpec& f) {
  const int64_t D = P.D, N = P.N, G = P.G, group = P.Hq / P.Hkv, hk = h / group;
  const int64_t first = P.key_first(b), Mb = P.key_count(b), shift = Mb - N;
  const bool abft = P.protection >= 1, full = P.protection >= 2;
  const float scale = P.scale, ascale = std::fabs(scale);
  const float sgn = scale < 0.f ? -1.f : 1.f;  // (the forward's scores are those of sgn q: its max is of sgn S)
  const float* Q = P.q + (b * P.Hq + h) * N * D;
  const float* O = P.o + (b * P.Hq + h) * N * D;
  const float* Gd = P.g + (b * P.Hq + h) * N * D;
  const float* K = P.k + ((b * P.Hkv + hk) * P.M + first) * D;
  const float* V = P.v + ((b * P.Hkv + hk) * P.M + first) * D;
  const uint16_t* K16 = P.k16 != nullptr ? P.k16 + ((b * P.Hkv + hk) * P.M + first) * D : nullptr;
  const uint16_t* V16 = P.v16 != nullptr ? P.v16 + ((b * P.Hkv + hk) * P.M + first) * D : nullptr;
  const int64_t packed = (b * P.Hkv + hk) * P.packed_stride;
  const uint32_t* K16t = P.k16t != nullptr ? P.k16t + packed : nullptr;
  const uint32_t* V16t = P.v16t != nullptr ? P.v16t + packed : nullptr;
  const uint32_t* K16n = P.k16n != nullptr ? P.k16n + packed : nullptr;
  const int64_t t_panel = (D + 1) / 2 * 64, n_panel = (Mb + 1) / 2 * 64;  // (their panels' strides)
  if (P.p16 && w.Pb.size() < static_cast<size_t>(BWD_BM * BWD_BN)) {
    for (auto* x : {&w.Pb, &w.dSb}) x->resize(BWD_BM * BWD_BN);
    for (auto* x : {&w.Pr, &w.dSr, &w.dSra}) x->resize(BWD_BM * BWD_BN);
    for (auto* x : {&w.GhP, &w.QhP}) x->resize((D + 63) / 64 * ((BWD_BM + 1) / 2) * 64);
  }
  float* dQout = P.dq + (b * P.Hq + h) * N * D;
  float* dK = P.dkh + ((b * P.Hq + h) * P.M + first) * D;
  float* dV = P.dvh + ((b * P.Hq + h) * P.M + first) * D;
  const bool fh = f.active && f.batch == b && f.head == h;
  const int64_t ldk = key_stride(Mb);  // (the transposed per-key references)
  const int64_t fcol = f.col - first;  // the fault's key in this sample's keys
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const double sqrtD = std::sqrt(static_cast<double>(D));
  std::fill(dK, dK + Mb * D, 0.f);
  std::fill(dV, dV + Mb * D, 0.f);
  std::fill(w.qbits.begin(), w.qbits.end(), 0);
  std::fill(w.keybits.begin(), w.keybits.begin() + Mb, 0);
  const int64_t ntiles = (Mb + BWD_BN - 1) / BWD_BN;
  if ((abft || P.stats) && Mb > 0) key_norms(K, Mb, D, w.knorm.data());
  // the largest ||k_j|| (for the drift of the scores made here from the forward's, below)
  const double knorm_max = P.stats && Mb > 0 ? *std::max_element(w.knorm.begin(), w.knorm.begin() + Mb) : 0.0;
  if (abft && Mb > 0) {
    group_sums(K, Mb, D, G, w.kgT.data(), 1, ldk, w.kmax.data());
    for (int64_t c = 0; c < 2 * G; ++c) std::fill(w.kgT.data() + c * ldk + Mb, w.kgT.data() + (c + 1) * ldk, 0.f);
    key_norms(V, Mb, D, w.vnorm.data());
    std::fill(w.rk.begin(), w.rk.begin() + ldk * G, 0.f);
    std::fill(w.mk.begin(), w.mk.begin() + ldk * G, 0.f);
    std::fill(w.rvm.begin(), w.rvm.begin() + ldk * 2 * G, 0.f);
    std::fill(w.kcol.begin(), w.kcol.begin() + 2 * ldk, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      const float* ka = w.kgT.data() + (G + g) * ldk;
      w.wq[g] = *std::max_element(ka, ka + Mb);
      w.wk[g] = w.wv[g] = 0.f;
    }
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t n0 = t * BWD_BN, n = std::min(BWD_BN, Mb - n0);
      double *ks = w.tks.data() + t * D, *ka = w.tka.data() + t * D, *vs = w.tvs.data() + t * D,
             *va = w.tva.data() + t * D;
      block_row_sums(K + n0 * D, n, n, D, ks, ka, nullptr);
      block_row_sums(V + n0 * D, n, n, D, vs, va, nullptr);
    }
  }
  const double row_f = KAPPA * U32 * sqrtD;
  // underflow: D + 1 operations per entry of S (dP) and of the reference row, at most
  // BWD_COL_ROWS + 1 values per column, and the group sum rounded to fp32, 2^-150 per dim
  const double col_abs = P.eta16 * static_cast<double>((kReportBlockM + 1) * (D + 1));
  // per column group of the block's q (which 0) and dO (which 1): sqrt(rows max_d sum_i
  // x_id^2), >= ||sum_i |x_i| ||_2 and >= ||fl(sum_i x_i)||_2 (its reference row)
  double spread[2][BWD_NGROUP_MAX] = {}, absnorm[2][BWD_NGROUP_MAX] = {}, refnorm[2][BWD_NGROUP_MAX] = {};
  // The entries of S and dP a fault could move harmfully within the column checks are verified
  // where their harm bound reaches TAU_VERIFY (the floor of the harm threshold, tau max(1,
  // max |g|), in the gradients' units); where the gradients exceed 1 (loss scaling: dO x1e3)
  // the threshold is TAU_VERIFY max(1, max |g|) and the bound scales with them, so most
  // entries were verified in fp64 (5.3x off at B1 H8 N = M = 2048 D64 causal, dO x1024: perf,
  // verify_entries 30 % of the samples). Each block of queries after the first takes
  // TAU_VERIFY vscale, vscale = max(1, half the smallest of max |dq| over the finished rows
  // and max |dk|, max |dv| of the head's partial sums); without GQA, at the task's end, where its
  // own gradients' maxima (at most the call's) are below what it assumed, the task is blind: made again and
  // compared bit for bit (attention_bwd_cpu's task loop). With GQA a key's dk, dv add up the
  // group's heads, and may cancel: there the call's own gradients decide, once every task has
  // run (attention_bwd_cpu: a task that assumed more is made again and compared); the dK / dV
  // checks' blind rule then takes tau max(1, the task's last estimate) as its threshold too.
  w.vscale = w.vscale_used = 1.0;
  double gq = 0.0, gest = 0.0;  // max |dq| over the finished rows; the last estimate (below)
  const bool rescale = abft;
  for (int64_t r0 = 0, blk = 0; r0 < N; r0 += BWD_BM, ++blk) {
    const int64_t rows = std::min(BWD_BM, N - r0);
    w.vscale_used = std::max(w.vscale_used, w.vscale);
    const double thr = TAU_VERIFY * w.vscale;
    const int64_t kv_end = P.causal ? std::clamp<int64_t>(r0 + rows + shift, 0, Mb) : Mb;
    const float* Qb = Q + r0 * D;
    const float* Gb = Gd + r0 * D;
    const int64_t grows = rows > BWD_COL_ROWS && rows % BWD_COL_ROWS == 0 ? BWD_COL_ROWS : rows;
    const int64_t ngroups = rows / grows;
    float* Qx = w.Qx.data();
    float* Gx = w.Gx.data();
    std::copy(Qb, Qb + rows * D, Qx);
    std::copy(Gb, Gb + rows * D, Gx);
    std::fill(Qx + rows * D, Qx + (rows + ngroups) * D, 0.f);
    std::fill(Gx + rows * D, Gx + (rows + ngroups) * D, 0.f);
    const bool frow = fh && f.row >= r0 && f.row < r0 + rows;
    const int64_t fi = f.row - r0;
    int32_t bits = 0;
    row_dots_d(Gb, O + r0 * D, rows, D, w.l.data());  // (w.l: scratch until the statistics)
    for (int64_t i = 0; i < rows; ++i) {
      w.Drow[i] = static_cast<float>(w.l[i]);
      w.m[i] = NEG_INF;
      w.l[i] = 0.0;
    }
    std::fill(w.dQ.begin(), w.dQ.begin() + rows * D, 0.f);
    if (abft) {
      std::fill(w.rs.begin(), w.rs.end(), 0.0);
      std::fill(w.rp.begin(), w.rp.end(), 0.0);
      std::fill(w.rq.begin(), w.rq.end(), 0.f);
      std::fill(w.mq.begin(), w.mq.end(), 0.f);
      for (int which = 0; which < 2; ++which) {
        const float* X = which == 0 ? Qb : Gb;
        float* Xx = which == 0 ? Qx : Gx;
        double* sum = (which == 0 ? w.qsum : w.gsum).data();
        double* abs = (which == 0 ? w.qabs : w.gabs).data();
        double* sq = (which == 0 ? w.qsq : w.gsq).data();
        block_row_sums(X, rows, grows, D, sum, abs, sq);
        for (int64_t g = 0; g < ngroups; ++g) {
          double sqmax = 0.0, a2 = 0.0, r2 = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            const float x = static_cast<float>(sum[g * D + d]);
            Xx[(rows + g) * D + d] = x;
            sqmax = std::max(sqmax, sq[g * D + d]);
            a2 += abs[g * D + d] * abs[g * D + d];
            r2 += static_cast<double>(x) * static_cast<double>(x);
          }
          spread[which][g] = std::sqrt(static_cast<double>(grows) * sqmax);
          absnorm[which][g] = std::sqrt(a2) * (1.0 + 0x1p-40);
          refnorm[which][g] = std::sqrt(r2) * (1.0 + 0x1p-40);
        }
      }
      group_sums(Qb, rows, D, G, w.qg.data(), 2 * G, 1, w.qmax.data());
      group_sums(Gb, rows, D, G, w.gg.data(), 2 * G, 1, w.gmax.data());
      std::fill(w.dsmax.begin(), w.dsmax.begin() + rows, 0.f);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t g = 0; g < G; ++g) {
          w.wk[g] = std::max(w.wk[g], w.qg[i * 2 * G + G + g]);
          w.wv[g] = std::max(w.wv[g], w.gg[i * 2 * G + G + g]);
        }
    }
    // S = Q K^T (which 0) and dP = dO V^T (which 1) for the tile at n0 (n keys) into X, the
    // column groups' reference rows after the block's: sgemm on the fp32 rows, or the bf16
    // GEMM on their bf16 rows (sums.h)
    for (auto [B16, X, Xh] : {std::tuple{K16, Qx, &w.Qh}, std::tuple{V16, Gx, &w.Gh}}) {
      if (B16 == nullptr) continue;
      const size_t need = static_cast<size_t>((BWD_BM + 3 * BWD_NGROUP_MAX) * D);
      if (Xh->size() < need) Xh->resize(need);
      bf16_rows_split(X, rows, ngroups, D, Xh->data());
    }
    if (P.p16) {  // (the block's rows of dO and q as dV's and dK's products read them)
      pack_vnni(false, rows, D, w.Gh.data(), D, w.GhP.data());
      pack_vnni(false, rows, D, w.Qh.data(), D, w.QhP.data());
    }
    const int64_t r_panel = (rows + 1) / 2 * 64;
    const auto product = [&](int which, int64_t n0, int64_t n, float* X) {
      const uint32_t* B16p = which == 0 ? K16t : V16t;
      const uint16_t* B16 = which == 0 ? K16 : V16;
      if (B16p != nullptr)  // (n0 is a multiple of BWD_BN, so of 64)
        gemm_bf16_refs_packed((which == 0 ? w.Qh : w.Gh).data(), rows, ngroups, n, D, B16p + n0 / 64 * t_panel,
                              t_panel, X, BWD_BN);
      else if (B16 != nullptr)
        gemm_bf16_refs((which == 0 ? w.Qh : w.Gh).data(), rows, ngroups, n, D, B16 + n0 * D, X, BWD_BN);
      else
        gemm_rm(false, true, false, rows + ngroups, n, D, which == 0 ? Qx : Gx, D, (which == 0 ? K : V) + n0 * D,
                D, X, BWD_BN);
    };
    // ---- each row's max and normaliser over its visible keys: the forward's (P.stats), or
    // pass 1 ----
    // The scores made here may round otherwise than the forward's (another GEMM shape: the
    // forward's stacked heads sum slices of the head dims), each by at most twice the row
    // check's noise, 2 kappa u sqrt(D) ||q_i|| max_j ||k_j||: P then differs from the p the
    // forward's normaliser summed by up to drift_i relative, which the check of the normaliser
    // allows (P's range and row sum, at the end of the block; a changed entry of P is found
    // by the sum read back, whatever the drift). A normaliser wrong by that much scales the
    // row's part of the gradients by as much: where drift_i exceeds DRIFT_MAX (2^-12, a
    // quarter of the harm threshold; large logits, outlier channels) pass 1 makes the
    // statistics from the scores made here. (The choice depends on the data only, so every
    // protection level makes the same P.)
    bool use_stats = P.stats != nullptr;
    if (use_stats) {
      key_norms(Qb, rows, D, w.drift.data());  // >= |q_i|
      for (int64_t i = 0; i < rows; ++i) {
        const double qn = w.drift[i];
        w.drift[i] = std::expm1(static_cast<double>(ascale) *
                                (2.0 * row_f * qn * knorm_max + 2.0 * P.eta_fwd * static_cast<double>(D + 1))) *
                     (1.0 + 0x1p-10);
        use_stats &= w.drift[i] <= DRIFT_MAX;  // (NaN: pass 1)
      }
    }
    if (use_stats) {
      const float* st = P.stats + ((b * P.Hq + h) * N + r0) * 2;
      for (int64_t i = 0; i < rows; ++i) {
        w.m[i] = st[2 * i];
        w.l[i] = static_cast<double>(st[2 * i + 1]);
      }
    } else {
      std::fill(w.drift.begin(), w.drift.begin() + rows, 0.0);
      for (int64_t n0 = 0; n0 < kv_end; n0 += BWD_BN) {
        const int64_t n = std::min(BWD_BN, Mb - n0);
        product(0, n0, n, w.S.data());
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t vis = P.causal ? std::clamp<int64_t>(r0 + i + shift - n0 + 1, 0, n) : n;
          row_lse(w.S.data() + i * BWD_BN, vis, scale, sgn, &w.m[i], &w.l[i]);
        }
      }
    }
    for (int64_t i = 0; i < rows; ++i) w.rinv[i] = w.m[i] == NEG_INF ? 0.f : static_cast<float>(1.0 / w.l[i]);
    // ---- pass 2: the gradients, tile by tile, with their checks ----
    for (int64_t n0 = 0; n0 < kv_end; n0 += BWD_BN) {
      const int64_t n = std::min(BWD_BN, Mb - n0);
      const float* Kt = K + n0 * D;
      const float* Vt = V + n0 * D;
      // the fault's keys in this tile: [fj0, fj1)
      const int64_t fj0 = std::max<int64_t>(fcol - n0, 0), fj1 = std::min<int64_t>(fcol - n0 + f.ncols, n);
      const bool fin = frow && fj0 < fj1;
      const auto hit = [&](float* X) {
        for (int64_t j = fj0; j < fj1; ++j) X[fi * BWD_BN + j] = corrupt(X[fi * BWD_BN + j], f.bit, f.value);
      };
      float* S = w.S.data();
      float* Pm = w.Pm.data();
      float* dP = w.dP.data();
      float* dS = w.dS.data();
      product(0, n0, n, S);  // (+ the column references)
      if (fin && f.site == kBwdScores) hit(S);
      memory_barrier();
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t vis = w.m[i] == NEG_INF ? 0 : P.causal ? std::clamp<int64_t>(r0 + i + shift - n0 + 1, 0, n) : n;
        probs_row(S + i * BWD_BN, Pm + i * BWD_BN, n, vis, scale, sgn * w.m[i], w.rinv[i], abft ? &w.rp[i] : nullptr);
      }
      if (fin && f.site == kBwdProbs) hit(Pm);
      product(1, n0, n, dP);
      if (fin && f.site == kDp) hit(dP);
      memory_barrier();
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t vis = w.m[i] == NEG_INF ? 0 : P.causal ? std::clamp<int64_t>(r0 + i + shift - n0 + 1, 0, n) : n;
        ds_row(Pm + i * BWD_BN, dP + i * BWD_BN, dS + i * BWD_BN, n, vis, w.Drow[i]);
      }
      if (fin && f.site == kDs) hit(dS);
      memory_barrier();
      // the products (on the bf16 GEMM: of P and dS rounded to bf16, whose references below
      // are made from the same rounded values)
      const float* Pref = Pm;
      const float* dSref = dS;
      const float* dSaref = w.dSa.data();
      if (P.p16) {
        round_bf16(P.bf16_cvt, Pm, rows, n, BWD_BN, w.Pb.data(), w.Pr.data(), nullptr);
        round_bf16(P.bf16_cvt, dS, rows, n, BWD_BN, w.dSb.data(), w.dSr.data(), w.dSra.data());
        Pref = w.Pr.data(), dSref = w.dSr.data(), dSaref = w.dSra.data();
        gemm_bf16_at_packed(n, D, rows, w.Pb.data(), BWD_BN, w.GhP.data(), r_panel, 1.f, dV + n0 * D, D);
        gemm_bf16_at_packed(n, D, rows, w.dSb.data(), BWD_BN, w.QhP.data(), r_panel, 1.f, dK + n0 * D, D);
        if (K16n != nullptr)
          gemm_bf16_packed(rows, D, n, w.dSb.data(), BWD_BN, K16n + n0 / 2 * 64, n_panel, 1.f, w.dQ.data(), D);
        else
          gemm_bf16(false, false, rows, D, n, w.dSb.data(), BWD_BN, K16 + n0 * D, D, 1.f, w.dQ.data(), D);
      } else {
        gemm_rm(true, false, true, n, D, rows, Pm, BWD_BN, Gb, D, dV + n0 * D, D);
        gemm_rm(true, false, true, n, D, rows, dS, BWD_BN, Qb, D, dK + n0 * D, D);
        gemm_rm(false, false, true, rows, D, n, dS, BWD_BN, Kt, D, w.dQ.data(), D);
      }
      if (!abft) continue;
      // ---- the checks of the tile ----
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t vis = w.m[i] == NEG_INF ? 0 : P.causal ? std::clamp<int64_t>(r0 + i + shift - n0 + 1, 0, n) : n;
        // (P = exp(x) rinv <= 1 + drift: x <= drift, rinv <= 1 as l >= 1; 8 u for the exponential)
        const float pcap = use_stats ? static_cast<float>((1.0 + w.drift[i]) * (1.0 + 8.0 * U32)) : 1.f;
        bits |= row_checks(Pm + i * BWD_BN, dP + i * BWD_BN, dS + i * BWD_BN, n, vis, w.Drow[i], pcap,
                           w.dSa.data() + i * BWD_BN, &w.rs[i]);
        if (full && vis > 0 &&
            probs_dmr_fails(S + i * BWD_BN, Pm + i * BWD_BN, vis, scale, sgn * w.m[i], w.rinv[i]))
          bits |= kSoftmaxDmr;
      }
      // S and dP: row and column checksums, then the entries that could hide harm
      bool again_s = false, again_p = false;
      for (int which = 0; which < 2; ++which) {
        const float* A = which == 0 ? Qb : Gb;  // S = Q K^T, dP = dO V^T
        const float* Bt = which == 0 ? Kt : Vt;
        const float* X = which == 0 ? S : dP;
        const double* ts = (which == 0 ? w.tks : w.tvs).data() + (n0 / BWD_BN) * D;
        const double* ta = (which == 0 ? w.tka : w.tva).data() + (n0 / BWD_BN) * D;
        const int32_t bit_row = which == 0 ? kRowChecksum : kDpChecksum;
        const int32_t bit_col = which == 0 ? kColChecksum : kDpChecksum;
        dots_d(A, rows, D, ts, ta, 1, 1, w.rref.data(), w.rmag.data());
        // per column group: its rows' checksums, its column sums against its reference row
        // (made by the GEMM, after the block's rows), each key's bound and harm factor
        for (int64_t g = 0; g < ngroups; ++g) {
          const int64_t g0 = g * grows, g1 = g0 + grows;
          std::fill(w.cs.begin(), w.cs.begin() + n, 0.0);
          std::fill(w.ca.begin(), w.ca.begin() + n, 0.0);
          for (int64_t i0 = g0; i0 < g1; i0 += 4) {
            const int64_t nr = std::min<int64_t>(4, g1 - i0);
            double rsum[4];
            row_col_sums(X + i0 * BWD_BN, BWD_BN, nr, n, rsum, w.cs.data(), w.ca.data());
            for (int64_t r = 0; r < nr; ++r)
              if (!(std::fabs(rsum[r] - w.rref[i0 + r]) <=
                    row_f * w.rmag[i0 + r] + P.eta16 * static_cast<double>(n * (D + 1))))
                bits |= bit_row;
          }
          // the column bound, from the data's spread as the forward's (checks.h's ColumnBound):
          // the fp32 GEMM leaves at most noise (||a_i o b_j||_2 + |X_ij|) per entry, summed over
          // the group's rows sum_i ||a_i o b_j||_2 <= sqrt(rows max_d sum_i a_id^2) ||b_j||_2,
          // and sum_i |X_ij| = ca_j; its reference row, fl(sum_i a_i) . b_j by the same GEMM,
          // noise ||fl(sum_i a_i)||_2 ||b_j||_2, and the sum's rounding to fp32, u of the same;
          // the fp64 sums round at most (D + rows + 4) 2^-53 of sum_i |a_i| . |b_j| <= ||sum_i
          // |a_i| ||_2 ||b_j||_2. (Groups of 32 rows, not the block's 64: the bound grows with
          // the rows it sums, and the entries it lets through to the fp64 verification with it.)
          const double* norm = (which == 0 ? w.knorm : w.vnorm).data() + n0;
          // (on the bf16 GEMM the reference row is three, hi + mid + lo, the two below 2^-8 and
          // 2^-16 of it: noise within 2^-7 more; a part below 2^-126 read as 0 moves the
          // product by 2^-126 |b_jd| per dim and part, at most 2^-125 sqrt(D) ||b_j||_2)
          const bool split = which == 0 ? K16 != nullptr : V16 != nullptr;
          const double tiny = static_cast<double>(D + grows + 4) * 0x1p-52 * absnorm[which][g] +
                              (row_f + U32) * refnorm[which][g] * (split ? 1.0 + 0x1p-7 : 1.0) +
                              static_cast<double>(D) * 0x1p-150 + (split ? 0x1p-125 * sqrtD : 0.0);
          // (entries: S_ij moves P_ij by P_ij (e^{d scale} - 1), which reaches dV_j through
          // dO_i and dQ_i, dK_j through (dP_ij - D_i) scale k_j / q_i; dP_ij moves dS_ij by
          // P_ij d (dQ_i, dK_j). A fault the column check misses has |d| <= 2 colb_j.)
          if (column_group_check(w.cs.data(), w.ca.data(), X + (rows + g) * BWD_BN, norm, n, row_f,
                                 spread[which][g], tiny, col_abs, which == 0, static_cast<double>(ascale),
                                 w.colb.data(), w.grow.data() + g * BWD_BN))
            bits |= bit_col;
        }
        const double noise = KAPPA * sqrtD * U32, floor = P.eta16 * static_cast<double>(D + 1);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t vis = w.m[i] == NEG_INF ? 0 : P.causal ? std::clamp<int64_t>(r0 + i + shift - n0 + 1, 0, n) : n;
          const float* pi = Pm + i * BWD_BN;
          float* harm = w.harm.data();
          if (!(harm_bounds(pi, dP + i * BWD_BN, w.grow.data() + (i / grows) * BWD_BN, w.kmax.data() + n0, vis,
                            which == 0, w.Drow[i],
                            w.gmax[i], w.qmax[i], ascale, harm) >= static_cast<float>(thr)))
            continue;  // (most rows: no entry to verify)
          const int found = verify_entries(A + i * D, Bt, D, X + i * BWD_BN, pi, dP + i * BWD_BN, harm,
                                           w.kmax.data() + n0, vis, which == 0, w.Drow[i], w.gmax[i], w.qmax[i],
                                           ascale, noise, floor, thr);
          if (found & 1) bits |= which == 0 ? kScoreRecompute : kDpChecksum;
          if (found & 2) (which == 0 ? again_s : again_p) = true;
        }
      }
      // the product computed again where the fp64 comparison's own bound could hide harm
      for (int which = 0; which < 2; ++which) {
        if (!(which == 0 ? again_s : again_p)) continue;
        product(which, n0, n, w.S2.data());
        const float* X = which == 0 ? S : dP;
        for (int64_t i = 0; i < rows; ++i)
          if (std::memcmp(X + i * BWD_BN, w.S2.data() + i * BWD_BN, n * sizeof(float)) != 0)
            bits |= which == 0 ? kScoreRecompute : kDpChecksum;
      }
      // the references of dQ, dK, dV for this tile (fp32), and its largest terms
      // (the blind rule's largest terms: full only, as the rule)
      if (full) tile_maxima(dSaref, Pref, BWD_BN, rows, n, w.dsmax.data(), w.kcol.data() + n0, w.kcol.data() + ldk + n0);
      tile_references(dSref, dSaref, Pref, BWD_BN, rows, n, G, w.kgT.data() + n0, ldk, w.qg.data(),
                      w.gg.data(), w.rq.data(), w.mq.data(), w.rk.data() + n0, w.mk.data() + n0, w.rvm.data() + n0);
    }
    if (frow && f.site == kDq) corrupt_dims(w.dQ.data() + fi * D, D, f);
    memory_barrier();
    if (abft) {
      // P as read back sums to P as made (the same fp32 values, summed in fp64 in other orders:
      // a changed entry shows however small its softmax weight); and each row of P as made sums
      // to 1 over its visible keys: the fp32 exponentials and their fp64 sum round by at most
      // (Mb + 8) u; where the forward's normaliser serves, its fp32 sum and rescales (a few u a
      // tile) and the drift of the scores (above) too, and a row that sees keys has a max (the
      // forward's statistics agree with the mask)
      const double tol = use_stats ? static_cast<double>(Mb + 16 + 6 * ((Mb + BWD_BN - 1) / BWD_BN)) * U32
                                   : static_cast<double>(Mb + 8) * U32;
      const double tol_read = static_cast<double>(2 * Mb + 8) * 0x1p-53;
      for (int64_t i = 0; i < rows; ++i) {
        const bool empty = w.m[i] == NEG_INF;
        const double rs = w.rs[i], rp = w.rp[i];
        if (!(std::fabs(rs - rp) <= tol_read * rp)) bits |= kProbsRange;
        if (!(empty ? rp == 0.0 : std::fabs(rp - 1.0) <= tol + 2.0 * w.drift[i])) bits |= kRowsumInvariant;
        const int64_t visible = P.causal ? std::clamp<int64_t>(r0 + i + shift + 1, 0, Mb) : Mb;
        if (use_stats && empty != (visible == 0)) bits |= kRowsumInvariant;
      }
      int32_t rowbits[BWD_BM] = {};
      // (dq = scale dQ: its threshold tau max(1, |dq|) is tau max(1 / |scale|, |dQ|) here)
      const Harm hq{full ? P.tau : 0.0, P.tau / ascale, true};
      group_check(w.dQ.data(), rows, D, G, w.rq.data(), G, 1, w.mq.data(), G, 1, Mb, kDqChecksum, rowbits, P.eta16,
                  hq, full ? w.dsmax.data() : nullptr, w.wq.data());
      for (int64_t i = 0; i < rows; ++i) bits |= rowbits[i];
    }
    scaled_copy(dQout + r0 * D, w.dQ.data(), rows * D, scale);
    w.qbits[blk] |= bits;
    if (rescale) {
      gq = std::max(gq, abs_max(dQout + r0 * D, rows * D));
      // (the keys this block reached: past them, causal, the partial sums are still 0). The
      // partial sums' maxima only where they can matter: g <= gq, so at gq <= 2 the scale is 1
      // whatever they are, and the last estimate counts (vfin, below) only at full with GQA
      // and gq > 1 (scanned after every block of queries, dK and dV were 3.5 % of an abft
      // forward + backward's samples, B1 H8 N = M = 2048 D64 bf16)
      const bool partials = gq > 2.0 || (full && group > 1 && gq > 1.0);
      const double g = partials ? std::min({gq, static_cast<double>(ascale) * abs_max(dK, kv_end * D),
                                            abs_max(dV, kv_end * D)})
                                : gq;
      // (half the estimate: the partial sums' largest can exceed the final ones', and a task
      // whose gradients end below what it assumed runs twice: 2 of 8 heads at half-way
      // estimates, B1 H8 N = M = 2048 D64 causal, dO x1)
      w.vscale = g <= std::numeric_limits<double>::max() ? std::max(1.0, 0.5 * g) : 1.0;
      gest = g <= std::numeric_limits<double>::max() ? g : 0.0;
    }
  }
  if (fh && (f.site == kDk || f.site == kDv) && fcol >= 0 && fcol < Mb)
    corrupt_dims((f.site == kDk ? dK : dV) + fcol * D, D, f);
  memory_barrier();
  if (abft) {
    // (dk = scale sum over the group's query heads of dK, dv the sum of dV)
    // (with GQA the floor, or tau times the scale the task's own gradients gave, w.vscale, which
    // attention_bwd_cpu checks against the call's dq, dk, dv once every task has run)
    // (the blind rule's only: at abft no check reads it, and a task that assumed it would be
    // made again by the post-pass for nothing)
    const double vfin = full && rescale && group > 1 ? std::max(1.0, gest) : 1.0;
    w.vscale_used = std::max(w.vscale_used, vfin);
    const Harm hk{full ? P.tau : 0.0, P.tau * vfin / ascale, group == 1}, hv{full ? P.tau : 0.0, P.tau * vfin, group == 1};
    group_check(dK, Mb, D, G, w.rk.data(), 1, ldk, w.mk.data(), 1, ldk, N, kDkChecksum, w.keybits.data(), P.eta16,
                hk, full ? w.kcol.data() : nullptr, w.wk.data());
    group_check(dV, Mb, D, G, w.rvm.data(), 1, ldk, w.rvm.data() + G * ldk, 1, ldk, N, kDvChecksum,
                w.keybits.data(), P.eta16, hv, full ? w.kcol.data() + ldk : nullptr, w.wv.data());
  }
  if (rescale && group == 1 && w.vscale_used > 1.0) {
    // the task's own gradients (their maxima at most the call's, dq, dk, dv of one head): where
    // they fall below the scale its verification assumed, its rows and keys are blind
    const double g = std::min({gq, static_cast<double>(ascale) * abs_max(dK, Mb * D), abs_max(dV, Mb * D)});
    if (!(w.vscale_used <= std::max(1.0, g))) {
      for (auto& x : w.qbits) x |= kBlind;
      for (int64_t j = 0; j < Mb; ++j) w.keybits[j] |= kBlind;
    }
  }
}

// Task (b, h) made again without a fault, and its query blocks and keys whose bits in w (the
// first run's) hold kBlind compared bit for bit with the first results: a difference is a fault,
// its check bit set in fl (the task's flags), CORRECTED or UNCORRECTED under recompute, where
// the second results stand; else the first are put back.
void compare_again(const BwdProblem& P, BwdScratch& w, int64_t b, int64_t h, int32_t* fl,
                   std::vector<int32_t>& first_q, std::vector<int32_t>& first_k, std::vector<float>& kept,
                   bool recompute) {
  const int64_t D = P.D, N = P.N, M = P.M, nq = (N + kReportBlockM - 1) / kReportBlockM;
  const int64_t idx = b * P.Hq + h, key0 = P.key_first(b), Mb = P.key_count(b);
  float* dq0 = P.dq + idx * N * D;
  float* dk0 = P.dkh + (idx * M + key0) * D;
  float* dv0 = P.dvh + (idx * M + key0) * D;
  kept.assign(dq0, dq0 + N * D);
  kept.insert(kept.end(), dk0, dk0 + Mb * D);
  kept.insert(kept.end(), dv0, dv0 + Mb * D);
  std::copy(w.qbits.begin(), w.qbits.end(), first_q.begin());
  std::copy(w.keybits.begin(), w.keybits.begin() + Mb, first_k.begin());
  head_backward(P, w, b, h, FaultSpec{});
  const auto differ = [D](const float* a, const float* c, int64_t rows) {
    return std::memcmp(a, c, static_cast<size_t>(rows * D) * sizeof(float)) != 0;
  };
  for (int64_t t = 0; t < nq; ++t) {
    const int64_t i0 = t * kReportBlockM, i1 = std::min<int64_t>(N, i0 + kReportBlockM);
    if ((first_q[t] & kBlind) && differ(kept.data() + i0 * D, dq0 + i0 * D, i1 - i0))
      fl[t] |= kDqChecksum | (!recompute ? 0 : (w.qbits[t] & kCheckMask) ? kUncorrected : kCorrected);
  }
  for (int64_t j = 0; j < Mb; ++j) {
    if (!(first_k[j] & kBlind)) continue;
    const int32_t bits = (differ(kept.data() + (N + j) * D, dk0 + j * D, 1) ? kDkChecksum : 0) |
                         (differ(kept.data() + (N + Mb + j) * D, dv0 + j * D, 1) ? kDvChecksum : 0);
    if (bits)
      fl[nq + (key0 + j) / kReportBlockM] |=
          bits | (!recompute ? 0 : (w.keybits[j] & kCheckMask) ? kUncorrected : kCorrected);
  }
  if (!recompute) {  // (report, raise: the first results, as made)
    std::copy(kept.begin(), kept.begin() + N * D, dq0);
    std::copy(kept.begin() + N * D, kept.begin() + (N + Mb) * D, dk0);
    std::copy(kept.begin() + (N + Mb) * D, kept.end(), dv0);
  }
}

// Whether the task's inputs are all finite (a failed check on non-finite input is reported
// as such and not recomputed).
bool head_finite(const BwdProblem& P, int64_t b, int64_t h) {
  const int64_t D = P.D, N = P.N, hk = h / (P.Hq / P.Hkv);
  const int64_t first = P.key_first(b), Mb = P.key_count(b);
  for (const float* x : {P.q, P.o, P.g})
    if (!all_finite(x + (b * P.Hq + h) * N * D, N * D)) return false;
  for (const float* x : {P.k, P.v})
    if (!all_finite(x + ((b * P.Hkv + hk) * P.M + first) * D, Mb * D)) return false;
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& grad_out,
    bool causal, double scale, int64_t protection, bool recompute, at::OptionalIntArrayRef fault,
    std::optional<double> fault_value, const std::optional<at::Tensor>& key_start,
    const std::optional<at::Tensor>& key_end, const std::optional<at::Tensor>& stats) {
  // (the kernel's own ATen calls, views included, skip autograd and view tracking: ~1 us a call)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(q, k, v);
  TORCH_CHECK_VALUE(out.sizes() == q.sizes() && grad_out.sizes() == q.sizes(), "ftattn.attention backward: out ",
                    out.sizes(), " and grad_out ", grad_out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "ftattn.attention backward: scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(protection >= 0 && protection <= 2, "ftattn.attention: protection ", protection,
                    " must be 0 (off), 1 (abft) or 2 (full)");
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3), Hkv = k.size(1), M = k.size(2);
  if (stats.has_value()) check_stats(*stats, B, Hq, N, "ftattn.attention backward");
  FaultSpec f;
  if (fault.has_value()) {
    const std::string fault_error = parse_fault(*fault, fault_value, f);
    TORCH_CHECK_VALUE(fault_error.empty(), "ftattn", ": ", fault_error);
    TORCH_CHECK_VALUE(f.site >= kBwdScores && f.site <= kDv, "ftattn: fault site ", f.site,
                      " is not a site of attention_backward (its sites are ", int64_t{kBwdScores}, "..",
                      int64_t{kDv}, ": bwd_scores, bwd_probs, dp, ds, dq, dk, dv)");
    const bool keyed = f.site == kDk || f.site == kDv, dimmed = keyed || f.site == kDq;
    TORCH_CHECK_VALUE(f.batch >= 0 && f.batch < B && f.head >= 0 && f.head < Hq &&
                          (keyed || (f.row >= 0 && f.row < N)) && (f.site == kDq || (f.col >= 0 && f.col < M)) &&
                          (!dimmed || (f.dim >= 0 && f.dim < D)),
                      "ftattn: fault (batch ", f.batch, ", head ", f.head, ", row ", f.row, ", col ", f.col, ", dim ",
                      f.dim, ") is out of range for q ", q.sizes(), " and k ", k.sizes());
  }
  const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor qf = f32(q), kf = f32(k), vf = f32(v), of = f32(out), gf = f32(grad_out);
  const int64_t nq = (N + kReportBlockM - 1) / kReportBlockM, nk = (M + kReportBlockM - 1) / kReportBlockM;
  at::Tensor dq = at::zeros({B, Hq, N, D}, qf.options());
  at::Tensor dkh = at::zeros({B, Hq, M, D}, qf.options());
  at::Tensor dvh = at::zeros({B, Hq, M, D}, qf.options());
  at::Tensor flags = at::zeros({B, Hq, nq + nk}, q.options().dtype(at::kInt));
  BwdProblem P{};
  P.q = qf.data_ptr<float>(), P.k = kf.data_ptr<float>(), P.v = vf.data_ptr<float>();
  P.o = of.data_ptr<float>(), P.g = gf.data_ptr<float>();
  P.dq = dq.data_ptr<float>(), P.dkh = dkh.data_ptr<float>(), P.dvh = dvh.data_ptr<float>();
  P.flags = flags.data_ptr<int32_t>();
  P.stats = stats.has_value() ? stats->data_ptr<float>() : nullptr;
  // (a bf16 forward may have made its scores on the bf16 GEMM, which flushes results
  // below 2^-126: the drift allows for that per operation)
  P.eta_fwd = q.scalar_type() == at::kBFloat16 ? ETA_FTZ : ETA;
  // bf16: S and dP on the bf16 GEMM where both operands are bf16 without subnormals (as the
  // forward: csrc/attention/inputs.h)
  const at::Tensor k16 = bf16_gemm_input(q, qf) ? bf16_gemm_operand(k) : at::Tensor();
  const at::Tensor v16 = bf16_gemm_input(grad_out, gf) ? bf16_gemm_operand(v) : at::Tensor();
  if (k16.defined()) P.k16 = reinterpret_cast<const uint16_t*>(k16.data_ptr());
  if (v16.defined()) P.v16 = reinterpret_cast<const uint16_t*>(v16.data_ptr());
  if (k16.defined() || v16.defined()) P.eta16 = ETA_FTZ;
  P.p16 = k16.defined() && v16.defined();
  P.bf16_cvt = P.p16 && bf16_hw_round();
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.N = N, P.M = M, P.D = D, P.nq = nq, P.nk = nk;
  P.G = bwd_groups(D, static_cast<int>(protection));
  P.causal = causal;
  P.scale = static_cast<float>(scale);
  P.protection = static_cast<int>(protection);
  P.tau = q.scalar_type() == at::kBFloat16 ? 0x1p-7 : 0x1p-10;
  at::Tensor starts, ends;
  if (key_start.has_value() || key_end.has_value()) {
    std::tie(starts, ends) = key_ranges(key_start, key_end, B, M, "ftattn.attention backward");
    P.key_start = starts.data_ptr<int64_t>();
    P.key_end = ends.data_ptr<int64_t>();
  }
  // the keys and values the bf16 GEMM reads, packed once per call (not per block of queries)
  // (only where several blocks read each key head: N > 64 queries or query heads sharing it;
  // else each tile is packed as it is read, in cache)
  at::Tensor packed;
  if ((P.k16 != nullptr || P.v16 != nullptr) && (N > BWD_BM || Hq > Hkv)) {
    std::vector<const uint32_t*> parts;
    packed = pack_per_key_head(P, {{P.k16, true}, {P.v16, true}, {P.p16 ? P.k16 : nullptr, false}}, parts,
                               P.packed_stride);
    P.k16t = parts[0], P.v16t = parts[1], P.k16n = parts[2];
  }
  if (B * Hq > 0 && (N > 0 || M > 0)) {
    // one task per (sample, query head), handed out from a shared counter (a thread that
    // loses its core leaves its tasks to the others; the result does not depend on which
    // thread runs a task)
    const int64_t ntasks = B * Hq;
    const int64_t work = 6 * std::max<int64_t>(N, 1) * std::max<int64_t>(M, 1) * D;  // flops per task
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(work, 1));
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), (ntasks + grain - 1) / grain);
    std::atomic<int64_t> next{0};
    std::vector<double> vused(static_cast<size_t>(ntasks), 1.0);  // (each task's verification scale)
    at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
      BwdScratch w(D, M, nq, P.G, protection >= 1);
      const Bf16GemmRelease release{P.k16 != nullptr || P.v16 != nullptr};
      const SequentialBlas sequential;
      std::vector<int32_t> first_q(nq), first_k(M);
      std::vector<float> kept;  // (a task's first dQ, dK, dV where a blind row is compared)
      for (int64_t idx = next.fetch_add(1); idx < ntasks; idx = next.fetch_add(1)) {
        const int64_t b = idx / Hq, h = idx % Hq;
        const int64_t key0 = P.key_first(b), Mb = P.key_count(b);
        head_backward(P, w, b, h, f);
        vused[idx] = w.vscale_used;
        int32_t* fl = P.flags + idx * (nq + nk);
        bool failed = false, blind = false;
        for (int64_t t = 0; t < nq; ++t) failed |= (w.qbits[t] & kCheckMask) != 0, blind |= (w.qbits[t] & kBlind) != 0;
        for (int64_t j = 0; j < Mb; ++j)
          failed |= (w.keybits[j] & kCheckMask) != 0, blind |= (w.keybits[j] & kBlind) != 0;
        if (!failed && blind) {
          // rows whose checksums could not see every harmful fault (group_check's Harm): the task
          // made again, clean, and those rows compared bit for bit (the task is deterministic);
          // a difference is a fault, flagged, and under recompute the second results stand
          compare_again(P, w, b, h, fl, first_q, first_k, kept, recompute);
          continue;
        }
        if (failed) {
          int32_t extra = 0;
          if (!head_finite(P, b, h)) {
            extra = kNonfiniteInput;
          } else if (recompute) {
            std::copy(w.qbits.begin(), w.qbits.end(), first_q.begin());
            std::copy(w.keybits.begin(), w.keybits.begin() + Mb, first_k.begin());
            head_backward(P, w, b, h, FaultSpec{});
            for (int64_t t = 0; t < nq; ++t)
              if (first_q[t] & kCheckMask)
                fl[t] |= (first_q[t] & ~kBlind) | ((w.qbits[t] & kCheckMask) ? kUncorrected : kCorrected);
            for (int64_t j = 0; j < Mb; ++j)
              if (first_k[j] & kCheckMask)
                fl[nq + (key0 + j) / kReportBlockM] |=
                    (first_k[j] & ~kBlind) | ((w.keybits[j] & kCheckMask) ? kUncorrected : kCorrected);
            continue;
          }
          for (int64_t t = 0; t < nq; ++t)
            if (w.qbits[t] & kCheckMask) fl[t] |= (w.qbits[t] & ~kBlind) | extra;
          for (int64_t j = 0; j < Mb; ++j)
            if (w.keybits[j] & kCheckMask) fl[nq + (key0 + j) / kReportBlockM] |= (w.keybits[j] & ~kBlind) | extra;
        }
      }
    });
    const int64_t group = Hq / std::max<int64_t>(Hkv, 1);
    if (group > 1 && *std::max_element(vused.begin(), vused.end()) > 1.0) {
      // GQA: the tasks verified against the scale of their own head's gradients; where the
      // call's gradients (dq, and dk, dv summed over each group's heads, which may cancel) end
      // below the scale a task assumed, the task is made again and compared, every row and key
      const auto absmax = [](const at::Tensor& t) {
        const at::Tensor a = t.abs().amax();
        return at::isfinite(a).item<bool>() ? a.item<double>() : std::numeric_limits<double>::infinity();
      };
      const double g = std::min({absmax(dq), std::fabs(scale) * absmax(dkh.view({B, Hkv, group, M, D}).sum(2)),
                                 absmax(dvh.view({B, Hkv, group, M, D}).sum(2))});
      BwdScratch w(D, M, nq, P.G, protection >= 1);
      const Bf16GemmRelease release{P.k16 != nullptr || P.v16 != nullptr};
      // (one thread's BLAS, as the tasks ran: the library's threads would split the products
      // otherwise and round them otherwise, and every row would differ: x86-64 build, MKL_CBWR)
      const SequentialBlas sequential;
      std::vector<int32_t> first_q(nq), first_k(M);
      std::vector<float> kept;
      for (int64_t idx = 0; idx < ntasks; ++idx) {
        if (vused[idx] <= std::max(1.0, g)) continue;
        const int64_t b = idx / Hq, h = idx % Hq;
        int32_t* fl = P.flags + idx * (nq + nk);
        bool failed = false;
        for (int64_t t = 0; t < nq + nk; ++t) failed |= (fl[t] & kCheckMask) != 0;
        if (failed) continue;  // (made again already)
        std::fill(w.qbits.begin(), w.qbits.end(), kBlind);
        std::fill(w.keybits.begin(), w.keybits.end(), kBlind);
        compare_again(P, w, b, h, fl, first_q, first_k, kept, recompute);
      }
    }
  }
  const int64_t group = Hq / std::max<int64_t>(Hkv, 1);
  at::Tensor dk = dkh.mul_(scale).view({B, Hkv, group, M, D}).sum(2);
  at::Tensor dv = dvh.view({B, Hkv, group, M, D}).sum(2);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), flags};
}

}  // namespace

TORCH_LIBRARY_IMPL(ftattn, CPU, m) {
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace ftattn
