// Next-token sampling for the ONNX generator (ftattn/onnx/sampling.py), one call per step.
//
// ftattn.onnx._sampling.sample_tokens(scores [B, V], uniform [B], out [B]) draws one token per row after
// transformers' warpers temperature -> top-k -> top-p. In numpy the same work took
// about 40 calls between two model steps (150-300 us a token in the loop against
// an int4 model step of 1.6 ms); here it is one call (~55 us in the loop, 20-35 warm,
// for top-k 50 and top-p 0.9 over 32000 logits; top-p 0.9 alone 135-145 us warm).
//
// The rules, the same as transformers' and as the plain full-sort reference in
// tests/onnx/test_onnx_sampling.py:
// - top-k keeps every logit >= the k-th largest (ties with the k-th are kept);
// - weights are exp((x - max) / temperature) in double (exp_weights: within 1 ulp of libm's);
// - top-p orders the candidates ascending by (logit, index) and drops the prefix
//   whose cumulative probability is <= 1 - top_p, always keeping the most likely;
// - the draw is the inverse CDF of the kept weights in token-index order at the
//   row's uniform number u in [0, 1): the first kept token whose cumulative weight
//   exceeds u * their sum.
// Top-p finds the dropped prefix without sorting: over 2048 candidates it first sums
// the weights in 1024 bins of the logit and keeps only the bin where the cumulative
// mass crosses 1 - top_p; then a quickselect that carries the mass below the pivot
// (expected O(candidates)); only the last <= 32 candidates are sorted. The draw walks
// sums of 64 weights before the weights themselves. Long sums run in 8 lanes added in a
// fixed tree (the same bits on every instruction set), so they run in another order than a
// sorted cumulative sum: a token whose cumulative probability is within rounding (~1e-16)
// of 1 - top_p, or of u, may fall on the other side than in the reference.
// Its own small extension (no torch: numpy arrays in, read through their
// __array_interface__ and checked here), so the ONNX package needs neither the
// attention extension nor torch's op registrations.
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <stdexcept>
#include <vector>

#include "../vec.h"  // FTATTN_CLONES, 16-lane vectors


