// One block of query rows through its key tiles (run_block), its recomputation
// (process_block) and the per-call key sums.
// Part of the CPU attention kernel: included once, by csrc/attention_cpu.cpp (one
// translation unit, so every helper stays inlinable).
#pragma once

#include "checks.h"
#include "inputs.h"
#include "softmax.h"
#include "sums.h"

namespace ftattn {
namespace {

// ---------------------------------------------------------------------------


struct Problem {
  // q [B, Hq, N, D], k and v [B, Hkv, M, D], fp32, each dim's stride below (the last
  // dim's is 1): a model's heads are views of [B, N, H * D] projections, read in place
  // (the block's query rows are copied into Scratch::Qx anyway; keys and values whose
  // rows are not D apart are packed per block, and only where the sums are inline: the
  // per-call sums read rows D apart)
  const float* q;
  const float* k;
  const float* v;
  int64_t qs[3], ks[3], vs[3];  // strides of batch, head, row
  float* out;      // [B, Hq, N, D] fp32 contiguous
  const float* q_rows(int64_t b, int64_t h, int64_t r) const { return q + b * qs[0] + h * qs[1] + r * qs[2]; }
  const float* k_rows(int64_t b, int64_t h, int64_t r) const { return k + b * ks[0] + h * ks[1] + r * ks[2]; }
  const float* v_rows(int64_t b, int64_t h, int64_t r) const { return v + b * vs[0] + h * vs[1] + r * vs[2]; }
  int32_t* flags;  // [B, Hq, nblk]
  // [B, Hq, N, 2] or null: per query row its largest raw score and the normaliser l
  // (what the backward needs to make P again without a first pass over the keys)
  float* stats = nullptr;
  int64_t B, Hq, Hkv, N, M, D, nblk;
  int groups;  // PV-checksum groups of PV_GROUP head dims
  // rows of vsum: at full the weighted sums over every head dim follow the groups' (PV_WEIGHTS)
  int vgroups() const { return protection >= 2 ? groups + 1 : groups; }
  bool causal;
  float scale;
  int protection;  // 0 off, 1 abft, 2 full
  double tau = 0x1p-10;  // the harm threshold of the inputs' dtype (FAULT_MODEL.md; bf16 2^-7)
  // Per (b, hkv): sum_j k_j and sum_j |k_j| per key tile [ntiles, D], and per key
  // sum_d v_jd and sum_d |v_jd| [M] (fp64), shared by every query block.
  const double* ksum;
  const double* kabs;
  const float* vsum;  // [B, Hkv, vgroups(), M]
  const float* vabs;
  const float* vmax;  // per key max_d |v_jd| [B, Hkv, M]
  // per key ||k_j||_2 [B, Hkv, M] (scale of the column-checksum bound)
  const double* knorm;
  // the key sums above made per tile inside run_block instead, while the tile is in
  // cache (one query tile per head: nothing to share across query tiles)
  bool inline_sums;
  // per sample, its keys [key_start[b], key_end[b]) (both null: every sample has all M);
  // the kernel then runs on that range as on keys of its own (inline sums)
  const int64_t* key_start = nullptr;
  const int64_t* key_end = nullptr;
  // bf16 inputs: k as bf16 [B, Hkv, M, D] contiguous for S = Q K^T on the bf16 GEMM
  // (null: sgemm on the fp32 copies), and the underflow term per operation of the
  // bounds on S (ETA, or ETA_FTZ on the bf16 GEMM)
  const uint16_t* k16 = nullptr;
  // the bf16 probabilities rounded by VCVTNEPS2BF16 (bf16_hw_round, decided once per call)
  bool bf16_cvt = false;
  double eta_s = ETA;
  // the same for P V: v as bf16 [B, Hkv, M, D] contiguous (the probabilities then rounded to
  // bf16 for the product, softmax.h's P16), and the PV check's underflow term
  const uint16_t* v16 = nullptr;
  double eta_pv = ETA;
  // k16 and v16 as the bf16 GEMM reads them, packed once per call (pack_keys_values), per
  // key head h of batch b at k16p + (b Hkv + h) packed_stride (words; v16p likewise):
  // K^T in panels of 64 keys (ceil(D / 2) pair rows each), V in panels of 64 head dims
  // (ceil(M_b / 2) pair rows of the sample's keys each)
  const uint32_t* k16p = nullptr;
  const uint32_t* v16p = nullptr;
  int64_t packed_stride = 0;
  int64_t key_first(int64_t b) const { return key_start ? key_start[b] : 0; }
  int64_t key_count(int64_t b) const { return key_start ? key_end[b] - key_start[b] : M; }
};

struct Scratch {
  // S has NGROUP_MAX rows beyond the tile's: the GEMM that makes S also makes the
  // column-checksum references (sum_i q_i) . k_j of each group of rows (Block::group_rows),
  // from the group sums appended to the query rows in Qx (zeros at protection off, so
  // every level runs the same GEMM shape and rounds S the same way). On the bf16 GEMM
  // (Problem::k16) each reference row is three bf16 rows in Qb, whose products S holds
  // in 2 NGROUP_MAX more rows until they are added up (scores_gemm).
  std::vector<float, Aligned64<float>> Qx, S, P, acc;
  std::vector<uint16_t, Aligned64<uint16_t>> Qb;
  // P as bf16 for the bf16 GEMM of P V (Problem::v16), on first use
  std::vector<uint16_t, Aligned64<uint16_t>> Pb;
  std::vector<float> m, l;
  // fp64 bookkeeping of the checks (protection >= abft)
  std::vector<double> l2, c, bv, cw, qsum, qabs, rowref, rowmag, cs, ca, tileref, tilemag, qabs1;
  std::vector<double> q2, q2max, qs2max;  // per group: sum_i q_id^2 per dim, its max, max_d (sum_i q_id)^2
  std::vector<float> cs32, ca32, pmax;  // pmax: each row's largest p of the tile
  // per-tile key sums (Problem::inline_sums): sum_j k_j, sum_j |k_j|, ||k_j||, and the
  // per-group sums of v_j and |v_j| at group stride BLOCK_N
  std::vector<double> tile_ks, tile_ka, tile_knorm;
  std::vector<float> tile_vsum, tile_vabs, tile_vmax;
  // per key of the tile: the column check's bound and the score verification's threshold
  std::vector<double> colb;
  std::vector<float> theta;
  // the tile's S made again (the DMR of scores_mismatch), allocated on first use
  std::vector<float, Aligned64<float>> S2;
  bool dmr = false;  // this tile needs it
  // the block's keys and values packed into rows of D (where they are not), on first use
  std::vector<float, Aligned64<float>> Kp, Vp;
  // the block's output rows and softmax statistics of a first pass kept while it is made again
  // (process_block's verification of a PV checksum near its bound), on first use
  std::vector<float> first_out, first_stats;
  Scratch(int64_t D, int64_t M, bool abft)
      : Qx((BLOCK_M + NGROUP_MAX) * D), S((BLOCK_M + 3 * NGROUP_MAX) * BLOCK_N), P(BLOCK_M * BLOCK_N), acc(BLOCK_M * D), m(BLOCK_M),
        l(BLOCK_M) {
    if (!abft) return;
    const int64_t ntiles = (M + BLOCK_N - 1) / BLOCK_N;
    for (auto* v : {&l2, &tileref, &tilemag}) v->resize(BLOCK_M);
    for (auto* v : {&c, &bv}) v->resize(BLOCK_M * MAX_GROUPS);  // [row, group]
    cw.resize(BLOCK_M);
    rowref.resize(BLOCK_M * std::max<int64_t>(ntiles, 1));
    rowmag.resize(BLOCK_M * std::max<int64_t>(ntiles, 1));
    for (auto* v : {&qsum, &qabs}) v->resize(NGROUP_MAX * D);
    qabs1.resize(NGROUP_MAX);
    cs.resize(BLOCK_N);
    ca.resize(BLOCK_N);
    cs32.resize(BLOCK_N);
    ca32.resize(BLOCK_N);
    pmax.resize(BLOCK_M);
    q2.resize(NGROUP_MAX * D);
    q2max.resize(NGROUP_MAX);
    qs2max.resize(NGROUP_MAX);
    tile_ks.resize(D);
    tile_ka.resize(D);
    tile_knorm.resize(BLOCK_N);
    tile_vsum.resize((MAX_GROUPS + 1) * BLOCK_N);  // (and the weighted sums)
    tile_vabs.resize(MAX_GROUPS * BLOCK_N);
    tile_vmax.resize(BLOCK_N);
    colb.resize(BLOCK_N);
    theta.resize(BLOCK_N);
#ifdef FTATTN_POISON_SCRATCH  // (a test build: the checks' buffers start as NaN too, so that a
    // value one call reads before writing fails, as it would stale from an earlier call)
    for (auto* v : {&l2, &c, &bv, &cw, &qsum, &qabs, &rowref, &rowmag, &cs, &ca, &tileref, &tilemag, &qabs1, &q2, &q2max,
                    &qs2max, &tile_ks, &tile_ka, &tile_knorm, &colb})
      std::fill(v->begin(), v->end(), std::numeric_limits<double>::quiet_NaN());
    for (auto* v : {&cs32, &ca32, &pmax, &tile_vsum, &tile_vabs, &tile_vmax, &theta})
      std::fill(v->begin(), v->end(), std::numeric_limits<float>::quiet_NaN());
#endif
  }
  int64_t D_ = 0, tiles_ = 0;  // what it was made for (thread_scratch)
  bool abft_ = false;
};

// A worker thread's scratch, kept across calls and made again only where a call needs
// more (another head dim, more key tiles, the checks' buffers): its ~30 allocations and
// their zeroing were a quarter of a decode call with the checks (B1 Hq4 Hkv2 M40 D16,
// perf: malloc, free and memset). Every buffer is written before it is read within a
// block (the FTATTN_POISON_SCRATCH build, which makes each call's scratch anew and fills
// it with NaN, checks that), so what an earlier call left does not matter.
Scratch& thread_scratch(int64_t D, int64_t M, bool abft) {
  thread_local std::unique_ptr<Scratch> kept;
  const int64_t tiles = std::max<int64_t>((M + BLOCK_N - 1) / BLOCK_N, 1);
#ifndef FTATTN_POISON_SCRATCH
  if (kept && kept->D_ == D && kept->tiles_ >= tiles && (kept->abft_ || !abft)) return *kept;
#endif
  kept.reset();  // (the old one freed first)
  kept = std::make_unique<Scratch>(D, tiles * BLOCK_N, abft);
  kept->D_ = D, kept->tiles_ = tiles, kept->abft_ = abft;
  return *kept;
}

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
  // rows per column-checksum group (COL_ROWS where they divide a sub-block's rows, else
  // the sub-block's), and the groups: none spans two sub-blocks
  int64_t group_rows() const {
    const int64_t s = sub_rows();
    return s > COL_ROWS && s % COL_ROWS == 0 ? COL_ROWS : s;
  }
  int64_t ngroups() const { return (rows() + group_rows() - 1) / group_rows(); }
  // the head and first row (in that head) of sub-block sb
  int64_t head_of(int64_t sb) const { return h0 + sb * sub_rows() / per_head(); }
  int64_t row_of(int64_t sb) const { return r0 + sb * sub_rows() % per_head(); }
  bool holds(int64_t batch, int64_t head, int64_t row) const {
    return batch == b && head >= h0 && head < h0 + hs && row >= r0 && row < r1;
  }
};

// The last key of the tile at n0 (cols keys) that row i of the block sees: bottom-right
// causal alignment, key j visible iff j <= row + M_b - N (below 0: none of the tile's).
inline int64_t last_visible_key(const Problem& P, const Block& blk, int64_t i, int64_t n0, int64_t cols) {
  return P.causal ? blk.r0 + i % blk.per_head() + P.key_count(blk.b) - P.N - n0 : cols - 1;
}

// One block of query rows, phase by phase: prepare_block (the block's rows and their
// check references), per visible key tile tile_refs (the tile's key sums and row
// references), S = Q K^T, tile_rows (the online softmax row by row with its checks),
// acc += P V; then finish_block (normalisation and the end-of-row checks).

// The per-key and per-row references of the checks for one key tile.
struct TileRefs {
  const double* ref;  // q_i . sum_j k_j of the tile, row i at ref[i * ld]
  const double* mag;  // |q_i| . sum_j |k_j|
  int64_t ld;
  const double* knorm;  // ||k_j||
  const float* vsum;    // per group g: sum over the group's dims of v_j, at g * gs (full: the
                        // weighted sum over every dim after them, at groups * gs)
  const float* vabs;    // ... of |v_j|
  const float* vmax;    // max |v_j|
  int64_t gs;
};

// rows r of n (head r / per_head, its row r % per_head: a block's stacked heads) from src
// at head stride hs and row stride rs into dst, rows of D.
static void copy_rows(const float* src, int64_t n, int64_t D, int64_t per_head, int64_t hs, int64_t rs, float* dst) {
  if (rs == D && (hs == per_head * D || n <= per_head)) {
    std::copy(src, src + n * D, dst);
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    const float* s = src + (r / per_head) * hs + (r % per_head) * rs;
    std::copy(s, s + D, dst + r * D);
  }
}

// Loads the block's query rows into w.Qx (plus one row per sub-block, sum_i q_i: the
// column references) and resets the running state; with the checks, the per-sub-block
// sums of q for the bounds and the row references of every tile from per-call sums.
void prepare_block(const Problem& P, Scratch& w, const Block& blk, const float* Q, int64_t hk, int64_t kv_end) {
  const int64_t D = P.D;
  const int64_t rows = blk.rows(), group_rows = blk.group_rows(), ngroups = blk.ngroups();
  const int64_t ntiles_all = (P.M + BLOCK_N - 1) / BLOCK_N;
  const bool abft = P.protection >= 1;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const int64_t b = blk.b;
  std::fill(w.m.begin(), w.m.begin() + rows, NEG_INF);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.f);
  std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.f);
  float* Qx = w.Qx.data();
  copy_rows(Q, rows, D, blk.per_head(), P.qs[1], P.qs[2], Qx);
  std::fill(Qx + rows * D, Qx + (rows + ngroups) * D, 0.f);
  if (abft) {
    std::fill(w.l2.begin(), w.l2.begin() + rows, 0.0);
    std::fill(w.c.begin(), w.c.begin() + rows * MAX_GROUPS, 0.0);
    std::fill(w.bv.begin(), w.bv.begin() + rows * MAX_GROUPS, 0.0);
    std::fill(w.cw.begin(), w.cw.begin() + rows, 0.0);
    // row-checksum references for every key tile this block visits, in fp64:
    // q_i . sum_j k_j and |q_i| . sum_j |k_j| per tile
    const int64_t nt = (std::max<int64_t>(kv_end, 0) + BLOCK_N - 1) / BLOCK_N;
    const int64_t base = (b * P.Hkv + hk) * ntiles_all;
    // column references, per group of rows: sum_i q_i (fp64, rounded once to fp32) as
    // an extra row of Qx; for the bounds, sum_i |q_i| and sum_i q_i^2 per dim
    block_row_sums(Qx, rows, group_rows, D, w.qsum.data(), w.qabs.data(), w.q2.data());
    for (int64_t g = 0; g < ngroups; ++g) {
      double q2max = 0.0, qs2max = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        Qx[(rows + g) * D + d] = static_cast<float>(w.qsum[g * D + d]);
        const double qs = static_cast<double>(Qx[(rows + g) * D + d]);
        q2max = std::max(q2max, w.q2[g * D + d]);
        qs2max = std::max(qs2max, qs * qs);
      }
      w.q2max[g] = q2max;
      w.qs2max[g] = qs2max;
      w.qabs1[g] = std::accumulate(w.qabs.begin() + g * D, w.qabs.begin() + (g + 1) * D, 0.0);
    }
    if (!P.inline_sums)
      dots_d(Qx, rows, D, P.ksum + base * D, P.kabs + base * D, nt, ntiles_all, w.rowref.data(), w.rowmag.data());
  }
  if (P.k16 != nullptr) {
    // the bf16 GEMM's query rows (sums.h)
    const size_t need = static_cast<size_t>((BLOCK_M + 3 * NGROUP_MAX) * D);
    if (w.Qb.size() < need) w.Qb.resize(need);
    bf16_rows_split(Qx, rows, ngroups, D, w.Qb.data());
  }
}

