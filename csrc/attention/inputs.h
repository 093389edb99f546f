// The checks of an attention kernel's inputs (shapes, dtypes, key ranges) and the fault
// it injects, shared by the forward (csrc/attention_cpu.cpp) and the backward
// (csrc/attention_bwd_cpu.cpp): each error names the value, what is supported and the fix.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "common.h"  // bf16_gemm_ready
#include "fault_contract.h"

namespace ftattn {
namespace {

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

// The per-sample key ranges, checked (they index k and v): int64 (starts, ends) [B].
std::tuple<at::Tensor, at::Tensor> key_ranges(const std::optional<at::Tensor>& key_start,
                                              const std::optional<at::Tensor>& key_end, int64_t B, int64_t M,
                                              const char* op) {
  TORCH_CHECK(key_start.has_value() && key_end.has_value(), op,
              ": key_start and key_end go together (both or neither)");
  for (const at::Tensor* t : {&*key_start, &*key_end})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && !t->is_floating_point() && t->device().is_cpu(), op,
                ": key_start / key_end must be integer tensors of shape [", B, "] on the CPU, got ", t->sizes(), " ",
                t->scalar_type());
  at::Tensor starts = key_start->to(at::kLong).contiguous();
  at::Tensor ends = key_end->to(at::kLong).contiguous();
  const int64_t* s0 = starts.data_ptr<int64_t>();
  const int64_t* e0 = ends.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= s0[b] && s0[b] <= e0[b] && e0[b] <= M, op, ": sample ", b, " has keys [", s0[b], ", ", e0[b],
                "); they must satisfy 0 <= key_start <= key_end <= M = ", M);
  return {starts, ends};
}

// The forward's softmax statistics (attention_fwd writes them, attention_bwd reads them):
// float32 [B, Hq, N, 2], contiguous, on the CPU; op names the caller in the message.
void check_stats(const at::Tensor& stats, int64_t B, int64_t Hq, int64_t N, const char* op) {
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kFloat && stats.device().is_cpu() && stats.is_contiguous() &&
                        stats.sizes() == at::IntArrayRef({B, Hq, N, 2}),
                    op, ": stats must be the forward's, a contiguous float32 CPU tensor [B, Hq, N, 2] = [", B, ", ",
                    Hq, ", ", N, ", 2], got ", stats.scalar_type(), " ", stats.sizes(), " on ", stats.device(),
                    " (torch.empty(B, Hq, N, 2), or None)");
}

// t as an operand of the bf16 GEMM (bf16_gemm_ready): contiguous bf16, or undefined
// where it may not run there: not bf16, no such GEMM here (bf16_gemm_ready), or a
// subnormal value, which the hardware reads as 0 (an input's error would then be its own
// size, not a rounding: the bounds' 2^-126 per operation covers results flushed to 0, not
// inputs). The choice is the data's and the machine's alone, so every protection level
// makes the same products.
at::Tensor bf16_gemm_operand(const at::Tensor& t) {
  if (t.scalar_type() != at::kBFloat16 || !bf16_gemm_ready()) return {};
  at::Tensor c = t.contiguous();
  const uint16_t* x = reinterpret_cast<const uint16_t*>(c.data_ptr());
  const int64_t n = c.numel();
  int sub = 0;
#pragma omp simd reduction(| : sub)
  for (int64_t i = 0; i < n; ++i) sub |= ((x[i] & 0x7F80) == 0) & ((x[i] & 0x7F) != 0);
  return sub ? at::Tensor() : c;
}

// Whether bf16 t may feed the bf16 GEMM, as bf16_gemm_operand decides, read from tf, the
// contiguous fp32 copy of t the kernels make anyway (a bf16 value is subnormal where its
// fp32 value is): for q and dO, whose products take bf16 rows made per block, so no bf16
// copy of them is needed (a strided q, a model's heads, was copied just to be scanned).
bool bf16_gemm_input(const at::Tensor& t, const at::Tensor& tf) {
  if (t.scalar_type() != at::kBFloat16 || !bf16_gemm_ready()) return false;
  TORCH_INTERNAL_ASSERT(tf.scalar_type() == at::kFloat && tf.is_contiguous() && tf.numel() == t.numel());
  const uint32_t* x = reinterpret_cast<const uint32_t*>(tf.data_ptr<float>());
  const int64_t n = tf.numel();
  int sub = 0;
#pragma omp simd reduction(| : sub)
  for (int64_t i = 0; i < n; ++i) sub |= ((x[i] & 0x7F800000u) == 0) & ((x[i] & 0x7FFFFFu) != 0);
  return !sub;
}

}  // namespace
}  // namespace ftattn