namespace ftattn {
namespace {

constexpr int64_t kLanes = 16;  // the scans below run 16 independent lanes (two 8-lane vectors)

// 32-byte vectors: one register with AVX2 and AVX-512. GCC splits 64-byte vectors for AVX2 into
// scalars wherever they are compared or selected (a scan of 32000 logits then took 4x longer
// in the AVX2 clone), while 32-byte ones stay whole there.
namespace v32 {
using vec::d4;
using vec::f4;
using vec::f8;
typedef int32_t i8 __attribute__((vector_size(32)));
typedef int32_t i4 __attribute__((vector_size(16)));
typedef int16_t s4 __attribute__((vector_size(8)));
template <typename V, typename T>
FTATTN_VEC_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename T>
FTATTN_VEC_INLINE void store(T* p, V v) { std::memcpy(p, &v, sizeof(v)); }
FTATTN_VEC_INLINE f8 vmax(f8 a, f8 b) { return b > a ? b : a; }
FTATTN_VEC_INLINE float hmax(f8 v) {
  float best = v[0];
  for (int l = 1; l < 8; ++l) best = v[l] > best ? v[l] : best;
  return best;
}
}  // namespace v32

// The weight loops (exp, sums) run W doubles to a vector, one register: 8 with AVX-512, 4 with
// AVX2, 2 with the baseline's SSE2 (see v32). Each lane computes the same operations, so W does not
// change a bit.
template <int W>
struct Wide {
  typedef double d __attribute__((vector_size(8 * W)));
  typedef int64_t l __attribute__((vector_size(8 * W)));
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
};
#if defined(__AVX512F__)
constexpr int kNativeWide = 8;  // a build for one -march (FTATTN_NO_CLONES, or another compiler)
#elif defined(__AVX__)
constexpr int kNativeWide = 4;
#else
constexpr int kNativeWide = 2;
#endif
// `ret name params` calling impl<W> args: one version per ISA (GCC function multiversioning, as
// FTATTN_CLONES, but with the width each ISA takes), or one for the -march of the build.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(FTATTN_NO_CLONES)
#define FTATTN_WIDE_FUNCTION(ret, name, params, impl, args)                       \
  __attribute__((target("arch=x86-64-v4"))) ret name params { return impl<8> args; } \
  __attribute__((target("arch=x86-64-v3"))) ret name params { return impl<4> args; } \
  __attribute__((target("default"))) ret name params { return impl<2> args; }
#else
#define FTATTN_WIDE_FUNCTION(ret, name, params, impl, args) \
  ret name params { return impl<kNativeWide> args; }
#endif

// A top-p candidate: its logit, token id and unnormalised probability.
struct Item {
  float x;
  int32_t id;
  double w;
};

inline bool item_less(const Item& a, const Item& b) { return a.x < b.x || (a.x == b.x && a.id < b.id); }

// Scratch reused across calls (the loop calls once per token).
struct Scratch {
  std::vector<float> logits;   // the row as float, when it is not float already
  std::vector<float> heap;     // top-k selection
  std::vector<int32_t> cand;   // candidate token ids, ascending
  std::vector<double> weight;  // their unnormalised probabilities
  std::vector<Item> items;     // the candidates, permuted by the top-p selection
  std::vector<int16_t> bins;   // each candidate's bin
  std::vector<double> block;   // sums of the kept weights, kSumBlock candidates each
};

// Top-p on more candidates than this first narrows to one bin of (top - x) / temperature.
constexpr int64_t kNarrowAbove = 2048;
constexpr int kBins = 1024;
constexpr double kBinsPerUnit = 16.0;  // bins per unit of (top - x) / temperature at least; the last holds the rest
constexpr int kBinsLast = kBins - 1;

// Sums of many weights run in kSumLanes independent lanes (the lane of candidate j: j % kSumLanes,
// within blocks of kSumBlock), added up in a fixed tree: an order that does not depend on the
// instruction set, and vector adds instead of one chain of dependent ones (4 cycles each).
constexpr int64_t kSumLanes = 8;
constexpr int64_t kSumBlock = 64;

FTATTN_VEC_INLINE double lanes_total(const double* lane) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// The logit and id of candidate j: x[ids[j]] and ids[j], or x[j] and j when ids is null (all tokens).
template <bool kIds>
FTATTN_VEC_INLINE float cand_x(const float* x, const int32_t* ids, int64_t j) { return kIds ? x[ids[j]] : x[j]; }
template <bool kIds>
FTATTN_VEC_INLINE int32_t cand_id(const int32_t* ids, int64_t j) { return kIds ? ids[j] : static_cast<int32_t>(j); }

// Zeroes the weights of the candidates at or below `edge` in (logit, id) order when `filter`, and
// writes the sums of the weights of each kSumBlock candidates to block[]; returns their total
// (the block sums added in order).
template <int W, bool kIds>
FTATTN_VEC_INLINE double keep_and_sum(const float* x, const int32_t* ids, int64_t m, bool filter, float edge_x,
                                      int32_t edge_id, double* w, double* block) {
  using v32::f8;
  using v32::i8;
  typedef typename Wide<W>::d d;
  typedef typename Wide<W>::l l;
  typedef typename Wide<W>::i i;
  constexpr int Q = kSumLanes / W;  // vectors of sums
  static_assert(kSumLanes % W == 0, "whole vectors of sums");
  const f8 ex = f8{} + edge_x;
  const i8 eid = i8{} + edge_id;
  const i8 iota = {0, 1, 2, 3, 4, 5, 6, 7};
  const int64_t blocks = (m + kSumBlock - 1) / kSumBlock;
  double total = 0.0;
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t from = k * kSumBlock, to = std::min(m, from + kSumBlock);
    d lanes[Q] = {};  // lane l of the block's sums: lanes[l / W][l % W]
    int64_t j = from;
    for (; j + kSumLanes <= to; j += kSumLanes) {
      d wv[Q];
      for (int q = 0; q < Q; ++q) wv[q] = v32::load<d>(w + j + q * W);
      if (filter) {
        f8 xv;
        i8 id;
        if (kIds) {
          for (int64_t u = 0; u < kSumLanes; ++u) {
            xv[u] = x[ids[j + u]];
            id[u] = ids[j + u];
          }
        } else {
          xv = v32::load<f8>(x + j);
          id = iota + static_cast<int32_t>(j);
        }
        const i8 keep = (xv > ex) | ((xv == ex) & (id > eid));
        for (int q = 0; q < Q; ++q) {
          i part;
          std::memcpy(&part, reinterpret_cast<const char*>(&keep) + q * sizeof(part), sizeof(part));
          wv[q] = __builtin_convertvector(part, l) ? wv[q] : d{};
          v32::store(w + j + q * W, wv[q]);
        }
      }
      for (int q = 0; q < Q; ++q) lanes[q] += wv[q];
    }
    double lane[kSumLanes];
    std::memcpy(lane, lanes, sizeof(lane));
    for (; j < to; ++j) {
      if (filter) {
        const float xi = cand_x<kIds>(x, ids, j);
        const bool keep = (xi > edge_x) | ((xi == edge_x) & (cand_id<kIds>(ids, j) > edge_id));
        w[j] = keep ? w[j] : 0.0;
      }
      lane[0] += w[j];
    }
    block[k] = lanes_total(lane);
    total += block[k];
  }
  return total;
}

template <int W>
FTATTN_VEC_INLINE double kept_block_sums_of(const float* x, const int32_t* ids, int64_t m, bool filter, float edge_x,
                                            int32_t edge_id, double* w, double* block) {
  return ids ? keep_and_sum<W, true>(x, ids, m, filter, edge_x, edge_id, w, block)
             : keep_and_sum<W, false>(x, ids, m, filter, edge_x, edge_id, w, block);
}

FTATTN_WIDE_FUNCTION(double, kept_block_sums,
                     (const float* x, const int32_t* ids, int64_t m, bool filter, float edge_x, int32_t edge_id,
                      double* w, double* block),
                     kept_block_sums_of, (x, ids, m, filter, edge_x, edge_id, w, block))

// The smallest finite candidate logit (top when there is none).
template <bool kIds>
FTATTN_VEC_INLINE float finite_min(const float* x, const int32_t* ids, int64_t m, float top) {
  using namespace v32;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  f8 lane = f8{} + top;
  int64_t j = 0;
  for (; j + 8 <= m; j += 8) {
    f8 v;
    if (kIds) {
      for (int l = 0; l < 8; ++l) v[l] = x[ids[j + l]];
    } else {
      v = load<f8>(x + j);
    }
    lane = (v < lane) & (v > NEG_INF) ? v : lane;
  }
  float low = top;
  for (int l = 0; l < 8; ++l) low = lane[l] < low ? lane[l] : low;
  for (; j < m; ++j) {
    const float v = cand_x<kIds>(x, ids, j);
    low = (v < low) & (v > NEG_INF) ? v : low;
  }
  return low;
}

// Each candidate's bin: (top - x) * scale truncated, the last bin holding the rest (and -inf).
template <bool kIds>
FTATTN_VEC_INLINE void bin_of(const float* x, const int32_t* ids, int64_t m, float top, double scale, int16_t* bins) {
  using namespace v32;
  const d4 last = d4{} + static_cast<double>(kBinsLast);
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    f4 v;
    if (kIds) {
      for (int l = 0; l < 4; ++l) v[l] = x[ids[j + l]];
    } else {
      v = load<f4>(x + j);
    }
    d4 t = (static_cast<double>(top) - __builtin_convertvector(v, d4)) * scale;  // +inf for a -inf logit
    t = t < last ? t : last;
    store(bins + j, __builtin_convertvector(__builtin_convertvector(t, i4), s4));
  }
  for (; j < m; ++j) {
    const double t = (static_cast<double>(top) - cand_x<kIds>(x, ids, j)) * scale;
    bins[j] = static_cast<int16_t>(t < kBinsLast ? static_cast<int32_t>(t) : kBinsLast);
  }
}

