// Fused decomposed KL (CAKD / DKD) on CPU: one row per task, at::vec SIMD inside a row,
// at::parallel_for across rows. The math (group constants, per-element terms, gradient) is in
// csrc/include/kdkernels/cakd.h.
//
// Per row:
//   0. S is chosen and marked in a per-thread lane mask of the row (all-ones bits for S, 0 for
//      W), so every later pass is plain SIMD over the row, the mask selecting each lane's group
//      constants by blend. No rule sorts the vocabulary. Top-k with k <= 64 is one teacher pass
//      that keeps the classes above the current k-th logit in a small buffer (one SIMD compare
//      skips almost every vector); the mass rule first tries the teacher's 64 best classes the
//      same way; larger k, and the mass rule on flat teachers, bisect a logit threshold with
//      SIMD counting passes over the row (in L2 by then). Among equal teacher logits the lower
//      class index ranks first, so S is deterministic;
//   1. statistics: online max / sum-of-exp of student and teacher, per group, each group with
//      its own max, so a group whose mass underflows keeps an exact log-sum-exp; the exps are
//      kept in per-thread scratch, so no later pass needs exp;
//   2. the SCD / WCD terms and the gradient dL/dz, written in the same pass.
// Rows whose label is ignore_index give loss 0 and gradient 0; a row whose teacher or student is
// entirely -inf gives 0. NaN / +inf logits and out-of-range labels are reported as ValueError.
#include "row_ops.h"

#include <kdkernels/cakd.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_alloc.h"

namespace kdkernels {
namespace {

// A class and its teacher logit in teacher rank order: larger logit first, and the lower class
// index first among equal logits.
struct Ranked {
  float logit;
  int64_t index;
};

inline bool ranks_before(const Ranked& x, const Ranked& y) {
  return x.logit > y.logit || (x.logit == y.logit && x.index < y.index);
}

// NaN never enters a selection (its row is reported as an error by the statistics pass).
inline Ranked ranked(const float* teacher, int64_t i) {
  const float x = teacher[i];
  return Ranked{std::isnan(x) ? kNegInf : x, i};
}

// Up to this many classes, S is selected with a small buffer in one SIMD pass; beyond, by a
// threshold bisection (a few SIMD passes over the row, which by then sits in L2).
constexpr int64_t kBufferedSelection = 64;

// Appends to `out` the k classes that come first in teacher rank order, k <= kBufferedSelection.
// The buffer holds the best k seen so far plus newcomers; since classes arrive in index order,
// a newcomer can only beat the k-th best by a strictly larger logit, which one SIMD compare
// checks for a whole vector. A full buffer is trimmed back to the best k by nth_element.
// This pass does little work per byte it reads from DRAM: it prefetches `student` (the row the
// statistics pass reads next) alongside.
void select_top_k_buffered(const float* teacher, const float* student, int64_t V, int64_t k,
                           std::vector<Ranked>& buffer, std::vector<int64_t>& out) {
  // Trimming at 2k keeps the k-th best logit current, so few vectors leave the SIMD path.
  const size_t capacity = static_cast<size_t>(std::max<int64_t>(2 * k, 16));
  buffer.clear();
  for (int64_t i = 0; i < k; ++i) buffer.push_back(ranked(teacher, i));
  auto trim = [&]() {
    std::nth_element(buffer.begin(), buffer.begin() + (k - 1), buffer.end(), ranks_before);
    buffer.resize(k);
    return buffer[k - 1].logit;  // the k-th best: everything before it ranks before it
  };
  float kth = trim();
  for (int64_t i = k; i < V; i += kW) {
    __builtin_prefetch(student + i, 0, 3);
    const int64_t n = std::min(kW, V - i);
    if (!any_lane(load_masked(teacher + i, n) > Vec(kth))) continue;
    for (int64_t j = i; j < i + n; ++j)
      if (teacher[j] > kth) buffer.push_back(Ranked{teacher[j], j});
    if (buffer.size() >= capacity) kth = trim();
  }
  trim();
  for (const Ranked& r : buffer) out.push_back(r.index);
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
    const Vec vthr(threshold), zero(0.f), one(1.f);
    double total_weight = 0.0, total_count = 0.0;
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t bend = std::min(V, b + kBlock);
      Vec acc_w(0.f), acc_c(0.f);
      for (int64_t i = b; i < bend; i += kW) {
        const int64_t m = std::min(kW, bend - i);
        const Vec above = load_masked(teacher + i, m) >= vthr;
        acc_c = acc_c + Vec::blendv(zero, one, above);
        if (probs) acc_w = acc_w + Vec::blendv(zero, Vec::loadu(probs + i, m), above);
      }
      total_count += hsum(acc_c);
      total_weight += hsum(acc_w);
    }
    *count = static_cast<int64_t>(total_count);
    *weight = probs ? total_weight : total_count;
  };
  Vec vmin(std::numeric_limits<float>::infinity()), vmax(kNegInf);
  for (int64_t i = 0; i < V; i += kW) {
    const int64_t m = std::min(kW, V - i);
    const Vec x = Vec::loadu(teacher + i, m);
    vmin = at::vec::minimum(vmin, Vec::set(vmin, x, m));
    vmax = at::vec::maximum(vmax, Vec::set(vmax, x, m));
  }
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
  for (int64_t i = 0; i < V; i += kW) {
    const int64_t m = std::min(kW, V - i);
    const Vec x = load_masked(teacher + i, m);
    if (!any_lane(x >= Vec(low))) continue;
    for (int64_t j = i; j < i + m; ++j) {
      if (teacher[j] >= high) out.push_back(j);
      else if (teacher[j] >= low) window.push_back(Ranked{teacher[j], j});
    }
  }
  std::sort(window.begin(), window.end(), ranks_before);
  double before = weight_hi;
  for (const Ranked& r : window) {
    if (before >= target) break;
    out.push_back(r.index);
    before += probs ? probs[r.index] : 1.0;
  }
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

// Online log-sum-exp of a stream of logits at scale 1/T.
struct OnlineLse {
  float max = kNegInf;  // raw logit units
  double sum = 0.0;     // sum exp((x - max) / T)
  bool bad = false;     // NaN or +inf seen

