// Op schemas of the ftattn:: namespace and the stub Python module `ftattn._C`.
//
// As in pytorch/extension-cpp: no pybind; importing `ftattn._C` runs the static
// registrars below (TORCH_LIBRARY here, TORCH_LIBRARY_IMPL in the per-backend
// files). From Python (ftattn/attention.py): the fake (meta) kernels, `attention`
// on CPU and CUDA (validation and the on_fault policy in one place, around
// `attention_fwd`), and `attention_fwd` on CUDA (the Triton kernel).
#include <Python.h>
#include <torch/library.h>

#include "vec.h"  // kernel_isa

namespace ftattn {
bool cpu_bf16_gemm();   // csrc/attention_cpu.cpp
bool cpu_bf16_round();  // csrc/attention_cpu.cpp
}

extern "C" {
static PyObject* ftattn_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(ftattn::kernel_isa()); }
static PyObject* ftattn_cpu_bf16_gemm(PyObject*, PyObject*) { return PyBool_FromLong(ftattn::cpu_bf16_gemm()); }
static PyObject* ftattn_cpu_bf16_round(PyObject*, PyObject*) { return PyBool_FromLong(ftattn::cpu_bf16_round()); }

// Three methods, the instruction set of the CPU kernels, whether their bf16 products run on
// the bf16 GEMM and whether its operands are rounded on VCVTNEPS2BF16; the ops register when the import loads
// this shared object. (The ONNX generator's sampler is its own extension: csrc/onnx/.)
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_isa", ftattn_cpu_isa, METH_NOARGS,
       "cpu_isa(): the instruction set the CPU kernels run (x86-64-v4, x86-64-v3, x86-64 or native)"},
      {"cpu_bf16_gemm", ftattn_cpu_bf16_gemm, METH_NOARGS,
       "cpu_bf16_gemm(): whether the CPU kernels run bf16 products on the CPU's bf16 dot products now "
       "(oneDNN's brgemm, AVX512-BF16 / AMX-BF16; attention and linear), rather than sgemm on fp32 copies "
       "(attention) or MKL's bf16 GEMM (linear)"},
      {"cpu_bf16_round", ftattn_cpu_bf16_round, METH_NOARGS,
       "cpu_bf16_round(): whether the C++ attention rounds its fp32 probabilities and dS to bf16 for the "
       "bf16 GEMM with AVX512-BF16's VCVTNEPS2BF16 now (the AVX-512 kernels on such a CPU, unless "
       "FTATTN_BF16_CVT=0), rather than in integer arithmetic (the same bits, but below 2^-126)"},
      {NULL, NULL, 0, NULL},
  };
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      NULL,     // doc
      -1,       // size of per-interpreter state
      methods,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ftattn, m) {
  // The public op: softmax(q k^T * scale) v with in-kernel fault tolerance.
  // q [B, Hq, N, D]; k, v [B, Hkv, M, D]; Hq % Hkv == 0 (GQA); causal masks key j
  // for query i when j > i + (M - N) (bottom-right aligned, as flash-attention 2.1+).
  // protection: "off" | "abft" | "full"; on_fault: "correct" | "raise" | "report".
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? key_start=None, Tensor? key_end=None, *, bool causal=False, "
      "float? scale=None, str protection=\"full\", str on_fault=\"correct\") -> Tensor");
  // The engine behind it, with the per-block check flags (ftattn/faults.py):
  // protection 0 off / 1 abft / 2 full; recompute: recompute flagged blocks;
  // fault = [site, batch, head, row, col, dim, bit] (bit -1: replace by fault_value).
  // key_start / key_end (int64 [B], both or neither): sample b attends to keys
  // key_start[b] <= j < key_end[b] only (a padded batch in one call), causal aligned at
  // key_end[b]. Returns (out [B, Hq, N, D] in q's dtype, flags int32 [B, Hq, ceil(N / 64)]).
  // stats (float32 [B, Hq, N, 2], CPU): where given, the C++ kernel writes each row's largest
  // score and softmax normaliser there, for attention_bwd (a differentiable call).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, int protection, "
      "bool recompute, int[]? fault=None, float? fault_value=None, Tensor? key_start=None, "
      "Tensor? key_end=None, Tensor(a!)? stats=None) -> (Tensor, Tensor)");
  // Its backward, checked: out is the forward's output, grad_out dL/dout; a fault with a
  // backward site (bwd_scores .. dv) is injected here. Returns (dq, dk, dv in the inputs'
  // dtypes, flags int32 [B, Hq, ceil(N / 64) + ceil(M / 64)]: the blocks of query rows,
  // then the blocks of keys of the dK / dV checks). stats: the forward's (attention_fwd), so
  // that P is made again without a first pass over the keys (CPU; else, or None, that
  // pass makes them). CPU: csrc/attention_bwd_cpu.cpp; CUDA:
  // ftattn/reference.py's for now (registered from ftattn/attention.py).
  m.def(
      "attention_bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor grad_out, bool causal, float scale, "
      "int protection, bool recompute, int[]? fault=None, float? fault_value=None, Tensor? key_start=None, "
      "Tensor? key_end=None, Tensor? stats=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // The checked linear layer: y = x W^T + b for x [..., in], weight [out, in], with its
  // row checksums (abft) and the recomputation of a faulty product (ftattn/linear.py).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // The engine behind it: x [..., in] (rows: its leading dims flattened; the C++ kernel
  // takes any, the Python side gives the Triton and reference kernels [rows, in]);
  // ref_cols / mag_cols: the weight's cached
  // checksums per block of block_o output features (ftattn/linear.py); protection 0 off,
  // 1 or 2 abft; fault = [site, 0, 0, row, col, dim, bit] (site gemm or weight).
  // Returns (y [..., out] in x's dtype, flags int32 [1, 1, ceil(rows / 64)]).
  m.def(
      "linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? ref_cols, Tensor? mag_cols, int block_o, "
      "int protection, bool recompute, int[]? fault=None, float? fault_value=None) -> (Tensor, Tensor)");
  // The eager inference call of a checked layer (ftattn/linear.py _eager_cpu, ftattn/protect.py):
  // linear_fwd with no fault and no recomputation, protection abft where the checksums are given
  // (else off), and its blocks' flags OR-ed as an int, so that a clean call reads no tensor back: the
  // dispatch of six arguments and an int costs ~1 us less than linear_fwd's ten and .item().
  m.def(
      "linear_eager(Tensor x, Tensor weight, Tensor? bias, Tensor? ref_cols, Tensor? mag_cols, int block_o) "
      "-> (Tensor, Tensor, SymInt)");
  // A protected layer's call as one opaque op under torch.compile (ftattn/protect.py):
  // runs the layer (ftattn.protect_'s ProtectedLinear, by its id) eagerly, its plan, checks,
  // counts and on_fault policy included, so a compiled model has no graph break per layer.
  m.def("protected_linear(Tensor x, Tensor weight, Tensor? bias, int layer, int out_features) -> Tensor");
  // Its backward's two products under torch.compile (the op's autograd, ftattn/protect.py):
  // dX = dY W and dW = dY^T X (for the weight as the layer holds it: [in, out] for a Conv1D),
  // each a checked linear call with the layer's protection and policy.
  m.def("protected_linear_grad_x(Tensor grad_y, Tensor weight, int layer, int in_features) -> Tensor");
  m.def("protected_linear_grad_w(Tensor grad_y, Tensor x, Tensor weight, int layer) -> Tensor");
  // A weight's checksums in one pass (ftattn/linear.py _block_sums): (sums, squares [2 nb, in],
  // row_sums [out], or [0] without row_sums: an operand used once, whose weights are not
  // scrubbed), fp64. CPU: csrc/linear_cpu.cpp.
  m.def("weight_block_sums(Tensor weight, int block_o, bool row_sums=True) -> (Tensor, Tensor, Tensor)");
  // MX (microscaling) quantize (fake quantization): x [outer, K, inner] float32, blocks of
  // block_size along K; returns (values, scale_e8m0 [outer, ceil(K / block_size), inner]).
  // Element format as microxcaling's (ebits, mbits, emax, max_norm); rounding
  // 0 nearest (half away) / 1 floor / 2 even; log2_thresholds: int32 [256],
  // ftattn/mx/quantize.py. scaled: values stay divided by the block scale. CPU: csrc/mx_cpu.cpp.
  m.def(
      "mx_quantize(Tensor x, Tensor log2_thresholds, int ebits, int mbits, int emax, float max_norm, "
      "int block_size, int rounding, bool scaled) -> (Tensor, Tensor)");
  // bfloat16 rounding of float32 x as microxcaling's bfloat=16 (rounding 0 nearest / 2 even), as float32.
  m.def("bfloat16_quantize(Tensor x, int rounding) -> Tensor");
  // MX pack (ftattn.mx.pack's storage) of x [rows, K] float32, blocks along K: (codes uint8
  // [rows * nblk * block_size * bits / 8], bit-packed; scale_e8m0 uint8 [rows, nblk]).
  m.def(
      "mx_pack(Tensor x, Tensor log2_thresholds, int ebits, int mbits, int emax, float max_norm, "
      "int block_size, int rounding, int bits) -> (Tensor, Tensor)");
  // The packed MX linear layer: y = x dequant(W)^T (+ bias) for x [..., in] (float32 / bfloat16 /
  // float16), W as codes uint8 [out, row_bytes] and scales uint8 [out, nblk]; table: float32 value
  // of each code; kind: 0 table, 1 fp8_e4m3, 2 fp8_e5m2, 3 int8 (ftattn/mx/packed.py).
  // CPU: csrc/mx_linear_cpu.cpp; CUDA: kernels/mx.py.
  m.def(
      "mx_linear(Tensor x, Tensor codes, Tensor scales, Tensor table, int bits, int kind, int block_size, "
      "Tensor? bias=None) -> Tensor");
}
