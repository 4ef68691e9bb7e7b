// Class-set selection for the CAKD kernel (the rules are described in class_sets.h).
#include "class_sets.h"

#include "row_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace kdkernels {
namespace {

inline bool ranks_before(const Ranked& x, const Ranked& y) {
  return x.logit > y.logit || (x.logit == y.logit && x.index < y.index);
}

// NaN never enters a selection (its row is reported as an error by the statistics pass).
inline Ranked ranked(const float* teacher, int64_t i) {
  const float x = teacher[i];
  return Ranked{std::isnan(x) ? kNegInf : x, i};
}

// Appends to `out` the k classes that come first in teacher rank order, k <= kBufferedSelection,
// in one SIMD pass (RunningTopK). This pass does little work per byte it reads from DRAM: it
// prefetches `student` (the row the statistics pass reads next) alongside.
void select_top_k_buffered(const float* teacher, const float* student, int64_t V, int64_t k,
                           std::vector<Ranked>& buffer, std::vector<int64_t>& out) {
  RunningTopK top(teacher, k, buffer);
  for_each_vec(k, V, [&](int64_t i, int64_t n) KD_ALWAYS_INLINE_LAMBDA {
    __builtin_prefetch(student + i, 0, 3);
    if (any_gt(load_masked(teacher + i, n), Vec(top.kth()))) top.offer(teacher, i, n);
  });
  top.finish(out);
}

// Order-preserving map of a float to uint32 (larger float, larger key) and back; -0 < +0.
inline uint32_t sort_key(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits ^ ((bits >> 31) ? 0xFFFFFFFFu : 0x80000000u);
}
inline float key_value(uint32_t key) {
  const uint32_t bits = key ^ ((key >> 31) ? 0x80000000u : 0xFFFFFFFFu);
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// Appends to `out` S = the shortest prefix of the classes in teacher rank order whose weight
// reaches `target` (the class that crosses it included; all classes if none does); the weight
// of class i is 1 (probs == nullptr: top-k) or probs[i] (the mass rule).
// Bisection over the logits' sort keys for the largest key K with weight(t >= K) >= target, with
// one SIMD pass per step, until at most kBufferedSelection classes lie in the undecided window
// [lo, hi); those are ranked exactly. Ties go to the lower index, as everywhere.
void select_prefix_by_threshold(const float* teacher, int64_t V, const float* probs, double target,
                                std::vector<Ranked>& window, std::vector<int64_t>& out) {
  // weight and number of classes with t >= threshold (NaN compares false: never counted)
  auto weigh = [&](float threshold, double* weight, int64_t* count) {
    const Vec vthr(threshold), one(1.f);
    double total_weight = 0.0, total_count = 0.0;
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t bend = std::min(V, b + kBlock);
      Vec acc_w(0.f), acc_c(0.f);
      // the comparison's all-ones lanes select 1 and the probability with one AND each
      for_each_vec(b, bend, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
        const Vec above = load_masked(teacher + i, m) >= vthr;
        acc_c = acc_c + (above & one);
        if (probs) acc_w = acc_w + (above & Vec::loadu(probs + i, m));
      });
      total_count += hsum(acc_c);
      total_weight += hsum(acc_w);
    }
    *count = static_cast<int64_t>(total_count);
    *weight = probs ? total_weight : total_count;
  };
  Vec vmin(std::numeric_limits<float>::infinity()), vmax(kNegInf);
  for_each_vec(0, V, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
    const Vec x = Vec::loadu(teacher + i, m);
    vmin = at::vec::minimum(vmin, Vec::set(vmin, x, m));
    vmax = at::vec::maximum(vmax, Vec::set(vmax, x, m));
  });
  const float min_t = -hmax(Vec(0.f) - vmin), max_t = hmax(vmax);
  if (std::isnan(min_t) || std::isnan(max_t) || max_t == std::numeric_limits<float>::infinity())
    return;  // reported by the statistics pass

  // Invariant: weight(t >= lo) >= target > weight(t >= hi) = weight_hi.
  uint32_t lo = sort_key(min_t), hi = sort_key(max_t) + 1;
  int64_t count_lo = 0, count_hi = 0;
  double weight_lo = 0.0, weight_hi = 0.0;
  weigh(min_t, &weight_lo, &count_lo);
  if (weight_lo < target) {  // rounding left the total short of target: S is every class
    for (int64_t i = 0; i < V; ++i) out.push_back(i);
    return;
  }
  while (hi - lo > 1 && count_lo - count_hi > kBufferedSelection) {
    const uint32_t mid = lo + (hi - lo) / 2;
    double weight;
    int64_t count;
    weigh(key_value(mid), &weight, &count);
    if (weight >= target) {
      lo = mid;
      count_lo = count;
    } else {
      hi = mid;
      count_hi = count;
      weight_hi = weight;
    }
  }
  // Classes with t >= value(hi) are all in S; the rest of S comes from the window [lo, hi) in
  // rank order while the weight before each class is short of target.
  const float low = key_value(lo), high = key_value(hi);
  window.clear();
  // S holds up to count_lo classes (thousands under the mass rule): each vector's lanes at or
  // above `high` and those in the window are visited by their set bits, not one by one.
  out.reserve(out.size() + static_cast<size_t>(count_lo));
  const Vec vlow(low), vhigh(high);
  for_each_vec(0, V, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
    const Vec x = Vec::loadu(teacher + i, m);
    const uint32_t lanes = (1u << m) - 1u;  // a partial load's other lanes are 0
    const uint32_t at_low = ~static_cast<uint32_t>((x >= vlow).zero_mask()) & lanes;
    if (at_low == 0) return;
    const uint32_t at_high = ~static_cast<uint32_t>((x >= vhigh).zero_mask()) & lanes;
    for (uint32_t bits = at_high; bits != 0; bits &= bits - 1) out.push_back(i + __builtin_ctz(bits));
    for (uint32_t bits = at_low & ~at_high; bits != 0; bits &= bits - 1) {
      const int64_t j = i + __builtin_ctz(bits);
      window.push_back(Ranked{teacher[j], j});
    }
  });
  std::sort(window.begin(), window.end(), ranks_before);
  double before = weight_hi;
  for (const Ranked& r : window) {
    if (before >= target) break;
    out.push_back(r.index);
    before += probs ? probs[r.index] : 1.0;
  }
}

}  // namespace

