// The fault contract of ftattn's ops in C++: the copy of ftattn/contract.py (sites,
// check bits, rows per flag, the fault encoding) that the CPU kernels use.
// tests/test_contract.py parses this file and compares it with that module.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

namespace ftattn {

// The weights of the second, weighted checksums (attention's PV and dQ / dK / dV checks, the
// linear layer's row check), as ftattn/contract.py checksum_weight: w_i = (2 h - (2^24 - 1)) /
// 2^26 for the top 24 bits h of a hash of i, odd multiples of 2^-26 in (-1/4, 1/4), mean 0 (a
// warp's +-2^k deltas can sum to 0 in a plain checksum; they rarely do in both).
constexpr float checksum_weight(int64_t i) {
  uint64_t h = (static_cast<uint64_t>(i + 1) * 0x9E3779B9u) & 0xFFFFFFFFu;
  h ^= h >> 15;
  h = (h * 0x2C1B3C6Du) & 0xFFFFFFFFu;
  h ^= h >> 12;
  return static_cast<float>(2 * static_cast<int64_t>(h >> 8) - 0xFFFFFF) * 0x1p-26f;
}
constexpr double kChecksumWeightMax = 0.25;

// Rows of q per flag.
constexpr int64_t kReportBlockM = 64;

// Where a fault hits.
enum Site : int64_t {
  kScores = 0,
  kProbs = 1,
  kRowmax = 2,
  kRowsum = 3,
  kAcc = 4,
  kOutput = 5,
  kGemm = 6,    // linear: the fp32 accumulator of y[row, col]
  kWeight = 7,  // linear: W[row, dim] as the call reads it
  // attention's backward
  kBwdScores = 8,
  kBwdProbs = 9,
  kDp = 10,
  kDs = 11,
  kDq = 12,
  kDk = 13,
  kDv = 14,
};
constexpr int64_t kNumSites = 15;
// attention's sites are 0 .. kNumAttentionSites - 1, the linear layer's kGemm and kWeight
constexpr int64_t kNumAttentionSites = 6;

// Bits of the flags tensor.
enum CheckBit : int32_t {
  kRowChecksum = 1 << 0,
  kColChecksum = 1 << 1,
  kPvChecksum = 1 << 2,
  kSoftmaxDmr = 1 << 3,
  kRowmaxInvariant = 1 << 4,
  kRowsumInvariant = 1 << 5,
  kOutputCheck = 1 << 6,
  kProbsRange = 1 << 7,
  kScoreRecompute = 1 << 8,
  kGemmRowChecksum = 1 << 9,
  kDpChecksum = 1 << 10,
  kDsCheck = 1 << 11,
  kDqChecksum = 1 << 12,
  kDkChecksum = 1 << 13,
  kDvChecksum = 1 << 14,
  kNonfiniteInput = 1 << 24,
  kCorrected = 1 << 25,
  kUncorrected = 1 << 26,
  kBlind = 1 << 27,
};
// the bits that name failed checks
constexpr int32_t kCheckMask = 0x7FFF;

// An op's `fault` argument: [site, batch, head, row, col, dim, bit, span] (seven
// fields: span 1); bit kBitReplace replaces the value by `fault_value` instead of
// flipping bit 0..31; bit kBitMask flips every bit set in the 32-bit mask `fault_value`
// (an integer 1..2^32-1). span >= 1: the same corruption hits span consecutive values
// of the row along the site's axis (keys for scores, probs, gemm's output features and
// the backward's bwd_scores, bwd_probs, dp, ds; head dims for acc, output, dq, dk, dv and
// the weight's input features), clipped at the row's end; rowmax and rowsum: 1.
constexpr int64_t kFaultFields = 8;
constexpr int64_t kBitReplace = -1;
constexpr int64_t kBitMask = -2;
constexpr int64_t kWarp = 32;

// Whether a site's span runs along its dims (else along its keys / output features;
// rowmax and rowsum have span 1).
static inline bool span_along_dims(int64_t site) {
  return site == kAcc || site == kOutput || site == kWeight || site == kDq || site == kDk || site == kDv;
}

// A fault's eight fields from an op's `fault` argument of seven (span 1) or eight ints,
// into out[]; "" or why they are not a fault's.
template <class Ints>
static inline std::string fault_fields(const Ints& fv, int64_t* out) {
  const int64_t n = static_cast<int64_t>(fv.size());
  if (n != kFaultFields && n != kFaultFields - 1)
    return "fault must be [site, batch, head, row, col, dim, bit, span] (span may be left out: 1), got " +
           std::to_string(n) + " values";
  for (int64_t i = 0; i < kFaultFields; ++i) out[i] = i < n ? static_cast<int64_t>(fv[i]) : 1;
  if (out[7] < 1)
    return "fault span " + std::to_string(out[7]) + " must be >= 1 (consecutive values hit; " +
           std::to_string(kWarp) + " for a warp)";
  if (out[0] == kRowmax || out[0] == kRowsum) out[7] = 1;
  if (out[7] > (int64_t{1} << 31)) out[7] = int64_t{1} << 31;  // (past every row's end; col + span stays in range)
  return "";
}

// Why a fault's bit field and fault_value are not a fault ("" when they are): the one
// message of the kernels' argument checks.
static inline std::string fault_bit_error(int64_t bit, const std::optional<double>& value) {
  if (bit == kBitReplace && !value.has_value())
    return "fault with bit " + std::to_string(kBitReplace) + " needs fault_value (the replacement value)";
  const bool ok = bit == kBitReplace ||
                  (bit == kBitMask ? value.has_value() && *value >= 1.0 && *value < 4294967296.0 &&
                                         *value == static_cast<double>(static_cast<int64_t>(*value))
                                   : bit >= 0 && bit <= 31);
  if (ok) return "";
  return "fault bit " + std::to_string(bit) +
         (value.has_value() ? " with fault_value " + std::to_string(*value) : std::string()) +
         " is not a fault: bit must be 0..31, " + std::to_string(kBitReplace) + " (replace by fault_value) or " +
         std::to_string(kBitMask) + " (flip the bits of the mask fault_value, an integer 1..2^32-1)";
}

// One fault to inject: [site, batch, head, row, col, dim, bit, span] (bit kBitReplace:
// replace the value by `value`); it hits keys (or output features) col .. col + ncols - 1
// and head (or input) dims dim .. dim + ndims - 1 of its row (one of the two is its span,
// the other 1), each clipped by the kernel at the row's end.
struct FaultSpec {
  bool active = false;
  int64_t site = 0, batch = 0, head = 0, row = 0, col = 0, dim = 0, bit = -1, ncols = 1, ndims = 1;
  double value = 0.0;
  // keys [n0, n1) hold a value of the fault
  bool cols_meet(int64_t n0, int64_t n1) const { return col < n1 && col + ncols > n0; }
};

// The FaultSpec of an op's `fault` argument and fault_value into f; "" or why they are
// not a fault (the ranges of its coordinates are the op's to check).
template <class Ints>
static inline std::string parse_fault(const Ints& fv, const std::optional<double>& fault_value, FaultSpec& f) {
  int64_t x[kFaultFields];
  const std::string fields_error = fault_fields(fv, x);
  if (!fields_error.empty()) return fields_error;
  f = FaultSpec{};
  f.active = true;
  f.site = x[0], f.batch = x[1], f.head = x[2], f.row = x[3], f.col = x[4], f.dim = x[5], f.bit = x[6];
  (span_along_dims(f.site) ? f.ndims : f.ncols) = x[7];
  f.value = fault_value.value_or(0.0);
  return fault_bit_error(f.bit, fault_value);
}

// The fault itself: flip bit `bit` (0..31) of the fp32 encoding of x, the bits of the
// mask `value` (bit kBitMask), or (bit kBitReplace) replace x by `value`.
static inline float corrupt(float x, int64_t bit, double value) {
  if (bit == kBitReplace) return static_cast<float>(value);
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u ^= bit == kBitMask ? static_cast<uint32_t>(static_cast<int64_t>(value)) : (1u << bit);
  std::memcpy(&x, &u, sizeof(u));
  return x;
}

// The fault on a row of D values along its dims: dims dim .. dim + ndims - 1 that exist.
static inline void corrupt_dims(float* row, int64_t D, const FaultSpec& f) {
  for (int64_t d = f.dim; d < D && d < f.dim + f.ndims; ++d) row[d] = corrupt(row[d], f.bit, f.value);
}

}  // namespace ftattn