// The largest of x[0, n) (NaNs skipped) and the number of NaNs.
FTATTN_CLONES
float scan_max(const float* x, int64_t n, int64_t* nans) {
  using namespace v32;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  f8 lane0 = f8{} + NEG_INF, lane1 = lane0;
  i8 bad = i8{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const f8 a = load<f8>(x + i), b = load<f8>(x + i + 8);
    bad -= (a != a) + (b != b);  // -1 where NaN
    lane0 = a > lane0 ? a : lane0;
    lane1 = b > lane1 ? b : lane1;
  }
  float best = hmax(vmax(lane0, lane1));
  int64_t count = 0;
  for (int64_t j = 0; j < 8; ++j) count += bad[j];
  for (; i < n; ++i) {
    count += x[i] != x[i];
    best = x[i] > best ? x[i] : best;
  }
  *nans = count;
  return best;
}

// The largest of the 64 logits at p (no NaN among them)
FTATTN_VEC_INLINE float block_max(const float* p) {
  using namespace v32;
  f8 v[8];
  for (int q = 0; q < 8; ++q) v[q] = load<f8>(p + 8 * q);
  return hmax(vmax(vmax(vmax(v[0], v[1]), vmax(v[2], v[3])), vmax(vmax(v[4], v[5]), vmax(v[6], v[7]))));
}
constexpr int64_t kBlock = 64;

// The k-th largest of x[0, n), 0 < k < n: a min-heap of k, updated only in the 64-logit
// blocks whose largest is above the heap's smallest (one vector test per block).
FTATTN_CLONES
float kth_largest(const float* x, int64_t n, int64_t k, std::vector<float>& heap) {
  heap.assign(x, x + k);
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  float low = heap.front();
  auto scan = [&](int64_t from, int64_t to) {
    for (int64_t i = from; i < to; ++i)
      if (x[i] > low) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = x[i];
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
        low = heap.front();
      }
  };
  int64_t i = k;
  for (; i + kBlock <= n; i += kBlock)
    if (block_max(x + i) > low) scan(i, i + kBlock);
  scan(i, n);
  return low;
}

