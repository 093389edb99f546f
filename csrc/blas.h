// The fp32 GEMM of the CPU kernels on row-major blocks (attention forward and backward, the
// linear layer's product): torch's BLAS sgemm (MKL's or OpenBLAS's), IEEE fp32 whatever
// torch.set_float32_matmul_precision says (at::mm takes "medium" as leave to run fp32 on
// oneDNN's bf16 path, inputs rounded to bf16: every check of the linear layer then failed
// on clean data on a CPU with AVX512-BF16); for a row-major or transposed weight the GEMM
// at::mm runs at the default precision (the same bits; at::mm takes a GEMV or copies for
// some layouts, a single output or a strided weight, whose bits differ in the last place).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

extern "C" {
// Fortran BLAS entry point; torch's CPU library exports it (MKL or OpenBLAS).
// Weak, so a torch without it falls back to at::mm.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace ftattn {
namespace {

// C[m x n] (+)= op(A) op(B) on row-major fp32 blocks, op(X) = X or X^T (A [m x k] or,
// transposed, [k x m]; B [k x n] or [n x k]). BLAS sgemm_ where torch exports it (as
// the column-major C^T = op(B)^T op(A)^T), else at::mm.
static void gemm_rm(bool a_transposed, bool b_transposed, bool accumulate, int64_t m, int64_t n, int64_t k,
                    const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) {
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float one = 1.f, beta = accumulate ? 1.f : 0.f;
    sgemm_(b_transposed ? "T" : "N", a_transposed ? "T" : "N", &mi, &ni, &ki, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = a_transposed ? at::from_blob(const_cast<float*>(A), {k, m}, {lda, 1}, opts).t()
                              : at::from_blob(const_cast<float*>(A), {m, k}, {lda, 1}, opts);
  at::Tensor b = b_transposed ? at::from_blob(const_cast<float*>(B), {n, k}, {ldb, 1}, opts).t()
                              : at::from_blob(const_cast<float*>(B), {k, n}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  if (accumulate)
    c.addmm_(a, b);
  else
    at::mm_out(c, a, b);
}

}  // namespace
}  // namespace ftattn