// S = Q K^T for the tile at n0 (cols keys), with the column references in rows rows..
// rows + ngroups: sgemm on the fp32 rows, or the bf16 GEMM (Problem::k16: K16 the sample's
// first key; K16p its keys packed, Problem::k16p, where they are) on Qb, whose three rows
// per reference are added here in fp64 and rounded once.
void scores_gemm(const Problem& P, Scratch& w, const Block& blk, const float* K, const uint16_t* K16,
                 const uint32_t* K16p, int64_t n0, int64_t cols, float* S) {
  const int64_t D = P.D, rows = blk.rows(), ng = blk.ngroups();
  if (K16p != nullptr) {
    const int64_t panel = (D + 1) / 2 * 64;  // (n0 is a multiple of BLOCK_N, so of 64)
    gemm_bf16_refs_packed(w.Qb.data(), rows, ng, cols, D, K16p + n0 / 64 * panel, panel, S, BLOCK_N);
  } else if (K16 != nullptr) {
    gemm_bf16_refs(w.Qb.data(), rows, ng, cols, D, K16 + n0 * D, S, BLOCK_N);
  } else {
    gemm(true, false, rows + ng, cols, D, w.Qx.data(), D, K + n0 * D, D, S, BLOCK_N, blk.hs > 1 ? STACK_D_SLICE : 0);
  }
}