  void add_block(const float* x, int64_t n, float inv_t) {
    const float bmax = block_max(x, n);
    if (bad_logit(bmax)) {
      bad = true;
      return;
    }
    if (bmax > max) {
      sum *= std::exp(static_cast<double>(max - bmax) * inv_t);
      max = bmax;
    }
    if (max == kNegInf) return;  // everything so far masked
    const Vec vmax(max), vinv(inv_t);
    Vec acc(0.f);
    for (int64_t i = 0; i < n; i += kW) acc = acc + exp_nonpositive((load_masked(x + i, std::min(kW, n - i)) - vmax) * vinv);
    sum += hsum(acc);
  }
  // -inf when every logit seen was -inf (or none was seen).
  float lse(float inv_t) const {
    return max == kNegInf ? kNegInf : max * inv_t + static_cast<float>(std::log(sum));
  }
};

// Appends to `out` S of the mass rule: the fewest classes, in teacher rank order, whose teacher
// probabilities at temperature T sum to >= mass (the crossing class included). A peaked teacher
// reaches the mass within its few best classes: the buffered top kBufferedSelection are tried
// first; otherwise the probabilities go to `probs` and the threshold bisection decides.
void select_mass(const float* teacher, const float* student, int64_t V, float inv_t, float mass,
                 std::vector<Ranked>& buffer, std::vector<float>& probs, std::vector<int64_t>& out) {
  select_top_k_buffered(teacher, student, V, std::min(V, kBufferedSelection), buffer, out);
  OnlineLse lse;
  for (int64_t b = 0; b < V; b += kBlock) lse.add_block(teacher + b, std::min(kBlock, V - b), inv_t);
  if (lse.bad || lse.max == kNegInf) return;  // bad rows are reported, empty rows give 0
  const float lse_a = lse.lse(inv_t);
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
  const Vec vinv(inv_t), vlse(lse_a);
  for (int64_t i = 0; i < V; i += kW) {
    const int64_t m = std::min(kW, V - i);
    (load_masked(teacher + i, m) * vinv - vlse).exp().store(probs.data() + i, m);
  }
  select_prefix_by_threshold(teacher, V, probs.data(), mass, buffer, out);
}

// Per-thread buffers reused across rows.
struct CakdScratch {
  std::vector<Ranked> buffer;
  std::vector<float> probs;            // [V] teacher probabilities (mass rule, flat teachers)
  std::vector<int64_t> in_s;          // the classes of S
  std::vector<float> s_mask;          // [V] all-ones bits on S, 0 on W (all 0 between rows)
  std::vector<int32_t> block_s_count;  // [blocks] classes of S in each block (all 0 between rows)
  std::vector<float> exp_s, exp_t;    // [V] exp((x - group shift of the block) / T)
  std::vector<float> shifts;          // [blocks x 4] shifts used: student S, W, teacher S, W
};

// Fills scratch.in_s with S and marks it in scratch.s_mask and scratch.block_s_count.
void choose_s(const RowArgs& args, const CakdParams& prm, CakdScratch& scratch) {
  const int64_t V = args.vocab;
  scratch.in_s.clear();
  switch (prm.rule) {
    case GroupRule::kLabel:
      scratch.in_s.push_back(args.label);
      break;
    case GroupRule::kTopK:
      select_top_k(args.teacher, args.student, V, prm.top_k, scratch.buffer, scratch.in_s);
      break;
    case GroupRule::kMass:
      select_mass(args.teacher, args.student, V, prm.inv_temperature, prm.mass, scratch.buffer, scratch.probs,
                  scratch.in_s);
      break;
  }
  if (static_cast<int64_t>(scratch.s_mask.size()) != V) {
    scratch.s_mask.assign(V, 0.f);
    scratch.block_s_count.assign((V + kBlock - 1) / kBlock, 0);
  }
  float all_ones;
  const uint32_t bits = 0xFFFFFFFFu;
  std::memcpy(&all_ones, &bits, sizeof(float));
  for (int64_t i : scratch.in_s) {
    scratch.s_mask[i] = all_ones;
    ++scratch.block_s_count[i / kBlock];
  }
}

void clear_s(CakdScratch& scratch) {
  for (int64_t i : scratch.in_s) {
    scratch.s_mask[i] = 0.f;
    scratch.block_s_count[i / kBlock] = 0;
  }
}

// Per lane: on_s where the lane is in S, else on_w.
inline Vec by_group(const Vec& in_s, const Vec& on_s, const Vec& on_w) { return Vec::blendv(on_w, on_s, in_s); }

inline float finite_shift(float max) { return max == kNegInf ? 0.f : max; }

// Row sums (of exps, of KL terms): kFold vectors add in float, then move to a double sum. A plain
// float sum over a block is less accurate than eager PyTorch's cascade sums, visibly so for the
// KL at large T, where t2 amplifies it.
constexpr int64_t kFold = 8;

// Online softmax statistics at scale 1/T of the S lanes and of the W lanes of a row, each group
// with its own running max, block by block; stores exp((x - shift) / T) with the group's shift
// (its running max) of the block, so the gradient pass needs no exp.
struct GroupedSoftmax {
  GroupStats s{kNegInf, 0.0}, w{kNegInf, 0.0};  // max in raw logit units
  bool bad = false;                            // NaN or +inf seen