// Appends to out the ids of x[0, n) that are >= bound, ascending.
FTATTN_CLONES
void collect_at_least(const float* x, int64_t n, float bound, std::vector<int32_t>& out) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock)
    if (block_max(x + i) >= bound)
      for (int64_t j = i; j < i + kBlock; ++j)
        if (x[j] >= bound) out.push_back(static_cast<int32_t>(j));
  for (; i < n; ++i)
    if (x[i] >= bound) out.push_back(static_cast<int32_t>(i));
}


// Bins the candidates (bins[j]) and sums their weights (mass) and counts per bin. 16 bins per unit
// of (top - x) / temperature, or more where the finite logits span less than 64 units, so that the
// bins cover them: the logits a random model makes (std ~0.05) fill 1024 bins instead of 7. Four
// interleaved partial histograms (candidate j in copy j % 4, added in a fixed order) keep
// consecutive candidates of one bin from waiting on each other's store.
template <bool kIds>
FTATTN_VEC_INLINE void histogram_of(const float* x, const int32_t* ids, int64_t m, float top, double temperature,
                                    const double* w, int16_t* bins, double* mass, int32_t* count) {
  const float low = finite_min<kIds>(x, ids, m, top);
  const double spread = static_cast<double>(top) - low;
  const double scale = spread > 0.0 ? std::max(kBinsPerUnit / temperature, kBinsLast / spread)
                                    : kBinsPerUnit / temperature;
  bin_of<kIds>(x, ids, m, top, scale, bins);
  double part[4][kBins] = {};
  int32_t counts[4][kBins] = {};
  int64_t j = 0;
  for (; j + 4 <= m; j += 4)
    for (int c = 0; c < 4; ++c) {
      part[c][bins[j + c]] += w[j + c];
      ++counts[c][bins[j + c]];
    }
  for (; j < m; ++j) {
    part[0][bins[j]] += w[j];
    ++counts[0][bins[j]];
  }
  for (int b = 0; b < kBins; ++b) {
    mass[b] = (part[0][b] + part[1][b]) + (part[2][b] + part[3][b]);
    count[b] = (counts[0][b] + counts[1][b]) + (counts[2][b] + counts[3][b]);
  }
}

FTATTN_CLONES
void histogram(const float* x, const int32_t* ids, int64_t m, float top, double temperature, const double* w,
               int16_t* bins, double* mass, int32_t* count) {
  if (ids)
    histogram_of<true>(x, ids, m, top, temperature, w, bins, mass, count);
  else
    histogram_of<false>(x, ids, m, top, temperature, w, bins, mass, count);
}

