// 16-lane vector helpers shared by the CPU kernels (attention_cpu.cpp, sampling_cpu.cpp):
// GCC vector extensions, lowered to whatever each target_clones clone's ISA has.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(FTATTN_NO_CLONES)
// One clone per ISA, chosen at load time: AVX-512 / AVX2+FMA / baseline SSE2.
// (-DFTATTN_NO_CLONES builds one version for the -march given, to test each path.)
#define FTATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FTATTN_CLONES
#endif

namespace ftattn {
// The instruction set the FTATTN_CLONES functions run: the clone the loader picks
// (the same priority as target_clones' resolver), or the -march of a one-target build.
inline const char* kernel_isa() {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(FTATTN_NO_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
  return "x86-64";
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  return "x86-64-v4";
#elif defined(__AVX2__) && defined(__FMA__)
  return "x86-64-v3";
#elif defined(__x86_64__)
  return "x86-64";
#else
  return "native";
#endif
}
}  // namespace ftattn

// 16-lane vectors (GCC vector extensions, lowered to whatever the clone's ISA has).
// Always inlined: a 64-byte vector passed to a function compiled for a narrower
// ISA (target_clones' default clone) would change the calling convention.
#define FTATTN_VEC_INLINE __attribute__((always_inline)) static inline
namespace ftattn {
namespace vec {
typedef float f16 __attribute__((vector_size(64)));
typedef float f8 __attribute__((vector_size(32)));
typedef double d8 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint32_t u16 __attribute__((vector_size(64)));
typedef uint32_t u8 __attribute__((vector_size(32)));
FTATTN_VEC_INLINE f16 load(const float* p) {
  f16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FTATTN_VEC_INLINE void store(float* p, f16 v) { std::memcpy(p, &v, sizeof(v)); }
FTATTN_VEC_INLINE f16 abs(f16 x) { return reinterpret_cast<f16>(reinterpret_cast<u16>(x) & 0x7fffffffu); }
typedef uint64_t u64x8 __attribute__((vector_size(64)));
FTATTN_VEC_INLINE d8 abs(d8 x) { return reinterpret_cast<d8>(reinterpret_cast<u64x8>(x) & 0x7fffffffffffffffull); }
typedef float f4 __attribute__((vector_size(16)));
typedef float f2 __attribute__((vector_size(8)));
typedef double d4 __attribute__((vector_size(32)));
typedef double d2 __attribute__((vector_size(16)));

// the low and high halves of a vector
template <typename H, typename V>
FTATTN_VEC_INLINE void halves(V x, H& lo, H& hi) {
  static_assert(2 * sizeof(H) == sizeof(V), "halves");
  std::memcpy(&lo, &x, sizeof(H));
  std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(H), sizeof(H));
}
// Horizontal reductions as trees of halves (a fixed order, so the same at every
// protection level; 4 steps instead of 15 dependent scalar ones). hmax / hmin are
// for lanes that hold no NaN.
template <typename V>
struct Half;
template <>
struct Half<f16> { using type = f8; };
template <>
struct Half<f8> { using type = f4; };
template <>
struct Half<f4> { using type = f2; };
template <>
struct Half<d8> { using type = d4; };
template <>
struct Half<d4> { using type = d2; };
typedef int32_t i8 __attribute__((vector_size(32)));
typedef int32_t i4 __attribute__((vector_size(16)));
typedef int32_t i2 __attribute__((vector_size(8)));
template <>
struct Half<i16> { using type = i8; };
template <>
struct Half<i8> { using type = i4; };
template <>
struct Half<i4> { using type = i2; };
struct Add {
  template <typename T>
  __attribute__((always_inline)) T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  __attribute__((always_inline)) T operator()(T a, T b) const { return b > a ? b : a; }
};
struct Min {
  template <typename T>
  __attribute__((always_inline)) T operator()(T a, T b) const { return b < a ? b : a; }
};
template <typename Op, typename V>
FTATTN_VEC_INLINE auto tree(V x, Op op) {
  if constexpr (sizeof(V) == 2 * sizeof(x[0])) {
    return op(x[0], x[1]);
  } else {
    typename Half<V>::type lo, hi;
    halves(x, lo, hi);
    return tree(op(lo, hi), op);
  }
}
FTATTN_VEC_INLINE double hsum(d8 x) { return tree(x, Add{}); }
FTATTN_VEC_INLINE float hsum(f16 x) { return tree(x, Add{}); }
FTATTN_VEC_INLINE float hmax(f16 x) { return tree(x, Max{}); }
FTATTN_VEC_INLINE float hmin(f16 x) { return tree(x, Min{}); }

// The row kernels' vector type where the code runs: 16 lanes (f16) with AVX-512, else 8 (f8).
// GCC 12 lowers a 16-lane select (x > m ? x : m, the clamp of exp) to one AVX-512 instruction,
// but where a 16-lane vector is two 8-lane registers (the x86-64-v3 clone, a -march=x86-64-v3
// build) it goes lane by lane through the stack, and so do a 16-lane vector's halves: the
// forward at protection full on AVX2 spent half its time in such code. Kernels with selects
// are written for a vector type V and instantiated for both; wide_vectors() picks one per call.
template <typename V>
inline constexpr int64_t Lanes = sizeof(V) / sizeof(float);
template <typename V>
FTATTN_VEC_INLINE V load_v(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
FTATTN_VEC_INLINE void store_v(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
// The lanes set in a compare's mask (V{} < V{}'s type) as bits, lane k at bit k: distinct
// powers of two add up to it (no movemask in GCC's vector extensions), so a screen visits
// its set lanes lowest first with ctz, no scalar pass and no branch per lane.
template <typename M>
FTATTN_VEC_INLINE uint32_t mask_bits(M hit) {
  M bit;
  for (int64_t k = 0; k < static_cast<int64_t>(sizeof(M) / sizeof(hit[0])); ++k) bit[k] = 1 << k;
  return static_cast<uint32_t>(tree(hit & bit, Add{}));
}
// The lanes k < count of a vector of type V, as a compare's mask (select on it alone: GCC 12
// lowered a mask and-ed with a compare lane by lane, through the stack).
template <typename V>
FTATTN_VEC_INLINE auto lanes_below(int64_t count) {
  decltype(V{} < V{}) lane;
  for (int64_t k = 0; k < Lanes<V>; ++k) lane[k] = static_cast<int32_t>(k);
  return lane < static_cast<int32_t>(count);
}
FTATTN_VEC_INLINE f8 abs(f8 x) { return reinterpret_cast<f8>(reinterpret_cast<u8>(x) & 0x7fffffffu); }
// sum of 16 fp32 lanes into 8 fp64 lanes (pairs added in fp64). (Converted whole, to 16 fp64
// lanes, then halved: GCC 12 makes two vcvtps2pd zmm of it; the halves converted apiece went
// through four xmm conversions and two inserts, which was most of a fp64 running sum's cost
// in the AVX-512 code. Only the AVX-512 code runs it: vec::Lanes.)
typedef double d16 __attribute__((vector_size(128)));
FTATTN_VEC_INLINE d8 widen_sum(f16 x) {
  d8 a, b;
  halves(__builtin_convertvector(x, d16), a, b);
  return a + b;
}
// 8 fp32 lanes into 8 fp64 lanes (the 8-lane row kernels', vec::Lanes)
FTATTN_VEC_INLINE d8 widen_sum(f8 x) { return __builtin_convertvector(x, d8); }
}  // namespace vec
// true where the FTATTN_CLONES functions run the AVX-512 clone (16-lane registers; vec::Lanes)
inline bool wide_vectors() {
  static const bool w = std::strcmp(kernel_isa(), "x86-64-v4") == 0;
  return w;
}
// the lanes of the vector type wide_vectors() picks
inline int64_t vector_lanes() { return wide_vectors() ? vec::Lanes<vec::f16> : vec::Lanes<vec::f8>; }
}  // namespace ftattn