RunningTopK::RunningTopK(const float* teacher, int64_t k, std::vector<Ranked>& buffer)
    // Trimming at 2k keeps the k-th best logit current, so few vectors leave the SIMD path.
    : buffer_(buffer), k_(k), capacity_(static_cast<size_t>(std::max<int64_t>(2 * k, 16))) {
  buffer_.clear();
  for (int64_t i = 0; i < k; ++i) buffer_.push_back(ranked(teacher, i));
  kth_ = trim();
}

float RunningTopK::trim() {
  std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.end(), ranks_before);
  buffer_.resize(k_);
  return buffer_[k_ - 1].logit;  // the k-th best: everything before it ranks before it
}

void RunningTopK::offer_lanes(const float* lanes, int64_t i, int64_t n) {
  for (int64_t j = std::max(i, k_); j < i + n; ++j)
    if (lanes[j - i] > kth_) buffer_.push_back(Ranked{lanes[j - i], j});
  if (buffer_.size() >= capacity_) kth_ = trim();
}

void RunningTopK::finish(std::vector<int64_t>& out) {
  trim();
  for (const Ranked& r : buffer_) out.push_back(r.index);
}

void select_top_k(const float* teacher, const float* student, int64_t V, int64_t k,
                  std::vector<Ranked>& buffer, std::vector<int64_t>& out) {
  if (k >= V) {  // S is every class
    for (int64_t i = 0; i < V; ++i) out.push_back(i);
  } else if (k <= kBufferedSelection) {
    select_top_k_buffered(teacher, student, V, k, buffer, out);
  } else {
    select_prefix_by_threshold(teacher, V, nullptr, static_cast<double>(k), buffer, out);
  }
}

// A peaked teacher reaches the mass within its few best classes: the buffered top
// kBufferedSelection are tried first; otherwise the probabilities go to `probs` and the threshold
// bisection decides.
void select_mass(const float* teacher, const float* student, int64_t V, float inv_t, float mass,
                 std::vector<Ranked>& buffer, std::vector<float>& probs, std::vector<int64_t>& out) {
  select_top_k_buffered(teacher, student, V, std::min(V, kBufferedSelection), buffer, out);
  OnlineLse lse;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    if (!raise_to_block_max(teacher + b, n, inv_t, lse)) return;  // bad rows are reported
    add_block_exps<false>(teacher + b, n, inv_t, lse, nullptr, nullptr);
  }
  if (lse.empty()) return;  // rows without a teacher distribution give 0
  const double lse_a = lse.lse(inv_t);
  std::sort(buffer.begin(), buffer.end(), ranks_before);
  double before = 0.0;
  size_t taken = 0;
  while (taken < buffer.size() && before < mass) {
    before += std::exp(static_cast<double>(buffer[taken].logit) * inv_t - lse_a);
    ++taken;
  }
  if (before >= mass || taken == static_cast<size_t>(V)) {
    out.clear();
    for (size_t i = 0; i < taken; ++i) out.push_back(buffer[i].index);
    return;
  }
  out.clear();
  probs.resize(V);
  const Vec vinv(inv_t), vlse(static_cast<float>(lse_a));
  for_each_vec(0, V, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
    (load_masked(teacher + i, m) * vinv - vlse).exp().store(probs.data() + i, m);
  });
  select_prefix_by_threshold(teacher, V, probs.data(), mass, buffer, out);
}

}  // namespace kdkernels