// The largest candidate top-p drops (by (logit, id)), or false when it drops none; total: the
// candidates' weights summed.
bool top_p_boundary(Scratch& s, const float* x, bool all, float top, double temperature, double top_p, double total,
                    Item* edge) {
  const int64_t m = static_cast<int64_t>(s.cand.size());
  const std::vector<int32_t>& cand = s.cand;
  const std::vector<double>& weight = s.weight;
  std::vector<Item>& items = s.items;  // the candidates the search below runs over
  const double tau = (1.0 - top_p) * total;  // drop while the cumulative weight is <= tau
  double below = 0.0;                        // the weight dropped so far
  bool dropped = false;
  int64_t kept_outside = 0;                  // candidates kept without being searched
  if (m > kNarrowAbove) {
    // The bins are monotone in the logit, so a whole bin lies below or above another in
    // (logit, id) order: the bins whose mass, summed from the least likely up, stays <= tau
    // are dropped, the boundary lies in the next one, and only that bin's candidates are
    // searched (a few hundred of 32000 random logits, against ~3 MB of memory traffic
    // for a search over all).
    double mass[kBins];
    int32_t count[kBins];
    s.bins.resize(m);
    histogram(x, all ? nullptr : cand.data(), m, top, temperature, weight.data(), s.bins.data(), mass, count);
    int boundary = kBins - 1;
    for (; boundary > 0 && below + mass[boundary] <= tau; --boundary) below += mass[boundary];
    int below_bin = boundary + 1;  // the dropped bin next to the boundary one: it holds the largest dropped
    while (below_bin < kBins && count[below_bin] == 0) ++below_bin;
    for (int b = 0; b < boundary; ++b) kept_outside += count[b];
    items.clear();
    for (int64_t j = 0; j < m; ++j) {
      const int b = s.bins[j];
      if (b == boundary) {
        items.push_back(Item{x[cand[j]], cand[j], weight[j]});
      } else if (b == below_bin) {
        const Item item{x[cand[j]], cand[j], weight[j]};
        if (!dropped || item_less(*edge, item)) *edge = item;
        dropped = true;
      }
    }
  } else {
    items.resize(m);
    for (int64_t j = 0; j < m; ++j) items[j] = Item{x[cand[j]], cand[j], weight[j]};
  }
  const Item outside = *edge;  // the largest dropped outside the search, if dropped
  const bool dropped_outside = dropped;
  const int64_t n = static_cast<int64_t>(items.size());
  int64_t lo = 0, hi = n;  // items[0, lo): dropped (weight `below`); items[hi, n): kept
  uint64_t state = 0x9E3779B97F4A7C15ull;  // pivots from a fixed xorshift: results are deterministic
  while (hi - lo > 32) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::swap(items[lo + static_cast<int64_t>(state % static_cast<uint64_t>(hi - lo))], items[hi - 1]);
    const Item pivot = items[hi - 1];
    int64_t p = lo;  // branch-free Lomuto: items[lo, p) < pivot, their weights summed on the way
    double mass = pivot.w;
    for (int64_t i = lo; i < hi - 1; ++i) {
      const Item item = items[i];
      const bool less = item_less(item, pivot);
      items[i] = items[p];
      items[p] = item;
      p += less;
      mass += less ? item.w : 0.0;
    }
    std::swap(items[p], items[hi - 1]);  // the pivot at p, the greater ones after it
    if (below + mass <= tau) {           // the pivot and all below it are dropped
      below += mass;
      *edge = pivot;
      dropped = true;
      lo = p + 1;
    } else {                             // the pivot is kept, and so is all above it
      hi = p;
    }
  }
  std::sort(items.begin() + lo, items.begin() + hi, item_less);
  for (; lo < hi && below + items[lo].w <= tau; ++lo) {
    below += items[lo].w;
    *edge = items[lo];
    dropped = true;
  }
  if (lo == n && kept_outside == 0) {  // rounding dropped them all: keep the most likely (min_tokens_to_keep = 1)
    const Item most = *std::max_element(items.begin(), items.end(), item_less);
    *edge = outside;
    dropped = dropped_outside;
    for (const Item& item : items)
      if (item_less(item, most) && (!dropped || item_less(*edge, item))) {
        *edge = item;
        dropped = true;
      }
  }
  return dropped;
}

// The weights exp((x - top) / temperature), t = (x - top) / temperature <= 0, in double, by an
// exp in vectors of W lanes (std::exp cost 8 ns a logit, 0.26 ms for a 32000-token vocabulary;
// this ~1.5 ns with AVX-512): round t / ln2 to n, exp(r) for r = t - n ln2 (|r| <= ln2 / 2, ln2
// in two parts) by Taylor to degree 13, times 2^n from the exponent bits. Within 1 ulp of
// glibc's exp over [-708, 0] (2e7 random points, the same operations one at a time); 0 below
// -708 (exp(-708) is 3e-308; -inf logits give 0). FMA contraction is off here, so every version
// (AVX-512, AVX2, the baseline) gives the same bits.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename D, typename L>
FTATTN_VEC_INLINE D exp_nonpositive_v(D t) {
  const L ok = t >= -708.0;
  t = ok ? t : D{};
  const double shift = 6755399441055744.0;  // 1.5 * 2^52: t / ln2 + shift holds round(t / ln2) in its low bits
  const D k = t * 1.4426950408889634 + shift;
  const D n = k - shift;
  const D r = (t - n * 0.693147180369123816490) - n * 1.90821492927058770002e-10;
  D p = D{} + 1.0 / 6227020800.0;  // 1 / 13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // 2^n: n + 1023 in the exponent field (n >= -1022 here)
  const D scale = reinterpret_cast<D>((reinterpret_cast<L>(k) + 1023) << 52);
  return ok ? p * scale : D{};
}

// w[j] = exp((x[ids[j]] - top) / temperature), or of x[j] when ids is null.
template <int W, bool kIds>
FTATTN_VEC_INLINE void exp_weights_of(const float* x, const int32_t* ids, int64_t m, double top, double temperature,
                                      double* w) {
  typedef typename Wide<W>::d d;
  typedef typename Wide<W>::l l;
  typedef typename Wide<W>::f f;
  const bool divide = temperature != 1.0;  // (x - top) / 1 is x - top: skip the division
  int64_t j = 0;
  for (; j + W <= m; j += W) {
    f v;
    if (kIds) {
      for (int u = 0; u < W; ++u) v[u] = x[ids[j + u]];
    } else {
      v = v32::load<f>(x + j);
    }
    d t = __builtin_convertvector(v, d) - top;
    if (divide) t = t / temperature;
    v32::store(w + j, exp_nonpositive_v<d, l>(t));
  }
  if (j < m) {  // the last m - j < W: one vector, its other lanes at the top (t = 0), not stored
    f v = f{} + static_cast<float>(top);
    for (int64_t u = 0; u < m - j; ++u) v[u] = cand_x<kIds>(x, ids, j + u);
    d t = __builtin_convertvector(v, d) - top;
    if (divide) t = t / temperature;
    const d e = exp_nonpositive_v<d, l>(t);
    for (int64_t u = 0; u < m - j; ++u) w[j + u] = e[u];
  }
}

