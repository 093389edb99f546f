// One row of the online softmax with its statistics (and the redundant softmax).
// Part of the CPU attention kernel: included once, by csrc/attention_cpu.cpp (one
// translation unit, so every helper stays inlinable).
#pragma once

#include "common.h"

namespace ftattn {
namespace {

// Where a probs fault lands in one row: keys [col, end) of the tile (none: empty).
struct RowFault {
  int64_t col = -1, end = -1, bit = -1;
  double value = 0.0;
};

// The lanes of a float vector as uint32 (U) and as many uint16 (H): bf16 rounding.
typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint16_t h8 __attribute__((vector_size(16)));
template <typename V>
struct Bf16Lanes;
template <>
struct Bf16Lanes<vec::f16> {
  using U = vec::u16;
  using H = h16;
};
template <>
struct Bf16Lanes<vec::f8> {
  using U = vec::u8;
  using H = h8;
};

// What one row of the online softmax gives: the fp32 row sum of p (the normaliser
// update) and, for the checks, max p (the largest p's bits as unsigned: one integer max a
// vector, where a max and a min of floats took two) and pmin, -1 where some p has its sign
// bit set, else 0 (p >= 0 holds then; a fault's -0.0 is flagged too); ws, the independent
// sum of p (fp32 partials flushed to fp64) for the independent recursion of l (l2: psum's
// own reduction, lanes and tree, is where a fault in l's sum would land; taken from psum,
// as one build did to save an add a vector, it moved with l unseen: review); and,
// per group g of head dims, sum_j p_j a_gj and sum_j p_j b_gj (fp32 partials of CHUNK
// vectors flushed to fp64; a, b: fp32 copies of the per-key, per-group sums of V and
// of |V|, so each product carries one more rounding), and whether the redundant
// softmax disagreed.
// (No default member values: the row kernel writes every field its level's caller reads,
// psum at off, the rest with the checks, wa and wb for its NG groups; zeroing the whole
// struct per row compiled to a rep stos whose start-up cost was 12 % of the per-row
// bookkeeping at head dim 32 on AMD Zen 4.)
struct RowStats {
  float psum, pmax, pmin;
  double ws, wa[MAX_GROUPS], wb[MAX_GROUPS], wc;
  bool dmr_bad;
};

// One row of the online softmax: p_j = exp((S_j - mr) * scale) for the visible keys
// (j <= limit), 0 for the masked ones, written to p, and its RowStats, in one pass
// with p in registers (mr: the running max of the raw scores, scale >= 0).
// PROT 0 gives only psum; PROT >= 1 the statistics of the checks;
// PROT 2 adds the redundant softmax: p made a second time by the same operations from the
// raw scores, (S - mr) scale and exp_neg, through copies of mr and scale that the compiler
// cannot see through (opaque), so the two are distinct computations, compared bit for bit
// (the function is deterministic: equal unless a fault struck; masked keys must have
// p == 0). Any change of p is caught, however small: a tolerance, as the two formulations
// exp / exp2 of stops before needed (64 u relative), passed changes of p that harm the
// output where a row's values are large and cancel (|v| 3e4 with O ~ 0: 15x the harm
// threshold in fp32; found by a targeted campaign). The loop ORs the lanes' bit
// differences; a row where some differ is confirmed by dmr_confirm, which leaves out keys
// whose score is NaN (non-finite input: p and p2 are NaN there, their payloads per the
// operand order of the instructions).
// psum adds the lanes in a fixed order, the same at every level, so off, abft and
// full round l (and the output) alike (but where a masked key's value sums overflow fp32,
// |v| ~ 1e37: there the checked levels take the tail one key at a time, below). INJECT hits p_{fault.col..end-1} after the
// exponential, before anything reads it. NG groups, the g-th at a + g * gs, b + g * gs; PROT 2
// also sums wc = sum_j p_j c_j, c the weighted value sums of the PV check's second checksum
// at a + NG * gs (sums.h's key_value_sums, WEIGHTED).
// P16 (bf16 values on the bf16 GEMM): each p also rounded to the nearest bf16 p' (ties to
// even), written as bf16 bits to pb for the product P V, which p' feeds, and so the PV
// checksum's sums (wa, wb) are of p'; the normaliser, its independent sum and the range
// checks keep p, as the Triton kernel does (and flash attention: P in the inputs' dtype).
// CVT (16 lanes, AVX512-BF16 only): the vectors' rounding by VCVTNEPS2BF16, one instruction
// for the eight of the bit arithmetic (nearest, ties to even, as that; it reads a subnormal p
// as 0, so p' is 0 below 2^-126 where the bit arithmetic gives 2^-126 to p within 2^-135 of
// it: each way p' is what the product reads and what the checksum sums).
// A row whose redundant softmax differed somewhere (softmax_row_body, PROT 2): the keys again,
// as its loops walk them (vectors up to vend, then one at a time up to visible), p2 made by
// the same operations, against p as written, leaving out keys whose score is NaN; true where
// some p differs. Rare: faults, or a row with NaN scores. (Inlined into the row kernel's
// clone: a baseline x86-64 copy would round without FMA, and differ.)
template <typename V>
__attribute__((always_inline)) static inline bool dmr_confirm(const float* S, const float* p, int64_t vend, int64_t visible,
                                                  float mr2, float scale_b) {
  using namespace vec;
  using U = typename LaneBits<V>::type;
  constexpr int64_t L = Lanes<V>;
  int64_t j = 0;
  bool bad = false;
  for (; j + L <= vend; j += L) {
    const V sv = load_v<V>(S + j);
    const U d = reinterpret_cast<U>(load_v<V>(p + j)) ^ reinterpret_cast<U>(exp_neg((sv - mr2) * scale_b));
    for (int64_t l = 0; l < L; ++l) bad |= d[l] != 0 && S[j + l] == S[j + l];
  }
  for (; j < visible; ++j)
    bad |= (float_bits(p[j]) ^ float_bits(exp_neg((S[j] - mr2) * scale_b))) != 0 && S[j] == S[j];
  return bad;
}

template <int PROT, bool INJECT, int NG, typename V, bool P16, bool CVT = false>
__attribute__((always_inline)) static inline void softmax_row_body(float* __restrict S, float* __restrict p,
                                                                   int64_t n, int64_t limit, float scale, float mr,
                                                                   const float* __restrict a,
                                                                   const float* __restrict b, int64_t gs,
                                                                   const RowFault& fault, RowStats& st,
                                                                   uint16_t* __restrict pb) {
  using namespace vec;
  using U = typename Bf16Lanes<V>::U;
  using H = typename Bf16Lanes<V>::H;
  const int64_t visible = std::min<int64_t>(n, std::max<int64_t>(limit + 1, 0));
  // (the second computation's copies of mr and scale: the same values, opaque to the compiler)
  float mr2 = mr, scale_b = scale;
  if constexpr (PROT >= 2) {
    opaque(mr2);
    opaque(scale_b);
  }
  constexpr int64_t L = Lanes<V>;
  V psum_v = V{};
  U diff_v = U{}, top_v = U{};
  d8 s_acc = d8{}, a_acc[NG], b_acc[NG], c_acc = d8{};
  for (int g = 0; g < NG; ++g) a_acc[g] = b_acc[g] = d8{};
  // The visible tail (a causal tile's rows end anywhere in a vector) runs as one more vector
  // whose lanes past the last visible key read -inf, written over their scores here (nothing
  // reads a masked score after this; the row's sums took them before): p = p2 = 0 there, out
  // of every statistic. S and p are rows of BLOCK_N floats, a multiple of L; a and b hold n
  // keys, so only where the vector ends within them. (One key at a time this tail was 14 %
  // of the full row kernel's samples, B1 H8 N2048 D64 causal fp32; a masked copy of the loop
  // body after it cost more registers than the loop had, and its constants went to memory.)
  // The masked lanes' p = 0 times their value sums a, b must add 0: where one is not finite
  // (an fp32 sum of |v| over a group overflows from |v| ~ 1e37, finite input) the tail stays
  // one key at a time, where masked keys never read them (a false alarm, reported
  // uncorrected, otherwise: found by review). Checked on the vector's lanes, (x - x) == 0.
  int64_t vend = visible;
  if (visible % L != 0 && visible - visible % L + L <= n && scale > 0.f) {  // (scale 0: every p is 1)
    const int64_t j0 = visible - visible % L;
    bool sums_finite = true;
    if constexpr (PROT >= 1) {
      V z = V{};
      for (int g = 0; g < NG; ++g) {
        const V av = load_v<V>(a + g * gs + j0), bv = load_v<V>(b + g * gs + j0);
        z += (av - av) + (bv - bv);
      }
      if constexpr (PROT >= 2) {
        const V cv = load_v<V>(a + NG * gs + j0);
        z += cv - cv;
      }
      sums_finite = tree(z, Add{}) == 0.f;
    }
    if (sums_finite) {
      vend = j0 + L;
      std::fill(S + visible, S + vend, -std::numeric_limits<float>::infinity());
    }
  }
  int64_t j = 0;
  while (j + L <= vend) {
    V sp = V{}, ap[NG], bp[NG], cp = V{};
    for (int g = 0; g < NG; ++g) ap[g] = bp[g] = V{};
    for (int64_t c = 0; c < CHUNK && j + L <= vend; ++c, j += L) {
      const V sv = load_v<V>(S + j);
      V pv = exp_neg((sv - mr) * scale);
      if constexpr (INJECT) {
        for (int64_t x = std::max<int64_t>(fault.col, j); x < std::min<int64_t>(fault.end, j + L); ++x)
          pv[x - j] = corrupt(pv[x - j], fault.bit, fault.value);
      }
      store_v(p + j, pv);
      V pr = pv;  // (what P V reads)
      if constexpr (P16 && CVT) {
#if FTATTN_BF16_CVT
        static_assert(std::is_same_v<V, vec::f16>, "VCVTNEPS2BF16 rounds 16 lanes");
        const H h = bf16_round_hw(pv);
        std::memcpy(pb + j, &h, sizeof(h));
        if constexpr (PROT >= 1) pr = bf16_widen_hw(h);
#endif
      } else if constexpr (P16) {
        U u = reinterpret_cast<U>(pv);
        u += 0x7FFFu + ((u >> 16) & 1u);
        u &= 0xFFFF0000u;
        // (below 2^-126 the GEMM reads a bf16 as 0, so 0 here too: the checksum then sums
        // what the product reads, whatever |v|)
        u = u < 0x00800000u ? U{} : u;
        const H h = __builtin_convertvector(u >> 16, H);
        std::memcpy(pb + j, &h, sizeof(h));
        pr = reinterpret_cast<V>(u);
      }
      psum_v += pv;
      if constexpr (PROT >= 1) {
        const U pu = reinterpret_cast<U>(pv);
        top_v = pu > top_v ? pu : top_v;
        sp += pv;
        for (int g = 0; g < NG; ++g) {
          ap[g] += pr * load_v<V>(a + g * gs + j);
          bp[g] += pr * load_v<V>(b + g * gs + j);
        }
        if constexpr (PROT >= 2) cp += pr * load_v<V>(a + NG * gs + j);
      }
      if constexpr (PROT >= 2) diff_v |= reinterpret_cast<U>(pv) ^ reinterpret_cast<U>(exp_neg((sv - mr2) * scale_b));
    }
    if constexpr (PROT >= 1) {
      s_acc += widen_sum(sp);
      for (int g = 0; g < NG; ++g) {
        a_acc[g] += widen_sum(ap[g]);
        b_acc[g] += widen_sum(bp[g]);
      }
      if constexpr (PROT >= 2) c_acc += widen_sum(cp);
    }
  }
  // the rest, one element at a time: the visible tail where it did not run as a vector, then
  // the masked keys
  float psum_t = 0.f;
  uint32_t diff = 0, top = 0;
  double s_t = 0.0, a_t[NG] = {}, b_t[NG] = {}, c_t = 0.0;
  int masked_bad = 0;
  if constexpr (INJECT && PROT >= 2)  // (masked keys in the last vector: p must be 0 there too)
    for (int64_t k = visible; k < vend; ++k) masked_bad |= !(p[k] == 0.f);
  // (masked keys are walked only under injection; else they are a fill of zeros,
  // which cannot compute anything wrong)
  const int64_t tail_end = INJECT ? n : visible;
  for (; j < tail_end; ++j) {
    const bool vis = j < visible;
    float pj = vis ? exp_neg((S[j] - mr) * scale) : 0.f;
    if constexpr (INJECT) {
      if (j >= fault.col && j < fault.end) pj = corrupt(pj, fault.bit, fault.value);
    }
    p[j] = pj;
    float pr = pj;
    if constexpr (P16) {
      pb[j] = CVT ? bf16_gemm_bits_daz(pj) : bf16_gemm_bits(pj);  // (as above)
      pr = bf16_value(pb[j]);
    }
    psum_t += pj;
    if constexpr (PROT >= 1) {
      top = std::max(top, float_bits(pj));
      s_t += static_cast<double>(pj);
      const double x = static_cast<double>(pr);
      for (int g = 0; g < NG; ++g) {
        a_t[g] += x * a[g * gs + j];
        b_t[g] += x * b[g * gs + j];
      }
      if constexpr (PROT >= 2) c_t += x * a[NG * gs + j];
    }
    if constexpr (PROT >= 2) {
      if (vis) {
        diff |= float_bits(pj) ^ float_bits(exp_neg((S[j] - mr2) * scale_b));
      } else {
        masked_bad |= !(pj == 0.f);
      }
    }
  }
  if (j < n) {
    std::fill(p + j, p + n, 0.f);
    if constexpr (P16) std::fill(pb + j, pb + n, uint16_t{0});
  }
  st.psum = tree(psum_v, Add{}) + psum_t;
  if constexpr (PROT >= 1) {
    for (int64_t l = 0; l < L; ++l) top = std::max(top, top_v[l]);
    // (the largest p's bits as unsigned: the largest p where none has its sign set, which
    // pmin < 0 reports; a NaN p is above 1 here)
    std::memcpy(&st.pmax, &top, sizeof(top));
    st.pmin = top >> 31 ? -1.f : 0.f;
    st.ws = vec::hsum(s_acc) + s_t;
    for (int g = 0; g < NG; ++g) {
      st.wa[g] = vec::hsum(a_acc[g]) + a_t[g];
      st.wb[g] = vec::hsum(b_acc[g]) + b_t[g];
    }
    if constexpr (PROT >= 2) st.wc = vec::hsum(c_acc) + c_t;
  }
  if constexpr (PROT >= 2) {
    for (int64_t l = 0; l < L; ++l) diff |= diff_v[l];
    st.dmr_bad = masked_bad || (diff != 0 && dmr_confirm<V>(S, p, vend, visible, mr2, scale_b));
  } else {
    st.dmr_bad = false;
  }
}

// One clone set per variant (the template body is inlined into each, twice: on 16-lane vectors
// where the code runs AVX-512, else on 8-lane ones, vec::Lanes; the same level on one machine
// always takes the same, so off, abft and full still round l alike).
#define FTATTN_SOFTMAX_ROW(name, PROT, INJECT, NG, P16)                                                       \
  FTATTN_CLONES static void name(float* __restrict S, float* __restrict p, int64_t n, int64_t limit,         \
                                 float scale, float m, const float* __restrict a, const float* __restrict b, \
                                 int64_t gs, const RowFault& fault, RowStats& st, uint16_t* __restrict pb) { \
    if (wide_vectors())                                                                                      \
      softmax_row_body<PROT, INJECT, NG, vec::f16, P16>(S, p, n, limit, scale, m, a, b, gs, fault, st, pb);  \
    else                                                                                                     \
      softmax_row_body<PROT, INJECT, NG, vec::f8, P16>(S, p, n, limit, scale, m, a, b, gs, fault, st, pb);   \
  }
#define FTATTN_SOFTMAX_ROWS(PROT, INJECT, P16, suffix)                 \
  FTATTN_SOFTMAX_ROW(softmax_row_##suffix##1, PROT, INJECT, 1, P16)    \
  FTATTN_SOFTMAX_ROW(softmax_row_##suffix##2, PROT, INJECT, 2, P16)    \
  FTATTN_SOFTMAX_ROW(softmax_row_##suffix##3, PROT, INJECT, 3, P16)    \
  FTATTN_SOFTMAX_ROW(softmax_row_##suffix##4, PROT, INJECT, 4, P16)
FTATTN_SOFTMAX_ROW(softmax_row_off, 0, false, 1, false)
FTATTN_SOFTMAX_ROW(softmax_row_off_inject, 0, true, 1, false)
FTATTN_SOFTMAX_ROWS(1, false, false, abft)
FTATTN_SOFTMAX_ROWS(2, false, false, full)
FTATTN_SOFTMAX_ROWS(1, true, false, abft_inject)
FTATTN_SOFTMAX_ROWS(2, true, false, full_inject)
FTATTN_SOFTMAX_ROW(softmax_row_off16, 0, false, 1, true)
FTATTN_SOFTMAX_ROW(softmax_row_off_inject16, 0, true, 1, true)
FTATTN_SOFTMAX_ROWS(1, false, true, abft16_)
FTATTN_SOFTMAX_ROWS(2, false, true, full16_)
FTATTN_SOFTMAX_ROWS(1, true, true, abft_inject16_)
FTATTN_SOFTMAX_ROWS(2, true, true, full_inject16_)
#undef FTATTN_SOFTMAX_ROWS
#undef FTATTN_SOFTMAX_ROW

#if FTATTN_BF16_CVT
// The bf16 rows on AVX512-BF16 (16 lanes only: picked where wide_vectors() is true).
#define FTATTN_SOFTMAX_ROW_CVT(name, PROT, INJECT, NG)                                                          \
  FTATTN_BF16_CVT_TARGET static void name(float* __restrict S, float* __restrict p, int64_t n, int64_t limit,   \
                                          float scale, float m, const float* __restrict a,                        \
                                          const float* __restrict b, int64_t gs, const RowFault& fault,          \
                                          RowStats& st, uint16_t* __restrict pb) {                               \
    softmax_row_body<PROT, INJECT, NG, vec::f16, true, true>(S, p, n, limit, scale, m, a, b, gs, fault, st, pb); \
  }
#define FTATTN_SOFTMAX_ROWS_CVT(PROT, INJECT, suffix)                \
  FTATTN_SOFTMAX_ROW_CVT(softmax_row_##suffix##1, PROT, INJECT, 1) \
  FTATTN_SOFTMAX_ROW_CVT(softmax_row_##suffix##2, PROT, INJECT, 2) \
  FTATTN_SOFTMAX_ROW_CVT(softmax_row_##suffix##3, PROT, INJECT, 3) \
  FTATTN_SOFTMAX_ROW_CVT(softmax_row_##suffix##4, PROT, INJECT, 4)
FTATTN_SOFTMAX_ROW_CVT(softmax_row_off_cvt, 0, false, 1)
FTATTN_SOFTMAX_ROW_CVT(softmax_row_off_inject_cvt, 0, true, 1)
FTATTN_SOFTMAX_ROWS_CVT(1, false, abft_cvt_)
FTATTN_SOFTMAX_ROWS_CVT(2, false, full_cvt_)
FTATTN_SOFTMAX_ROWS_CVT(1, true, abft_inject_cvt_)
FTATTN_SOFTMAX_ROWS_CVT(2, true, full_inject_cvt_)
#undef FTATTN_SOFTMAX_ROWS_CVT
#undef FTATTN_SOFTMAX_ROW_CVT
#endif

using SoftmaxRowFn = void (*)(float*, float*, int64_t, int64_t, float, float, const float*, const float*,
                              int64_t, const RowFault&, RowStats&, uint16_t*);

// The variant for a protection level, injection or not, the number of groups, and P as
// bf16 for the bf16 GEMM or not (rounded by VCVTNEPS2BF16: cvt, where bf16_hw_round()).
static SoftmaxRowFn softmax_row_fn(int protection, bool inject, int groups, bool p16, bool cvt) {
#if FTATTN_BF16_CVT
  if (p16 && cvt) {
    if (protection == 0) return inject ? softmax_row_off_inject_cvt : softmax_row_off_cvt;
    static const SoftmaxRowFn cvt[2][2][MAX_GROUPS] = {
        {{softmax_row_abft_cvt_1, softmax_row_abft_cvt_2, softmax_row_abft_cvt_3, softmax_row_abft_cvt_4},
         {softmax_row_full_cvt_1, softmax_row_full_cvt_2, softmax_row_full_cvt_3, softmax_row_full_cvt_4}},
        {{softmax_row_abft_inject_cvt_1, softmax_row_abft_inject_cvt_2, softmax_row_abft_inject_cvt_3,
          softmax_row_abft_inject_cvt_4},
         {softmax_row_full_inject_cvt_1, softmax_row_full_inject_cvt_2, softmax_row_full_inject_cvt_3,
          softmax_row_full_inject_cvt_4}}};
    return cvt[inject ? 1 : 0][protection - 1][groups - 1];
  }
#endif
  if (protection == 0)
    return p16 ? (inject ? softmax_row_off_inject16 : softmax_row_off16)
               : (inject ? softmax_row_off_inject : softmax_row_off);
  static const SoftmaxRowFn table[2][2][2][MAX_GROUPS] = {
      {{{softmax_row_abft1, softmax_row_abft2, softmax_row_abft3, softmax_row_abft4},
        {softmax_row_full1, softmax_row_full2, softmax_row_full3, softmax_row_full4}},
       {{softmax_row_abft_inject1, softmax_row_abft_inject2, softmax_row_abft_inject3, softmax_row_abft_inject4},
        {softmax_row_full_inject1, softmax_row_full_inject2, softmax_row_full_inject3, softmax_row_full_inject4}}},
      {{{softmax_row_abft16_1, softmax_row_abft16_2, softmax_row_abft16_3, softmax_row_abft16_4},
        {softmax_row_full16_1, softmax_row_full16_2, softmax_row_full16_3, softmax_row_full16_4}},
       {{softmax_row_abft_inject16_1, softmax_row_abft_inject16_2, softmax_row_abft_inject16_3,
         softmax_row_abft_inject16_4},
        {softmax_row_full_inject16_1, softmax_row_full_inject16_2, softmax_row_full_inject16_3,
         softmax_row_full_inject16_4}}}};
  return table[p16 ? 1 : 0][inject ? 1 : 0][protection - 1][groups - 1];
}

}  // namespace
}  // namespace ftattn