// The keys and values of the bf16 GEMM packed once per call (Problem::k16p, v16p;
// sums.h's pack_per_key_head), where each tile's products packed their own for every block
// of queries (8 times per tile at 2048 queries; 5.6 % of a bf16 forward's samples on the
// Xeon with AMX, measured). Returns the buffer (kept by the caller). Only where several
// blocks read each key head: with one (decode) the tiles are packed as they are read, in
// cache, instead of all of K and V written out and read back.
at::Tensor pack_keys_values(Problem& P) {
  if (P.k16 == nullptr && P.v16 == nullptr) return {};
  std::vector<const uint32_t*> starts;
  at::Tensor buf = pack_per_key_head(P, {{P.k16, true}, {P.v16, false}}, starts, P.packed_stride);
  P.k16p = starts[0];
  P.v16p = starts[1];
  return buf;
}

// The references of the key tile at n0 (cols keys): the per-call sums, or, when the sums
// are made per tile (or the causal limit cuts this tile), this tile's key sums and the
// row references from them. Before the GEMM: the first read of the tile, with
// prefetching, leaving K and V in cache.
TileRefs tile_refs(const Problem& P, Scratch& w, const Block& blk, const float* Q, const float* K, const float* V,
                   int64_t hk, int64_t n0, int64_t cols) {
  const int64_t D = P.D, M = P.key_count(blk.b), b = blk.b, rows = blk.rows();
  const int64_t ntiles_all = (M + BLOCK_N - 1) / BLOCK_N;
  const bool abft = P.protection >= 1;
  // row-checksum references of this tile: |error of S_ij| ~ u sqrt(D) sum_d
  // |q_id k_jd| (random rounding), so a row sum is bounded by
  // kappa u sqrt(D) |q_i| . sum_j |k_j|
  const double* ref = w.rowref.data() + n0 / BLOCK_N;  // stride ntiles_all
  const double* mag = w.rowmag.data() + n0 / BLOCK_N;
  int64_t ld = ntiles_all;
  const double* knorm = abft ? P.knorm + (b * P.Hkv + hk) * M + n0 : nullptr;
  const float* vsum = abft ? P.vsum + (b * P.Hkv + hk) * P.vgroups() * M + n0 : nullptr;
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
                   w.tile_vsum.data(), w.tile_vabs.data(), w.tile_vmax.data(), BLOCK_N, P.protection >= 2);
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
  return TileRefs{ref, mag, ld, knorm, vsum, vabs, vmax, gs};
}