template <int W>
FTATTN_VEC_INLINE void exp_weights_w(const float* x, const int32_t* ids, int64_t m, double top, double temperature,
                                     double* w) {
  if (ids)
    exp_weights_of<W, true>(x, ids, m, top, temperature, w);
  else
    exp_weights_of<W, false>(x, ids, m, top, temperature, w);
}

FTATTN_WIDE_FUNCTION(void, exp_weights,
                     (const float* x, const int32_t* ids, int64_t m, double top, double temperature, double* w),
                     exp_weights_w, (x, ids, m, top, temperature, w))
#pragma GCC pop_options

// Checks an argument of sample_tokens; raised to Python as ValueError.
template <typename... Args>
void check(bool ok, const Args&... message) {
  if (ok) return;
  std::ostringstream text;
  text << "ftattn.onnx._sampling.sample_tokens: ";
  (text << ... << message);
  throw std::invalid_argument(text.str());
}

// IEEE binary16 -> float, exactly (subnormals, Inf and NaN included).
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else {  // zero or subnormal: man * 2^-24, exact in float
    const float f = static_cast<float>(man) * 0x1p-24f;
    std::memcpy(&bits, &f, sizeof(bits));
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

int64_t sample_row(const float* x, int64_t size, int64_t index, double u, double temperature, int64_t top_k,
                   double top_p, Scratch& s) {
  int64_t nans = 0;
  const float best = scan_max(x, size, &nans);
  check(nans == 0, "the logits of row ", index, " contain ", nans, " NaN; the model's output is broken (check "
        "its precision and inputs), no token can be sampled from it");
  check(std::isfinite(best), "the largest logit of row ", index, " is ", best, "; sampling needs a finite largest "
        "logit (all -inf masks every token, +inf has no softmax)");

  s.cand.clear();
  const bool all = !(top_k > 0 && top_k < size);
  if (!all) {  // every logit >= the k-th largest (ties kept), ascending ids
    collect_at_least(x, size, kth_largest(x, size, top_k, s.heap), s.cand);
  } else {
    s.cand.resize(size);
    for (int64_t i = 0; i < size; ++i) s.cand[i] = static_cast<int32_t>(i);
  }
  const int64_t m = static_cast<int64_t>(s.cand.size());
  s.weight.resize(m);
  const int32_t* ids = all ? nullptr : s.cand.data();
  exp_weights(x, ids, m, best, temperature, s.weight.data());

  Item edge{0.0f, 0, 0.0};  // top-p drops the candidates at or below it in (logit, id) order
  // the weights' block sums and total; again for the kept weights when top-p drops some (zeroed:
  // they interleave by id)
  s.block.resize((m + kSumBlock - 1) / kSumBlock);
  double sum = kept_block_sums(x, ids, m, false, 0.0f, 0, s.weight.data(), s.block.data());
  if (top_p < 1.0 && top_p_boundary(s, x, all, best, temperature, top_p, sum, &edge))
    sum = kept_block_sums(x, ids, m, true, edge.x, edge.id, s.weight.data(), s.block.data());
  // the inverse CDF: whole blocks while the cumulative weight stays <= the target, then one by one
  const double target = u * sum;
  const double* w = s.weight.data();
  double acc = 0.0;
  int64_t k = 0;
  const int64_t blocks = static_cast<int64_t>(s.block.size());
  for (; k < blocks && acc + s.block[k] <= target; ++k) acc += s.block[k];
  for (int64_t j = k * kSumBlock; j < m; ++j) {  // a zero weight never moves acc past the target
    acc += w[j];
    if (acc > target) return s.cand[j];
  }
  for (int64_t j = m - 1; j > 0; --j)  // u * sum rounded up to the sum: the last kept token with a weight
    if (w[j] > 0.0) return s.cand[j];
  return s.cand[0];
}

void sample_tokens(uintptr_t scores, int64_t row_stride, int64_t batch, int64_t size, int dtype, uintptr_t uniform,
                   double temperature, int64_t top_k, double top_p, uintptr_t out) {
  check(batch >= 0, "batch=", batch, " must be >= 0");
  check(size >= 1 && size <= std::numeric_limits<int32_t>::max(), "vocab size ", size, " must be in [1, 2^31)");
  check(dtype >= 0 && dtype <= 2, "dtype code ", dtype, " must be 0 (float32), 1 (float16) or 2 (float64)");
  check(std::isfinite(temperature) && temperature > 0, "temperature=", temperature, " must be finite and > 0");
  check(top_k >= 0, "top_k=", top_k, " must be >= 0 (0 turns top-k off)");
  check(top_p > 0 && top_p <= 1, "top_p=", top_p, " must be in (0, 1]");
  const double* draws = reinterpret_cast<const double*>(uniform);
  for (int64_t b = 0; b < batch; ++b)
    check(draws[b] >= 0.0 && draws[b] < 1.0, "uniform[", b, "]=", draws[b], " must be in [0, 1)");
  int64_t* tokens = reinterpret_cast<int64_t*>(out);
  // One scratch for the process: the call holds the GIL throughout, so no two threads share it.
  // (A thread_local cost a __tls_get_addr per use where GCC propagated it into the loops.)
  static Scratch scratch;
  Scratch& s = scratch;
  for (int64_t b = 0; b < batch; ++b) {
    const float* x;
    if (dtype == 0) {
      x = reinterpret_cast<const float*>(scores) + b * row_stride;
    } else {  // float16 / float64 logits: the row as float
      s.logits.resize(size);
      if (dtype == 1) {
        const uint16_t* row = reinterpret_cast<const uint16_t*>(scores) + b * row_stride;
        for (int64_t i = 0; i < size; ++i) s.logits[i] = half_to_float(row[i]);
      } else {
        const double* row = reinterpret_cast<const double*>(scores) + b * row_stride;
        for (int64_t i = 0; i < size; ++i) s.logits[i] = static_cast<float>(row[i]);
      }
      x = s.logits.data();
    }
    tokens[b] = sample_row(x, size, b, draws[b], temperature, top_k, top_p, s);
  }
}

}  // namespace
}  // namespace ftattn