  static void advance(GroupStats& g, float block_max, float inv_t) {
    if (block_max > g.max) {
      g.sum *= std::exp(static_cast<double>(g.max - block_max) * inv_t);
      g.max = block_max;
    }
  }

  // s_mask: the block's lanes of the row mask, or nullptr when the block holds no class of S.
  void add_block(const float* x, const float* s_mask, int64_t n, float inv_t, float* exps, float* shift_s,
                 float* shift_w) {
    float bmax_s = kNegInf, bmax_w;
    if (s_mask == nullptr) {
      bmax_w = block_max(x, n);
    } else {
      const Vec neg_inf(kNegInf);
      Vec vmax_s(kNegInf), vmax_w(kNegInf);
      for (int64_t i = 0; i < n; i += kW) {
        const int64_t m = std::min(kW, n - i);
        const Vec xv = load_masked(x + i, m), in_s = Vec::loadu(s_mask + i, m);
        vmax_s = at::vec::maximum(vmax_s, by_group(in_s, xv, neg_inf));
        vmax_w = at::vec::maximum(vmax_w, by_group(in_s, neg_inf, xv));
      }
      bmax_s = hmax(vmax_s);
      bmax_w = hmax(vmax_w);
    }
    if (bad_logit(bmax_s) || bad_logit(bmax_w)) {
      bad = true;
      return;
    }
    advance(s, bmax_s, inv_t);
    advance(w, bmax_w, inv_t);
    // A group without a finite logit yet shifts by 0: its lanes are -inf and give exp(-inf) = 0.
    *shift_s = finite_shift(s.max);
    *shift_w = finite_shift(w.max);
    const Vec vinv(inv_t), zero(0.f), vshift_s(*shift_s), vshift_w(*shift_w);
    DoubleSum block_s, block_w;
    for (int64_t c = 0; c < n; c += kFold * kW) {
      const int64_t cend = std::min(n, c + kFold * kW);
      Vec acc_s(0.f), acc_w(0.f);
      for (int64_t i = c; i < cend; i += kW) {
        const int64_t m = std::min(kW, cend - i);
        const Vec xv = load_masked(x + i, m);
        if (s_mask == nullptr) {
          const Vec e = exp_nonpositive((xv - vshift_w) * vinv);
          e.store(exps + i, m);
          acc_w = acc_w + e;
        } else {
          const Vec in_s = Vec::loadu(s_mask + i, m);
          const Vec e = exp_nonpositive((xv - by_group(in_s, vshift_s, vshift_w)) * vinv);
          e.store(exps + i, m);
          acc_s = acc_s + by_group(in_s, e, zero);
          acc_w = acc_w + by_group(in_s, zero, e);
        }
      }
      if (s_mask != nullptr) block_s.add(acc_s);
      block_w.add(acc_w);
    }
    if (s_mask != nullptr) s.sum += block_s.total();
    w.sum += block_w.total();
  }