// The rows of one tile, while a row of S and P is in L1: max and the ABFT sums, the
// online softmax with its checks, the normaliser; per group of rows, the column check and
// the score verification. Writes P and ORs failed checks into bad[].
template <bool INJECT>
void tile_rows(const Problem& P, Scratch& w, const Block& blk, const TileRefs& t, const float* K, int64_t n0,
               int64_t cols, const FaultSpec& f, bool in_tile, int64_t fi, int32_t* bad) {
  const int64_t D = P.D;
  const int64_t rows = blk.rows(), sub_rows = blk.sub_rows();
  const int64_t group_rows = blk.group_rows(), ngroups = blk.ngroups();
  const bool abft = P.protection >= 1;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const double sqrtD = std::sqrt(static_cast<double>(D));
  // row sums: the noise of S, the fp32 partial sums of CHUNK terms, and those of
  // KV_CHUNK keys in the per-tile key sums of the reference
  const double row_factor = (KAPPA * sqrtD + 1.0 + vec::CHUNK + KV_CHUNK) * U32;
  const float* Qx = w.Qx.data();
  float* S = w.S.data();  // (the softmax rows write -inf over masked scores in their last vector)
  float* Pm = w.P.data();
  const double *ref = t.ref, *mag = t.mag, *knorm = t.knorm;
  const float *vsum = t.vsum, *vabs = t.vabs, *vmax = t.vmax;
  const int64_t ld = t.ld, gs = t.gs;
  const bool p16 = P.v16 != nullptr;
  const SoftmaxRowFn row_fn = softmax_row_fn(P.protection, false, P.groups, p16, P.bf16_cvt);
  uint16_t* Pb = p16 ? w.Pb.data() : nullptr;
  // (P V reads p rounded to bf16 there, up to 2^-8 more than p: the keys a score fault
  // could move harmfully are found with l that much smaller)
  const float lfac = p16 ? 1.f - 0x1p-7f : 1.f;
  // ---- row by row, while the row of S and P is in L1: scale, mask, max and the
  // ABFT sums; the online softmax with its checks; the normaliser ----
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t i0 = g * group_rows, i1 = std::min<int64_t>(rows, i0 + group_rows);
    const int64_t sb = i0 / sub_rows;  // (the sub-block of the flags)
    if (abft) {
      std::fill(w.cs.begin(), w.cs.begin() + cols, 0.0);
      std::fill(w.ca.begin(), w.ca.begin() + cols, 0.0);
      std::fill(w.cs32.begin(), w.cs32.begin() + cols, 0.f);
      std::fill(w.ca32.begin(), w.ca32.begin() + cols, 0.f);
    }
    // the max and sums of four rows at a time where all four see every key of the tile
    // (rows i0 + 4k.., so that every ROW_CHUNK flush below follows whole groups)
    static_assert(vec::ROW_CHUNK % 4 == 0, "a flush of the column sums ends a group of four rows");
    float mx4[4];
    double rs4[4];
    bool quad = false;
    for (int64_t i = i0; i < i1; ++i) {
      // last visible key of the tile
      const int64_t limit = last_visible_key(P, blk, i, n0, cols);
      float* Si = S + i * BLOCK_N;
      float* Pi = Pm + i * BLOCK_N;
      const float m_old = w.m[i];
      float mx;
      if (abft) {
        double rs;
        const int64_t k = (i - i0) % 4;
        if (k == 0) {
          quad = i + 4 <= i1 && limit >= cols - 1;  // (the limit grows with the row)
          if (quad) row_max_sums4(Si, BLOCK_N, cols, mx4, rs4, w.cs32.data(), w.ca32.data());
        }
        if (quad) {
          mx = mx4[k];
          rs = rs4[k];
        } else {
          mx = row_max_sums(Si, cols, limit, &rs, w.cs32.data(), w.ca32.data());
        }
        if ((i - i0) % vec::ROW_CHUNK == vec::ROW_CHUNK - 1 || i == i1 - 1)
          flush_cols(w.cs32.data(), w.cs.data(), w.ca32.data(), w.ca.data(), cols);
        // underflow: D + 1 operations per S_ij; the reference's fp32 key sums, 2^-150
        // per key and dim, times |q_id| (sum_d |q_id| <= qabs1 of the group)
        const double row_abs = P.eta_s * static_cast<double>(cols) * (static_cast<double>(D + 1) + w.qabs1[g]);
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
      if (hit_p) rf = RowFault{f.col - n0, f.col - n0 + f.ncols, f.bit, f.value};
      RowStats st;
      (hit_p ? softmax_row_fn(P.protection, true, P.groups, p16, P.bf16_cvt) : row_fn)(
          Si, Pi, cols, empty ? -1 : limit, P.scale, m_new, vsum, vabs, gs, rf, st, p16 ? Pb + i * BLOCK_N : nullptr);
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
        if (P.protection >= 2) w.cw[i] = a * w.cw[i] + st.wc;
      }
      if (abft) w.pmax[i] = empty ? 0.f : st.pmax;
      if (alpha != 1.f) scale_row(w.acc.data() + i * D, D, alpha);
    }
    if (abft) {
      // the column check, with each key's bound (underflow: D + 1 operations per S_ij,
      // i1 - i0 + 1 values of S per column, and sum_i q_i rounded to fp32, 2^-150 per
      // dim times |k_jd| <= ||k_j||), and the score verification of the keys whose
      // score a fault could move harmfully within that bound
      const float* colref = S + (rows + g) * BLOCK_N;
      const double col_abs = P.eta_s * static_cast<double>((i1 - i0 + 1) * (D + 1)) + static_cast<double>(D) * 0x1p-150;
      // (on the bf16 GEMM the reference is three products, of |hi| <= |sum_i q_i|, |mid| <= 2^-8
      // and |lo| <= 2^-16 of it: their noise within 2^-7 more; a part below 2^-126 read as 0
      // moves it by 2^-126 |k_jd| per dim and part, 2^-125 sqrt(D) ||k_j|| in all, which is
      // noise * 2^-104 * ||k_j||)
      const double ref_mag = std::sqrt(w.qs2max[g]);
      const ColumnBound cb{KAPPA * sqrtD * U32, std::sqrt(static_cast<double>(i1 - i0) * w.q2max[g]),
                           P.k16 != nullptr ? ref_mag * (1.0 + 0x1p-7) + 0x1p-104 : ref_mag, col_abs};
      const float theta_low =
          column_bounds(cb, knorm, w.ca.data(), colref, vmax, P.scale, cols, w.colb.data(), w.theta.data());
      if (col_check_fails(w.cs.data(), colref, w.colb.data(), cols)) bad[sb] |= kColChecksum;
      for (int64_t i = i0; i < i1; ++i) {
        const float li = w.l[i] * lfac;
        if (!(w.pmax[i] >= theta_low * li) || w.m[i] == NEG_INF) continue;
        const int64_t limit = last_visible_key(P, blk, i, n0, cols);
        const bool full = P.protection >= 2;
        double hidden = 0.0;
        if (scores_mismatch(Qx + i * D, K + n0 * D, D, S + i * BLOCK_N, Pm + i * BLOCK_N, w.theta.data(), vmax,
                            li, P.scale, std::min<int64_t>(cols, limit + 1), P.eta_s, full ? &hidden : nullptr))
          bad[sb] |= kScoreRecompute;
        if (full && !(hidden < TAU_VERIFY * static_cast<double>(li))) w.dmr = true;
      }
    }
  }
}

