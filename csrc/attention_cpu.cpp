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
// Checks (docs/fault_model.md), all on fp32 values the kernel actually uses, compared
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
//     "full" adds a weighted checksum over every head dim (sum_d w_d acc_id, w from a
//     hash of d: common.h's PV_WEIGHTS), where a warp's +-2^k deltas can cancel in the
//     plain sums, and makes a block again where a row sits above 1/8 of either bound.
//   Invariants: m == max(m_old, rowmax) exactly, 0 <= p <= 1, max_j p == 1 or
//     alpha == 1; l vs an independent accumulation of the same p, 1 <= l <= #keys.
//   Redundant softmax ("full"): p made a second time from the raw scores by the same
//     operations (copies of m and the scale the compiler cannot see through), compared
//     bit for bit (softmax.h).
//   Every bound has an absolute term for underflow (ETA).
//   Final normalisation: sum_d O_id vs (sum_d acc_id) / l.
// Flags are per 64-row block (REPORT_BLOCK_M). A failed check makes the kernel
// recompute the query tile (transient faults do not repeat); NaN/Inf in the
// inputs is reported as such, not as a fault.
//
// Files, one translation unit: attention/common.h (tiles, thresholds, exponentials),
// attention/checks.h (the checks on S), attention/softmax.h (a row of the online
// softmax), attention/sums.h (sums of q, k, v; the GEMM), attention/block.h (a block
// through its key tiles, phase by phase, and its recomputation); here the op's entry.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

// the phases, in the order a block runs them
#include "attention/block.h"