  bool empty() const { return s.max == kNegInf && w.max == kNegInf; }

  // Turns an exp stored with `shift` into the probability renormalised inside group g.
  static float factor(const GroupStats& g, float shift, float inv_t) {
    if (g.max == kNegInf) return 0.f;
    return static_cast<float>(std::exp(static_cast<double>(shift - g.max) * inv_t) / g.sum);
  }
};

// Returns the row loss; writes the gradient when args.grad != nullptr and the unweighted
// (BCD, SCD, WCD) into components[0..2]. Expects S marked in the scratch.
float cakd_marked_row(const RowArgs& args, const CakdParams& prm, CakdScratch& scratch, float* components,
                      int* error) {
  const int64_t V = args.vocab;
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  const float inv_t = prm.inv_temperature;
  std::fill(components, components + 3, 0.f);
  scratch.exp_s.resize(V);
  scratch.exp_t.resize(V);
  scratch.shifts.resize(4 * blocks);
  auto block_mask = [&](int64_t b) {
    return scratch.block_s_count[b] ? scratch.s_mask.data() + b * kBlock : nullptr;
  };

  // Pass 1 (reads DRAM for the student): per-group statistics, exps kept in scratch.
  GroupedSoftmax su, ta;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, n = std::min(kBlock, V - off);
    float* shift = scratch.shifts.data() + 4 * b;
    su.add_block(args.student + off, block_mask(b), n, inv_t, scratch.exp_s.data() + off, shift, shift + 1);
    ta.add_block(args.teacher + off, block_mask(b), n, inv_t, scratch.exp_t.data() + off, shift + 2, shift + 3);
  }
  if (ta.bad) *error |= kBadTeacher;
  if (su.bad) *error |= kBadStudent;
  if (su.bad || ta.bad || su.empty() || ta.empty()) {
    if (args.grad) std::fill(args.grad, args.grad + V, 0.f);
    return 0.f;
  }
  const CakdRow row = cakd_row_constants(su.s, su.w, ta.s, ta.w, args.grad_scale, prm);