// Final normalisation O = acc / l and the end-of-row checks (PV checksum, normaliser,
// final normalisation), after ntiles key tiles.
// A sub-block whose PV checksum passes but sits above PV_VERIFY of its bound (protection full):
// process_block makes the block again and compares its output rows bit for bit. A warp of
// accumulator faults whose deltas (+-2^k, a shared bit of values that often share an exponent)
// nearly cancel in a group's sum passes any bound that rounding noise needs: on the random
// warp campaign's normal data 2 of ~1,250 harmful ones did, at 0.17 and 0.82 of the bound,
// where clean rows sit below 0.006 of it. A recomputation rounds alike, so it cannot alarm on
// clean data; what it costs is the second pass where clean rows come near the bound (constant
// data in fp32: its roundings add up in one direction). Internal: never stored in the flags.
constexpr double PV_VERIFY = 1.0 / 8.0;
// The same for the weighted checksum (common.h's PV_WEIGHTS), from 1/32 of its bound: its mean-0
// weights do not add up clean rows' roundings as the plain sum does on constant or offset data
// (largest clean ratio over the campaigns' data kinds 0.012, reference arithmetic, against 0.25
// for the plain one), and at 1/8 a harmful warp of the adversary passed (1.24 tau; D 150, seed
// 609) whose weighted sum came to 0.09 of the bound.
constexpr double PV_VERIFY_WEIGHTED = 1.0 / 32.0;
// A row whose PV checksum cannot see every harmful fault is made again too (protection
// full). Harm is relative to the output (FAULT_MODEL.md: tau max(1, max |O|)), the bound to the
// magnitudes summed (kappa u sqrt(depth) sum_j p_j |v_j|_1): where values are large and
// cancel (|v| 3e4, O ~ 0) the bound is 60x the harm threshold and an accumulator fault of 65x
// tau passed (found by a targeted campaign). In accumulator units the row's threshold is
// H = tau max(l, max_d |acc_d|) (O = acc / l; the row's own max |O| is at most the call's, so H
// is the tighter). A row is made again where its difference exceeds H / 4 (below PV_VERIFY of
// the bound there), or where some group's bound exceeds PV_BLIND H: then a fault of H or more
// passes only where the clean difference it cancels is over 3 H / 4, which no clean row comes
// near below the bound's quarter (largest clean ratio over the campaigns' data kinds 0.25,
// constant data). Normal data sit near 0.7 H at M = 2048 (D 64 fp32): no second pass.
// (PV_BLIND: common.h, shared with the backward's checks of dQ, dK, dV)
constexpr int32_t kPvVerify = kBlind;  // (the contract's BLIND: a row made again and compared)
static_assert((kPvVerify & (kCheckMask | kNonfiniteInput | kCorrected | kUncorrected)) == 0, "an internal bit");