// ---------------------------------------------------------------------------
// the Python module: numpy arrays (or anything with a numpy __array_interface__)

namespace {

// One array argument as the sampler reads it: its address, dims and strides, checked.
struct Array {
  uintptr_t data = 0;
  int64_t dims[2] = {0, 0}, strides[2] = {0, 0};  // strides in bytes
  int ndim = 0;
  std::string type;
  bool readonly = true;
};

int64_t as_int(PyObject* o, const char* what) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw std::invalid_argument(std::string(what) + " is not an integer");
  return v;
}

// arr.__array_interface__ (numpy's protocol, version 3), or an error naming the argument.
Array read_array(PyObject* arr, const char* name) {
  Array a;
  auto fail = [&](const std::string& why) {
    PyErr_Clear();
    throw std::invalid_argument(std::string("ftattn.onnx._sampling.sample_tokens: ") + name + ": " + why);
  };
  PyObject* iface = PyObject_GetAttrString(arr, "__array_interface__");
  if (iface == nullptr || !PyDict_Check(iface)) {
    Py_XDECREF(iface);
    fail("must be a numpy array");
  }
  PyObject* data = PyDict_GetItemString(iface, "data");  // borrowed
  PyObject* shape = PyDict_GetItemString(iface, "shape");
  PyObject* strides = PyDict_GetItemString(iface, "strides");
  PyObject* typestr = PyDict_GetItemString(iface, "typestr");
  bool ok = data && PyTuple_Check(data) && PyTuple_Size(data) == 2 && shape && PyTuple_Check(shape) && typestr &&
            PyUnicode_Check(typestr);
  if (ok) {
    a.data = static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(PyTuple_GetItem(data, 0)));
    a.readonly = PyObject_IsTrue(PyTuple_GetItem(data, 1)) != 0;
    a.ndim = static_cast<int>(PyTuple_Size(shape));
    PyObject* bytes = PyUnicode_AsUTF8String(typestr);
    ok = bytes != nullptr && a.ndim >= 1 && a.ndim <= 2 && !PyErr_Occurred();
    if (ok) a.type = PyBytes_AsString(bytes);
    Py_XDECREF(bytes);
  }
  if (ok) {
    const int64_t item = a.type.size() >= 3 ? std::stoll(a.type.substr(2)) : 0;
    for (int d = 0; d < a.ndim; ++d) a.dims[d] = as_int(PyTuple_GetItem(shape, d), "a dimension");
    if (strides == nullptr || strides == Py_None) {  // C-contiguous
      a.strides[a.ndim - 1] = item;
      if (a.ndim == 2) a.strides[0] = item * a.dims[1];
    } else {
      for (int d = 0; d < a.ndim; ++d) a.strides[d] = as_int(PyTuple_GetItem(strides, d), "a stride");
    }
  }
  Py_DECREF(iface);
  if (!ok) fail("must be a 1-D or 2-D numpy array");
  return a;
}