  // Pass 2 (from L2): the group KL terms and the gradient.
  DoubleSum scd, wcd;
  const Vec vinv(inv_t), zero(0.f);
  const Vec hi_u_s(row.s.hi_u), hi_u_w(row.w.hi_u), hi_a_s(row.s.hi_a), hi_a_w(row.w.hi_a);
  const Vec lo_s(row.s.lo_diff), lo_w(row.w.lo_diff);
  const Vec grad_bcd_s(row.s.grad_bcd), grad_bcd_w(row.w.grad_bcd), grad_kl_s(row.s.grad_kl), grad_kl_w(row.w.grad_kl);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, bend = std::min(V, off + kBlock);
    const float* shift = scratch.shifts.data() + 4 * b;
    const Vec fq_s(GroupedSoftmax::factor(su.s, shift[0], inv_t)), fq_w(GroupedSoftmax::factor(su.w, shift[1], inv_t));
    const Vec fp_s(GroupedSoftmax::factor(ta.s, shift[2], inv_t)), fp_w(GroupedSoftmax::factor(ta.w, shift[3], inv_t));
    const bool mixed = scratch.block_s_count[b] != 0;
    for (int64_t c = off; c < bend; c += kFold * kW) {
      const int64_t cend = std::min(bend, c + kFold * kW);
      Vec acc_s(0.f), acc_w(0.f);
      for (int64_t i = c; i < cend; i += kW) {
        const int64_t m = std::min(kW, cend - i);
        const Vec es = Vec::loadu(scratch.exp_s.data() + i, m), et = Vec::loadu(scratch.exp_t.data() + i, m);
        const Vec a = load_masked(args.teacher + i, m) * vinv, u = load_masked(args.student + i, m) * vinv;
        const Vec in_s = mixed ? Vec::loadu(scratch.s_mask.data() + i, m) : zero;
        Vec kl, grad;
        if (mixed && any_lane(in_s)) {
          cakd_element(et * by_group(in_s, fp_s, fp_w), es * by_group(in_s, fq_s, fq_w),
                       a - by_group(in_s, hi_a_s, hi_a_w), u - by_group(in_s, hi_u_s, hi_u_w),
                       by_group(in_s, lo_s, lo_w), by_group(in_s, grad_bcd_s, grad_bcd_w),
                       by_group(in_s, grad_kl_s, grad_kl_w), kl, grad);
          acc_s = acc_s + by_group(in_s, kl, zero);
          acc_w = acc_w + by_group(in_s, zero, kl);
        } else {
          cakd_element(et * fp_w, es * fq_w, a - hi_a_w, u - hi_u_w, lo_w, grad_bcd_w, grad_kl_w, kl, grad);
          acc_w = acc_w + kl;
        }
        if (args.grad && args.stream_grad && m == kW) {
          store_streaming(grad, args.grad + i);
        } else if (args.grad) {
          grad.store(args.grad + i, m);
        }
      }
      if (mixed) scd.add(acc_s);
      wcd.add(acc_w);
    }
  }
  components[0] = row.bcd;
  components[1] = static_cast<float>(scd.total());
  components[2] = static_cast<float>(wcd.total());
  return cakd_row_loss(row, components[1], components[2], prm);
}

float cakd_row(const RowArgs& args, const CakdParams& prm, CakdScratch& scratch, float* components,
               int* error) {
  choose_s(args, prm, scratch);
  const float loss = cakd_marked_row(args, prm, scratch, components, error);
  clear_s(scratch);
  return loss;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cakd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t group_rule,
    int64_t top_k, double mass, double bcd_weight, double scd_weight, double wcd_weight,
    bool scd_teacher_mass, bool wcd_teacher_mass, double temperature, bool scale_by_t2,
    int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(group_rule >= 0 && group_rule <= static_cast<int64_t>(GroupRule::kMass),
                    "unknown group rule id ", group_rule);
  TORCH_CHECK_VALUE(top_k >= 1, "k must be >= 1, got ", top_k);
  TORCH_CHECK_VALUE(mass > 0.0 && mass < 1.0, "mass must lie in (0, 1), got ", mass);
  TORCH_CHECK_VALUE(temperature > 0.0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(group_rule != static_cast<int64_t>(GroupRule::kLabel) || labels.has_value(),
                    "groups='label' needs labels");
  const RowInputs in = row_inputs(student_logits, teacher_logits, labels);
  const CakdParams prm = make_cakd_params(group_rule, top_k, static_cast<float>(mass), static_cast<float>(bcd_weight),
                                          static_cast<float>(scd_weight), static_cast<float>(wcd_weight),
                                          scd_teacher_mass, wcd_teacher_mass, static_cast<float>(temperature),
                                          scale_by_t2, ignore_index);
  const float scale = grad_scale.item<float>();

  at::Tensor row_loss = at::empty({in.rows}, in.student.options().dtype(at::kFloat));
  // Ignored rows are never visited by the row kernel: their components must start at 0.
  at::Tensor components = at::zeros({in.rows, 3}, in.student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? empty_huge_pages({in.rows, in.vocab}, in.student.options())
                                 : at::empty({0}, in.student.options());
  float* components_ptr = components.mutable_data_ptr<float>();
  run_rows(in, ignore_index, scale, row_loss.mutable_data_ptr<float>(), compute_grad ? &grad : nullptr, [&]() {
    return [&prm, components_ptr, scratch = CakdScratch{}](const RowArgs& args, int64_t r, int* error) mutable {
      return cakd_row(args, prm, scratch, components_ptr + 3 * r, error);
    };
  });
  return {row_loss, components, grad};
}

}  // namespace kdkernels