template <bool INJECT>
void finish_block(const Problem& P, Scratch& w, const Block& blk, float* O, int64_t ntiles, const FaultSpec& f,
                  bool hit, int64_t fi, int32_t* bad) {
  const int64_t D = P.D, M = P.key_count(blk.b), N = P.N;
  const int64_t r0 = blk.r0, rows = blk.rows(), per_head = blk.per_head(), sub_rows = blk.sub_rows();
  const bool abft = P.protection >= 1, full = P.protection >= 2;
  const int64_t shift = M - N;
  // PV checksum: kappa sqrt(depth) of random rounding in acc, plus the fp32 partials
  // of c (CHUNK terms), the fp32 per-key sums of V (9 u) and their products (1 u);
  // l: worst-case fp32 summation of l itself, plus the partials of l2
  // (depth: the keys one tile's product sums for the row, at most BLOCK_N, and the
  // rescales; the masked keys' p == 0 add nothing, exactly)
  const auto pv_factor_of = [&](int64_t visible) {
    const double depth = static_cast<double>(std::min<int64_t>(BLOCK_N, visible) + 2 * ntiles);
    return (KAPPA * std::sqrt(depth) + 10.0 + vec::CHUNK) * U32;
  };
  const double depth_l = static_cast<double>(BLOCK_N + 2 * ntiles + 9 + vec::CHUNK);
  // (the block's rows are consecutive rows of [B * Hq * N]: stacked heads are whole heads)
  float* stats = P.stats ? P.stats + ((blk.b * P.Hq + blk.h0) * N + r0) * 2 : nullptr;
  for (int64_t i = 0; i < rows; ++i) {
    float* Oi = O + i * D;
    const float* Ai = w.acc.data() + i * D;
    const float l = w.l[i];
    if (stats) stats[2 * i] = w.m[i], stats[2 * i + 1] = l;
    const int64_t visible =
        P.causal ? std::min<int64_t>(M, std::max<int64_t>(r0 + i % per_head + shift + 1, 0)) : M;
    if (visible == 0) {  // no key to attend to: zeros, by definition
      std::fill(Oi, Oi + D, 0.f);
      if (hit && f.site == kOutput && fi == i) corrupt_dims(Oi, D, f);
      memory_barrier();
      if (abft && !all_finite(Oi, D)) bad[i / sub_rows] |= kOutputCheck;
      if (abft && sum_abs_d(Oi, D) != 0.0) bad[i / sub_rows] |= kOutputCheck;
      continue;
    }
    double parts[MAX_GROUPS], wpart = 0.0;
    finish_row(Ai, Oi, D, l, PV_GROUP, parts, full ? &wpart : nullptr);  // O = acc / l, and the sums of acc
    if (abft) {
      const double pv_factor = pv_factor_of(visible);
      bool pv_bad = false, pv_near = false;
      // (full: the row's harm threshold in accumulator units, PV_BLIND above)
      double harm = 0.0;
      if (full) {
        float amax = 0.f;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(Ai[d]));
        harm = P.tau * std::max(static_cast<double>(l), static_cast<double>(amax));
      }
      double bv_all = 0.0, pv_abs_all = 0.0;
      for (int g = 0; g < P.groups; ++g) {
        const int64_t d0 = g * PV_GROUP, d1 = std::min<int64_t>(D, d0 + PV_GROUP);
        const double part = parts[g];
        // underflow: per key, the product and sum of acc and of c, the per-key sum of v
        // over the group's dims; per tile, the rescale of acc and c
        const double pv_abs = P.eta_pv * static_cast<double>((d1 - d0 + 2) * (visible + 2 * ntiles + vec::CHUNK));
        const double diff = std::fabs(part - w.c[i * MAX_GROUPS + g]), bv = w.bv[i * MAX_GROUPS + g];
        pv_bad |= !within(diff, pv_factor * bv + pv_abs);
        pv_near |= !(diff <= PV_VERIFY * pv_factor * bv + pv_abs);
        if (full) pv_near |= !(diff <= 0.25 * harm + pv_abs) || !(pv_factor * bv + pv_abs <= PV_BLIND * harm);
        bv_all += bv;
        pv_abs_all += pv_abs;
      }
      if (full) {  // the weighted checksum over every dim: |w_d| < PV_WEIGHT_MAX, and its value
        // sums within (5 G + 5) u where each group's are within 9 u (sums.h)
        const double wdiff = std::fabs(wpart - w.cw[i]), wf = (pv_factor + 5.0 * P.groups * U32) * PV_WEIGHT_MAX;
        pv_bad |= !within(wdiff, wf * bv_all + pv_abs_all);
        pv_near |= !(wdiff <= PV_VERIFY_WEIGHTED * wf * bv_all + pv_abs_all);
      }
      if (pv_bad)
        bad[i / sub_rows] |= kPvChecksum;
      else if (pv_near && full)
        bad[i / sub_rows] |= kPvVerify;
      const double l2 = w.l2[i];
      if (!(std::fabs(static_cast<double>(l) - l2) <= depth_l * U32 * l2) ||
          !(l2 >= 1.0 - depth_l * U32 && l2 <= static_cast<double>(visible) * (1.0 + depth_l * U32)))
        bad[i / sub_rows] |= kRowsumInvariant;
    }
    if (hit && f.site == kOutput && fi == i) corrupt_dims(Oi, D, f);
    memory_barrier();
    // what is stored, divided again: IEEE division rounds alike, so any difference is a fault
    if (abft && !output_matches(Ai, Oi, D, l)) bad[i / sub_rows] |= kOutputCheck;
  }
}

