// The fault contract of ftattn's ops in C++: the copy of ftattn/contract.py (sites,
// check bits, rows per flag, the fault encoding) that the CPU kernels use.
// tests/test_contract.py parses this file and compares it with that module.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

namespace ftattn {

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
};
// the bits that name failed checks
constexpr int32_t kCheckMask = 0x7FFF;

// An op's `fault` argument: [site, batch, head, row, col, dim, bit]; bit kBitReplace
// replaces the value by `fault_value` instead of flipping bit 0..31; bit kBitMask flips
// every bit set in the 32-bit mask `fault_value` (an integer 1..2^32-1).
constexpr int64_t kFaultFields = 7;
constexpr int64_t kBitReplace = -1;
constexpr int64_t kBitMask = -2;

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

}  // namespace ftattn