namespace ftattn {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale, int64_t protection, bool recompute,
                                                     at::OptionalIntArrayRef fault,
                                                     std::optional<double> fault_value,
                                                     const std::optional<at::Tensor>& key_start,
                                                     const std::optional<at::Tensor>& key_end,
                                                     const std::optional<at::Tensor>& stats) {
  // (the kernel's own ATen calls, views included, skip autograd and view tracking: ~1 us a call)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(q, k, v);
  TORCH_CHECK(std::isfinite(scale), "ftattn.attention: scale must be finite, got ", scale);
  TORCH_CHECK(protection >= 0 && protection <= 2, "ftattn.attention: protection ", protection,
              " must be 0 (off), 1 (abft) or 2 (full)");
  // the kernel scales (S - max) and so needs scale >= 0: softmax(q k^T scale) ==
  // softmax((-q) k^T |scale|)
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3), Hkv = k.size(1), M = k.size(2);
  const int64_t nblk = (N + SUB_M - 1) / SUB_M;  // report blocks
  const int64_t ntile_m = (N + BLOCK_M - 1) / BLOCK_M;
  // the query heads of a key head: stacked into blocks of `stack` heads when each has
  // at most SUB_M rows, in `chunks` blocks per key head (per query tile)
  const int64_t group = Hq / Hkv;
  const int64_t stack = N >= 1 && N <= SUB_M ? std::max<int64_t>(1, std::min({group, MAX_STACK, BLOCK_M / N})) : 1;
  const int64_t chunks = (group + stack - 1) / stack;
  // per tile in the block when a key head has at most two blocks (decode, B4 H8 D128
  // at M 4096 / 32768, unstacked: Hkv 8 full 19.5 -> 10.5 / 155 -> 94 ms, Hkv 4 12.0
  // -> 12.0 / 111 -> 75 ms; with 4 blocks sharing, making the sums once per key head
  // was faster: 4.6 vs 5.7 / 82 vs 85 ms)
  const bool inline_sums = (ntile_m == 1 && chunks <= 2) || key_start.has_value() || key_end.has_value();
  // fp32 rows read where they are (a model's q, k, v: views of [B, N, H * D], heads
  // transposed; a slice of a preallocated cache): the query rows are copied per block
  // anyway; keys and values whose rows are D apart are read in place, others packed per
  // block where at most two blocks read a key head (inline sums), else copied whole here
  // (at B8 H12 N128 D32, MiniLM's attention, the three whole copies were 8-28 % of a call)
  const auto in_place = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.stride(3) == 1; };
  const auto rows_apart_d = [&](const at::Tensor& t) { return in_place(t) && (t.stride(2) == D || M <= 1); };
  const at::Tensor qf =
      scale < 0 ? q.to(at::kFloat).neg().contiguous() : in_place(q) ? q : q.to(at::kFloat).contiguous();
  if (scale < 0) scale = -scale;
  const auto key_side = [&](const at::Tensor& t) {
    return rows_apart_d(t) || (inline_sums && in_place(t)) ? t : t.to(at::kFloat).contiguous();
  };
  const at::Tensor kf = key_side(k), vf = key_side(v);
  // bf16: S = Q K^T on the bf16 GEMM (not for stacked heads, whose S is a sum over slices
  // of the head dims for accuracy): exact products, fp32 sums, like sgemm on the fp32
  // copies, 2-4x faster where the CPU has bf16 dot products (gemm16.h)
  const bool q16 = stack == 1 && bf16_gemm_input(q, qf);
  const at::Tensor k16 = q16 ? bf16_gemm_operand(k) : at::Tensor();
  // and P V, the probabilities rounded to bf16 for it (as torch's CPU flash attention and
  // the Triton kernel round them to the inputs' dtype); the normaliser keeps them unrounded
  const at::Tensor v16 = stack == 1 ? bf16_gemm_operand(v) : at::Tensor();
  if (stats.has_value()) check_stats(*stats, B, Hq, N, "ftattn.attention");
  at::Tensor out = at::empty({B, Hq, N, D}, qf.options());
  at::Tensor flags = at::zeros({B, Hq, nblk}, q.options().dtype(at::kInt));
  if (B * Hq * N == 0) return {out.to(q.scalar_type()), flags};  // no query row (Hq = 0 too: no key-head group)

  FaultSpec f;
  if (fault.has_value()) {
    const std::string fault_error = parse_fault(*fault, fault_value, f);
    TORCH_CHECK(fault_error.empty(), "ftattn.attention", ": ", fault_error);
    TORCH_CHECK(f.site >= 0 && f.site < kNumAttentionSites, "ftattn.attention: fault site ", f.site,
                " must be 0..", kNumAttentionSites - 1, " (attention's sites)");
    TORCH_CHECK(f.batch >= 0 && f.batch < B && f.head >= 0 && f.head < Hq && f.row >= 0 && f.row < N &&
                    f.dim >= 0 && f.dim < D && f.col >= 0 && (f.col < M || f.site == kOutput),
                "ftattn.attention: fault coordinates (batch ", f.batch, ", head ", f.head, ", row ", f.row,
                ", col ", f.col, ", dim ", f.dim, ") out of range for q ", q.sizes(), " and k ", k.sizes());
  }

  Problem P{};
  P.q = qf.data_ptr<float>();
  P.k = kf.data_ptr<float>();
  P.v = vf.data_ptr<float>();
  for (int d = 0; d < 3; ++d) P.qs[d] = qf.stride(d), P.ks[d] = kf.stride(d), P.vs[d] = vf.stride(d);
  P.out = out.data_ptr<float>();
  P.flags = flags.data_ptr<int32_t>();
  P.stats = stats.has_value() ? stats->data_ptr<float>() : nullptr;
  if (k16.defined()) {
    P.k16 = reinterpret_cast<const uint16_t*>(k16.data_ptr());
    P.eta_s = ETA_FTZ;
  }
  if (v16.defined()) {
    P.v16 = reinterpret_cast<const uint16_t*>(v16.data_ptr());
    P.eta_pv = ETA_FTZ;
    P.bf16_cvt = bf16_hw_round();
  }
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.N = N, P.M = M, P.D = D, P.nblk = nblk;
  P.groups = static_cast<int>((D + PV_GROUP - 1) / PV_GROUP);
  P.causal = causal;
  P.scale = static_cast<float>(scale);
  P.protection = static_cast<int>(protection);
  P.tau = q.scalar_type() == at::kBFloat16 ? 0x1p-7 : 0x1p-10;
  KvSums sums;
  P.inline_sums = inline_sums;
  // per-sample key ranges: checked here (they index k and v), then each sample runs on its
  // range as on keys of its own, with the key sums made per tile
  at::Tensor starts, ends;
  if (key_start.has_value() || key_end.has_value()) {
    std::tie(starts, ends) = key_ranges(key_start, key_end, B, M, "ftattn.attention");
    const int64_t* s0 = starts.data_ptr<int64_t>();
    const int64_t* e0 = ends.data_ptr<int64_t>();
    P.key_start = s0;
    P.key_end = e0;
  }
  if (protection >= 1 && M > 0 && !P.inline_sums) precompute_sums(P, sums);
  // (each key head read by ntile_m * chunks blocks: packed once per call where that is several)
  const at::Tensor packed = ntile_m * chunks >= 2 ? pack_keys_values(P) : at::Tensor();

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
      Scratch& w = thread_scratch(D, M, protection >= 1);
      const Bf16GemmRelease release{P.k16 != nullptr || P.v16 != nullptr};
      const SequentialBlas sequential;
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

// (ftattn._C.cpu_bf16_gemm, cpu_bf16_round: csrc/ftattn.cpp)
bool cpu_bf16_gemm() { return bf16_gemm_ready(); }
bool cpu_bf16_round() { return bf16_hw_round(); }

}  // namespace ftattn