// One block through every visible key tile; writes its output rows and the
// failed-check bits of each sub-block to bad[]. INJECT compiles the fault sites in
// (false in production).
template <bool INJECT>
void run_block(const Problem& P, Scratch& w, const Block& blk, const FaultSpec& fault, int32_t* bad) {
  const int64_t D = P.D, N = P.N;
  const int64_t b = blk.b, r0 = blk.r0, r1 = blk.r1;
  const int64_t M = P.key_count(b), k0 = P.key_first(b);  // the sample's keys
  const int64_t rows = blk.rows(), per_head = blk.per_head(), ngroups = blk.ngroups();
  const int64_t hk = blk.h0 / (P.Hq / P.Hkv);
  const float* Q = P.q_rows(b, blk.h0, r0);
  const float* K = P.k_rows(b, hk, k0);
  const float* V = P.v_rows(b, hk, k0);
  const uint16_t* K16 = P.k16 != nullptr ? P.k16 + ((b * P.Hkv + hk) * P.M + k0) * D : nullptr;
  const uint16_t* V16 = P.v16 != nullptr ? P.v16 + ((b * P.Hkv + hk) * P.M + k0) * D : nullptr;
  const uint32_t* K16p = P.k16p != nullptr ? P.k16p + (b * P.Hkv + hk) * P.packed_stride : nullptr;
  const uint32_t* V16p = P.v16p != nullptr ? P.v16p + (b * P.Hkv + hk) * P.packed_stride : nullptr;
  const int64_t v_panel = (M + 1) / 2 * 64;  // (V16p's panels: pair rows of the sample's keys)
  if (V16 != nullptr && w.Pb.size() < static_cast<size_t>(BLOCK_M * BLOCK_N)) w.Pb.resize(BLOCK_M * BLOCK_N);
  FaultSpec f = fault;
  f.col -= k0;  // (a fault on a key outside the sample's range lands in no tile)
  float* O = P.out + ((b * P.Hq + blk.h0) * N + r0) * D;
  const int64_t shift = M - N;  // bottom-right causal alignment: key j visible iff j <= i + shift
  const int64_t kv_end = P.causal ? std::min<int64_t>(M, r1 + shift) : M;
  const bool hit = INJECT && f.active && blk.holds(f.batch, f.head, f.row);
  const int64_t fi = hit ? (f.head - blk.h0) * per_head + f.row - r0 : -1;  // the fault's row in the block
  for (int64_t sb = 0; sb < NSUB_MAX; ++sb) bad[sb] = 0;

  prepare_block(P, w, blk, Q, hk, kv_end);
  Q = w.Qx.data();  // (the block's rows, copied: every later read takes them from there)
  // the keys and values this block reads, as rows of D
  for (auto [X, rs, buf] : {std::tuple{&K, P.ks[2], &w.Kp}, std::tuple{&V, P.vs[2], &w.Vp}}) {
    if (kv_end <= 1 || rs == D) continue;
    if (buf->size() < static_cast<size_t>(kv_end * D)) buf->resize(kv_end * D);
    copy_rows(*X, kv_end, D, kv_end, 0, rs, buf->data());
    *X = buf->data();
  }
  int64_t ntiles = 0;
  for (int64_t n0 = 0; n0 < std::max<int64_t>(kv_end, 0); n0 += BLOCK_N) {
    const int64_t cols = std::min<int64_t>(BLOCK_N, kv_end - n0);
    const bool in_tile = hit && f.cols_meet(n0, n0 + cols);
    ++ntiles;
    const TileRefs t = tile_refs(P, w, blk, Q, K, V, hk, n0, cols);
    // ---- S = Q K^T in fp32, and the column references in rows rows..rows+ngroups ----
    float* S = w.S.data();
    scores_gemm(P, w, blk, K, K16, K16p, n0, cols, S);
    if (in_tile && f.site == kScores)
      for (int64_t j = std::max<int64_t>(f.col, n0); j < std::min(f.col + f.ncols, n0 + cols); ++j) {
        float& x = S[fi * BLOCK_N + (j - n0)];
        x = corrupt(x, f.bit, f.value);
      }
    memory_barrier();
    w.dmr = false;
    tile_rows<INJECT>(P, w, blk, t, K, n0, cols, f, in_tile, fi, bad);
    if (w.dmr) {
      // the scores again, by the same call (it rounds alike): any difference in a visible
      // one is a fault (the softmax rows wrote -inf over masked ones)
      if (w.S2.size() < w.S.size()) w.S2.resize(w.S.size());
      scores_gemm(P, w, blk, K, K16, K16p, n0, cols, w.S2.data());
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t limit = last_visible_key(P, blk, i, n0, cols);
        const int64_t visible = std::min<int64_t>(cols, std::max<int64_t>(limit + 1, 0));
        if (std::memcmp(S + i * BLOCK_N, w.S2.data() + i * BLOCK_N, visible * sizeof(float)) != 0)
          bad[i / blk.sub_rows()] |= kScoreRecompute;
      }
    }
    // ---- acc += P V in fp32 (on the bf16 GEMM: P rounded to bf16 by the softmax) ----
    if (V16p != nullptr)  // (n0 even: its pair rows start at n0 / 2)
      gemm_bf16_packed(rows, D, cols, w.Pb.data(), BLOCK_N, V16p + n0 / 2 * 64, v_panel, 1.f, w.acc.data(), D);
    else if (V16 != nullptr)
      gemm_bf16(false, false, rows, D, cols, w.Pb.data(), BLOCK_N, V16 + n0 * D, D, 1.f, w.acc.data(), D);
    else
      gemm(false, true, rows, D, cols, w.P.data(), BLOCK_N, V + n0 * D, D, w.acc.data(), D,
           blk.hs > 1 ? STACK_KEY_SLICE : 0);
    if (in_tile && f.site == kAcc) corrupt_dims(w.acc.data() + fi * D, D, f);
    memory_barrier();
  }
  finish_block<INJECT>(P, w, blk, O, ntiles, f, hit, fi, bad);
}