// The last array seen in one argument, read once and held (a reference), so the generator's
// loop, which passes the same arrays every step, reads no __array_interface__ (~1 us each)
// after the first. (A numpy array holds its data while referenced.)
struct Cached {
  PyObject* obj = nullptr;
  Array array;
};

const Array& read_cached(Cached& c, PyObject* obj, const char* name) {
  if (obj != c.obj) {
    Array a = read_array(obj, name);
    Py_INCREF(obj);
    Py_XDECREF(c.obj);
    c.obj = obj;
    c.array = a;
  }
  return c.array;
}

}  // namespace

// sample_tokens(scores, uniform, out, temperature, top_k, top_p, row=0): scores [batch, vocab]
// float32, float16 or float64 with unit stride along the vocabulary (any row stride: 0 repeats
// a row), uniform float64 [batch] or [steps, batch] (then its row `row`), out int64 [batch]
// (writeable), both contiguous. A plain module method, not a torch op: the generator calls it
// between two model steps, when the caches are cold, and the dispatcher's path cost 45 us
// there (this call: under a microsecond besides the sampling).
extern "C" PyObject* ftattn_sample_tokens(PyObject* /*module*/, PyObject* args) {
  PyObject *scores_obj, *uniform_obj, *out_obj;
  Py_ssize_t top_k, row = 0;
  double temperature, top_p;
  if (!PyArg_ParseTuple(args, "OOOdnd|n", &scores_obj, &uniform_obj, &out_obj, &temperature, &top_k, &top_p, &row))
    return nullptr;
  static Cached cache[3];  // (the call holds the GIL)
  try {
    const Array& sc = read_cached(cache[0], scores_obj, "scores");
    Array un = read_cached(cache[1], uniform_obj, "uniform");
    const Array& out = read_cached(cache[2], out_obj, "out");
    if (un.ndim == 2) {  // one row of the draws
      ftattn::check(row >= 0 && row < un.dims[0], "row=", row, " is out of range for uniform with ", un.dims[0],
                    " rows");
      un.data += static_cast<uintptr_t>(row * un.strides[0]);
      un.ndim = 1;
      un.dims[0] = un.dims[1];
      un.strides[0] = un.strides[1];
    } else {
      ftattn::check(row == 0, "row=", row, " needs a 2-D uniform");
    }
    int dtype = -1;
    if (sc.type == "<f4") dtype = 0;
    if (sc.type == "<f2") dtype = 1;
    if (sc.type == "<f8") dtype = 2;
    const int64_t item = dtype == 0 ? 4 : dtype == 1 ? 2 : 8;
    ftattn::check(sc.ndim == 2 && dtype >= 0, "scores: must be a 2-D float32, float16 or float64 array, got ",
                  sc.type, " with ", sc.ndim, " dims");
    ftattn::check(sc.strides[1] == item && sc.strides[0] % item == 0,
                  "scores: the vocabulary axis must be contiguous (np.ascontiguousarray)");
    const int64_t batch = sc.dims[0];
    ftattn::check(un.ndim == 1 && un.type == "<f8" && un.dims[0] == batch && (batch <= 1 || un.strides[0] == 8),
                  "uniform: must be a contiguous float64 array of shape (", batch, ",)");
    ftattn::check(out.ndim == 1 && out.type == "<i8" && out.dims[0] == batch && (batch <= 1 || out.strides[0] == 8) &&
                      !out.readonly,
                  "out: must be a writeable contiguous int64 array of shape (", batch, ",)");
    ftattn::sample_tokens(sc.data, sc.strides[0] / item, batch, sc.dims[1], dtype, un.data, temperature, top_k, top_p,
                          out.data);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

static PyObject* ftattn_sampling_isa(PyObject*, PyObject*) { return PyUnicode_FromString(ftattn::kernel_isa()); }

extern "C" PyObject* PyInit__sampling(void) {
  static PyMethodDef methods[] = {
      {"sample_tokens", ftattn_sample_tokens, METH_VARARGS,
       "sample_tokens(scores, uniform, out, temperature, top_k, top_p): one token per row of scores into out "
       "(see csrc/onnx/sampling.cpp)"},
      {"cpu_isa", ftattn_sampling_isa, METH_NOARGS, "cpu_isa(): the instruction set the sampler runs"},
      {NULL, NULL, 0, NULL},
  };
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_sampling", NULL, -1, methods};
  return PyModule_Create(&module_def);
}