// q rows r0..r1 and every key / value the tile ending at row tile_end reads.
bool block_inputs_finite(const Problem& P, int64_t b, int64_t h, int64_t r0, int64_t r1, int64_t tile_end) {
  const int64_t D = P.D, M = P.key_count(b), k0 = P.key_first(b);
  const int64_t hk = h / (P.Hq / P.Hkv);
  const int64_t kv_end = P.causal ? std::min<int64_t>(M, tile_end + M - P.N) : M;
  const int64_t keys = std::max<int64_t>(kv_end, 0);
  const auto rows_finite = [D](const float* x, int64_t n, int64_t rs) {
    if (rs == D) return all_finite(x, n * D);
    for (int64_t r = 0; r < n; ++r)
      if (!all_finite(x + r * rs, D)) return false;
    return true;
  };
  return rows_finite(P.q_rows(b, h, r0), r1 - r0, P.qs[2]) && rows_finite(P.k_rows(b, hk, k0), keys, P.ks[2]) &&
         rows_finite(P.v_rows(b, hk, k0), keys, P.vs[2]);
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
  bool redo = false, verify = false;
  for (int64_t sb = 0; sb < nsub; ++sb) {
    if (!(bits[sb] & kCheckMask)) {
      verify |= (bits[sb] & kPvVerify) != 0;
      continue;
    }
    const int64_t s0 = blk.row_of(sb), s1 = std::min<int64_t>(blk.r1, s0 + blk.sub_rows());
    if (!block_inputs_finite(P, blk.b, blk.head_of(sb), s0, s1, blk.r1))
      bits[sb] |= kNonfiniteInput;
    else
      redo = true;
  }
  if ((redo && recompute) || verify) {
    // the block's rows of [B * Hq * N] (stacked heads are whole heads): kept where a sub-block
    // is verified, and put back after it where the policy does not recompute (report, raise)
    const int64_t D = P.D, rows = blk.rows(), at = (blk.b * P.Hq + blk.h0) * P.N + blk.r0;
    float* out = P.out + at * D;
    float* stats = P.stats != nullptr ? P.stats + at * 2 : nullptr;
    if (verify) {
      w.first_out.assign(out, out + rows * D);
      if (stats != nullptr) w.first_stats.assign(stats, stats + rows * 2);
    }
    run_block<false>(P, w, blk, f, again);
    // a sub-block the second pass settled: corrected, or not (with the policy's recomputation)
    const auto settled = [&](int64_t sb) {
      return !recompute ? 0 : (again[sb] & kCheckMask) ? kUncorrected : kCorrected;
    };
    for (int64_t sb = 0; sb < nsub; ++sb) {
      if ((bits[sb] & kCheckMask) && !(bits[sb] & kNonfiniteInput)) {
        bits[sb] |= settled(sb);
      } else if (!(bits[sb] & kCheckMask) && (bits[sb] & kPvVerify)) {  // (a failed one was not kept)
        const int64_t i0 = sb * blk.sub_rows(), i1 = std::min<int64_t>(rows, i0 + blk.sub_rows());
        if (std::memcmp(out + i0 * D, w.first_out.data() + i0 * D, (i1 - i0) * D * sizeof(float)) != 0)
          bits[sb] |= kPvChecksum | settled(sb);
      }
    }
    if (verify && !recompute) {
      std::copy(w.first_out.begin(), w.first_out.end(), out);
      if (stats != nullptr) std::copy(w.first_stats.begin(), w.first_stats.end(), stats);
    }
  }
  for (int64_t sb = 0; sb < nsub; ++sb)
    P.flags[(blk.b * P.Hq + blk.head_of(sb)) * P.nblk + blk.row_of(sb) / SUB_M] = bits[sb] & ~kPvVerify;
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
  sums.vsum.resize(P.B * P.Hkv * P.vgroups() * M);
  sums.vabs.resize(P.B * P.Hkv * P.groups * M);
  sums.vmax.resize(P.B * P.Hkv * M);
  sums.knorm.resize(P.B * P.Hkv * M);
  at::parallel_for(0, P.B * P.Hkv * ntiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / ntiles, t = idx % ntiles;
      const float* K = P.k_rows(bh / P.Hkv, bh % P.Hkv, 0);  // (rows D apart: attention_fwd_cpu)
      const float* V = P.v_rows(bh / P.Hkv, bh % P.Hkv, 0);
      const int64_t j1 = std::min<int64_t>(M, (t + 1) * BLOCK_N);
      const int64_t j0 = t * BLOCK_N;
      key_value_sums(K + j0 * D, V + j0 * D, j1 - j0, D, &sums.ksum[idx * D], &sums.kabs[idx * D],
                     &sums.knorm[bh * M + j0], &sums.vsum[bh * P.vgroups() * M + j0],
                     &sums.vabs[bh * P.groups * M + j0], &sums.vmax[bh * M + j0], M, P.protection >= 2);
    }
  });
  P.ksum = sums.ksum.data();
  P.kabs = sums.kabs.data();
  P.vsum = sums.vsum.data();
  P.vabs = sums.vabs.data();
  P.vmax = sums.vmax.data();
  P.knorm = sums.knorm.data();
}

}  // namespace
}  // namespace ftattn
