// Fused decomposed KL (CAKD / DKD) on CPU: one row per task, at::vec SIMD inside a row,
// at::parallel_for across rows. The math (group constants, per-element terms, gradient) is in
// csrc/include/kdkernels/cakd.h.
//
// The classes of a row split into S and W. The smaller of the two is the "listed" group, an
// ascending index list; the other, the "streamed" group, is processed with SIMD over the whole
// row with the listed entries patched to -inf (a block copy in L1, only for the few blocks that
// hold listed entries); the listed entries are processed one by one. Per row:
//   0. selection of S (teacher rules only), one teacher pass: top-k keeps k classes in a small
//      heap, and a SIMD compare against the heap's weakest logit skips almost every vector; the
//      mass rule streams the teacher's log-sum-exp while collecting the classes that can belong
//      to S, then cuts S from them by a probability-weighted quickselect. Ties between equal
//      teacher logits go to the lower class index, so S is deterministic;
//   1. statistics: online max / sum-of-exp of student and teacher per group, each group with its
//      own max, so a group whose mass underflows keeps an exact log-sum-exp;
//   2. the SCD / WCD terms and the gradient dL/dz, written in the same pass.
// Rows whose label is ignore_index give loss 0 and gradient 0; a row whose teacher or student is
// entirely -inf gives 0. NaN / +inf logits and out-of-range labels are reported as ValueError.
#include "row_ops.h"

#include <kdkernels/cakd.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
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

// NaN never enters a selection (its row is reported as an error after the statistics pass).
inline Ranked ranked(const float* teacher, int64_t i) {
  const float x = teacher[i];
  return Ranked{std::isnan(x) ? kNegInf : x, i};
}

// Appends to `out` (ascending) the m classes that come first (`bottom` = false) or last
// (`bottom` = true) in teacher rank order. The heap's root is the kept class nearest the
// boundary; since classes arrive in index order, a later class enters only if its logit is
// strictly larger (top) or not larger (bottom) than the root's, which one SIMD compare decides
// for a whole vector.
void select_rank_extreme(const float* teacher, int64_t V, int64_t m, bool bottom,
                         std::vector<Ranked>& heap, std::vector<int64_t>& out) {
  // comp(x, y): x is kept in preference to y; the heap root is the kept class that leaves first.
  auto comp = [bottom](const Ranked& x, const Ranked& y) {
    return bottom ? ranks_before(y, x) : ranks_before(x, y);
  };
  heap.clear();
  const int64_t fill = std::min(m, V);
  for (int64_t i = 0; i < fill; ++i) heap.push_back(ranked(teacher, i));
  std::make_heap(heap.begin(), heap.end(), comp);
  for (int64_t i = fill; i < V; i += kW) {
    const int64_t n = std::min(kW, V - i);
    const Vec x = Vec::loadu(teacher + i, n);
    const Vec root(heap.front().logit);
    if (!any_lane(bottom ? (x <= root) : (x > root))) continue;
    for (int64_t j = i; j < i + n; ++j) {
      const Ranked candidate = ranked(teacher, j);
      if (!comp(candidate, heap.front())) continue;
      std::pop_heap(heap.begin(), heap.end(), comp);
      heap.back() = candidate;
      std::push_heap(heap.begin(), heap.end(), comp);
    }
  }
  for (const Ranked& r : heap) out.push_back(r.index);
  std::sort(out.begin(), out.end());
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
    for (int64_t i = 0; i < n; i += kW) acc = acc + ((load_masked(x + i, std::min(kW, n - i)) - vmax) * vinv).exp();
    sum += hsum(acc);
  }
  // -inf when every logit seen was -inf (or none was seen).
  float lse(float inv_t) const {
    return max == kNegInf ? kNegInf : max * inv_t + static_cast<float>(std::log(sum));
  }
};

// Log-sum-exp at scale 1/T of x over the listed classes; -inf when none is finite.
float listed_lse(const float* x, const std::vector<int64_t>& listed, float inv_t, bool* bad) {
  float max = kNegInf;
  for (int64_t i : listed) {
    if (bad_logit(x[i])) *bad = true;
    max = std::max(max, x[i]);
  }
  if (*bad || max == kNegInf) return kNegInf;
  double sum = 0.0;
  for (int64_t i : listed) sum += std::exp(static_cast<double>(x[i] - max) * inv_t);
  return max * inv_t + static_cast<float>(std::log(sum));
}

struct Candidate {
  Ranked ranked;
  double prob;  // teacher probability at temperature T
};

// S of the mass rule, appended to `out` (ascending): the fewest classes, in teacher rank order,
// whose teacher probabilities sum to >= mass (the crossing class included). Classes with
// p_i < theta = (1 - mass) / (2V) hold less than (1 - mass) / 2 together, so those with
// p_i >= theta always contain S. They are collected while the teacher's log-sum-exp streams in,
// against the running max (a looser bound, lse >= max, that only tightens), then S is cut from
// them by a quickselect that tracks probability mass: expected time linear in the candidates.
void select_mass(const float* teacher, int64_t V, float inv_t, float mass, std::vector<Candidate>& cand,
                 std::vector<int64_t>& out) {
  const double log_theta = std::log((1.0 - mass) / (2.0 * static_cast<double>(V)));
  const float raw_margin = static_cast<float>(log_theta) / inv_t;  // log(theta) in raw logit units
  cand.clear();
  size_t prune_at = 2 * kBlock;
  OnlineLse lse;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    lse.add_block(teacher + b, n, inv_t);
    if (lse.bad) return;  // reported by the statistics pass
    if (lse.max == kNegInf) continue;
    const float cutoff = lse.max + raw_margin;
    const Vec vcut(cutoff);
    for (int64_t i = b; i < b + n; i += kW) {
      const int64_t m = std::min(kW, b + n - i);
      if (!any_lane(load_masked(teacher + i, m) >= vcut)) continue;
      for (int64_t j = i; j < i + m; ++j)
        if (teacher[j] >= cutoff) cand.push_back(Candidate{Ranked{teacher[j], j}, 0.0});
    }
    if (cand.size() > prune_at) {
      cand.erase(std::remove_if(cand.begin(), cand.end(),
                                [&](const Candidate& c) { return c.ranked.logit < cutoff; }),
                 cand.end());
      prune_at = std::max(prune_at, 2 * cand.size());
    }
  }
  if (lse.max == kNegInf) return;
  const double lse_a = lse.lse(inv_t);
  const double final_cutoff = lse_a + log_theta;
  size_t kept = 0;
  for (const Candidate& c : cand) {
    const double a = static_cast<double>(c.ranked.logit) * inv_t;
    if (a >= final_cutoff) cand[kept++] = Candidate{c.ranked, std::exp(a - lse_a)};
  }
  cand.resize(kept);

  // Invariant: cand[0, lo) is in S; S's remaining classes are a rank-order prefix of
  // cand[lo, hi) holding mass >= need (or all of it, if rounding left the total short).
  size_t lo = 0, hi = cand.size();
  double need = mass;
  auto before = [](const Candidate& x, const Candidate& y) { return ranks_before(x.ranked, y.ranked); };
  while (lo < hi) {
    const size_t mid_pos = lo + (hi - lo) / 2;
    // median of three as the pivot, moved to cand[hi - 1]
    Candidate* first = &cand[lo];
    Candidate* mid = &cand[mid_pos];
    Candidate* last = &cand[hi - 1];
    if (before(*mid, *first)) std::swap(*mid, *first);
    if (before(*last, *first)) std::swap(*last, *first);
    if (before(*mid, *last)) std::swap(*mid, *last);
    const Candidate pivot = *last;
    auto split = std::partition(cand.begin() + lo, cand.begin() + hi - 1,
                                [&](const Candidate& c) { return before(c, pivot); });
    std::iter_swap(split, cand.begin() + hi - 1);
    const size_t pos = split - cand.begin();
    double mass_before = 0.0;
    for (size_t i = lo; i < pos; ++i) mass_before += cand[i].prob;
    if (mass_before >= need) {
      hi = pos;
    } else if (mass_before + cand[pos].prob >= need) {
      lo = pos + 1;
      break;
    } else {
      need -= mass_before + cand[pos].prob;
      lo = pos + 1;
    }
  }
  for (size_t i = 0; i < lo; ++i) out.push_back(cand[i].ranked.index);
  std::sort(out.begin(), out.end());
}

// Per-thread buffers reused across rows.
struct CakdScratch {
  std::vector<Ranked> heap;
  std::vector<Candidate> candidates;
  std::vector<int64_t> chosen;  // S (or W) as selected
  std::vector<int64_t> listed;  // the listed group, ascending
  std::vector<float> patch_s, patch_t;
};

// Replaces `listed` (ascending, in [0, V)) by its complement in [0, V).
void complement(std::vector<int64_t>& listed, int64_t V, std::vector<int64_t>& tmp) {
  tmp.clear();
  size_t k = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (k < listed.size() && listed[k] == i) {
      ++k;
      continue;
    }
    tmp.push_back(i);
  }
  listed.swap(tmp);
}

// Fills scratch.listed with the smaller of S and W; returns whether it is S.
bool split_row(const RowArgs& args, const CakdParams& prm, CakdScratch& scratch) {
  const int64_t V = args.vocab;
  std::vector<int64_t>& listed = scratch.listed;
  listed.clear();
  switch (prm.rule) {
    case GroupRule::kLabel:
      listed.push_back(args.label);
      return true;
    case GroupRule::kTopK: {
      const int64_t k = std::min(prm.top_k, V);
      if (2 * k <= V) {
        select_rank_extreme(args.teacher, V, k, false, scratch.heap, listed);
        return true;
      }
      select_rank_extreme(args.teacher, V, V - k, true, scratch.heap, listed);  // W: the last V - k
      return false;
    }
    case GroupRule::kMass: {
      select_mass(args.teacher, V, prm.inv_temperature, prm.mass, scratch.candidates, listed);
      if (2 * static_cast<int64_t>(listed.size()) <= V) return true;
      complement(listed, V, scratch.chosen);
      return false;
    }
  }
  return true;
}

// Block [b, b + n) of x as the streamed group sees it: x itself when no listed class falls
// inside, else a copy in `patch` with the listed classes listed[first, last) set to -inf.
inline const float* streamed_block(const float* x, int64_t b, int64_t n, const std::vector<int64_t>& listed,
                                   size_t first, size_t last, std::vector<float>& patch) {
  if (first == last) return x + b;
  patch.resize(kBlock);
  std::copy(x + b, x + b + n, patch.data());
  for (size_t k = first; k < last; ++k) patch[listed[k] - b] = kNegInf;
  return patch.data();
}

// Calls body(b, n, student_block, teacher_block) for every block of the streamed group.
template <class Body>
void for_each_streamed_block(const RowArgs& args, CakdScratch& scratch, Body&& body) {
  const std::vector<int64_t>& listed = scratch.listed;
  size_t cursor = 0;
  for (int64_t b = 0; b < args.vocab; b += kBlock) {
    const int64_t n = std::min(kBlock, args.vocab - b);
    const size_t first = cursor;
    while (cursor < listed.size() && listed[cursor] < b + n) ++cursor;
    body(b, n, streamed_block(args.student, b, n, listed, first, cursor, scratch.patch_s),
         streamed_block(args.teacher, b, n, listed, first, cursor, scratch.patch_t));
  }
}

// Returns the row loss; writes the gradient when args.grad != nullptr and the unweighted
// (BCD, SCD, WCD) into components[0..2].
float cakd_row(const RowArgs& args, const CakdParams& prm, CakdScratch& scratch, float* components,
               int* error) {
  const int64_t V = args.vocab;
  const float inv_t = prm.inv_temperature;
  std::fill(components, components + 3, 0.f);
  auto zero_row = [&]() {
    if (args.grad) std::fill(args.grad, args.grad + V, 0.f);
    return 0.f;
  };
  const bool listed_is_s = split_row(args, prm, scratch);

  // Pass 1: per-group statistics.
  OnlineLse streamed_u, streamed_a;
  for_each_streamed_block(args, scratch, [&](int64_t, int64_t n, const float* s, const float* t) {
    streamed_u.add_block(s, n, inv_t);
    streamed_a.add_block(t, n, inv_t);
  });
  bool listed_bad_u = false, listed_bad_a = false;
  const float listed_lse_u = listed_lse(args.student, scratch.listed, inv_t, &listed_bad_u);
  const float listed_lse_a = listed_lse(args.teacher, scratch.listed, inv_t, &listed_bad_a);
  const bool bad_teacher = streamed_a.bad || listed_bad_a, bad_student = streamed_u.bad || listed_bad_u;
  if (bad_teacher) *error |= kBadTeacher;
  if (bad_student) *error |= kBadStudent;
  const float streamed_lse_u = streamed_u.lse(inv_t), streamed_lse_a = streamed_a.lse(inv_t);
  const bool teacher_empty = streamed_lse_a == kNegInf && listed_lse_a == kNegInf;
  const bool student_empty = streamed_lse_u == kNegInf && listed_lse_u == kNegInf;
  if (bad_teacher || bad_student || teacher_empty || student_empty) return zero_row();

  const CakdRow row = listed_is_s
      ? cakd_row_constants(listed_lse_u, streamed_lse_u, listed_lse_a, streamed_lse_a, args.grad_scale, prm)
      : cakd_row_constants(streamed_lse_u, listed_lse_u, streamed_lse_a, listed_lse_a, args.grad_scale, prm);
  const CakdGroup& streamed = listed_is_s ? row.w : row.s;
  const CakdGroup& listed = listed_is_s ? row.s : row.w;

  // Pass 2: the group KL terms and the gradient; the patched (-inf) lanes give 0 for both, and
  // the listed classes' gradient is written afterwards.
  double streamed_kl = 0.0;
  const Vec vinv(inv_t);
  for_each_streamed_block(args, scratch, [&](int64_t b, int64_t n, const float* s, const float* t) {
    Vec acc(0.f);
    for (int64_t i = 0; i < n; i += kW) {
      const int64_t m = std::min(kW, n - i);
      Vec kl, grad;
      cakd_element(load_masked(s + i, m) * vinv, load_masked(t + i, m) * vinv, streamed, kl, grad);
      acc = acc + kl;
      if (args.grad) grad.store(args.grad + b + i, m);
    }
    streamed_kl += hsum(acc);
  });
  double listed_kl = 0.0;
  for (int64_t i : scratch.listed) {
    float kl, grad;
    cakd_element(args.student[i] * inv_t, args.teacher[i] * inv_t, listed, kl, grad);
    listed_kl += kl;
    if (args.grad) args.grad[i] = grad;
  }

  const float scd = static_cast<float>(listed_is_s ? listed_kl : streamed_kl);
  const float wcd = static_cast<float>(listed_is_s ? streamed_kl : listed_kl);
  components[0] = row.bcd;
  components[1] = scd;
  components[2] = wcd;
  return cakd_row_loss(row, scd, wcd, prm);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cakd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t group_rule,
    int64_t top_k, double mass, double bcd_weight, double scd_weight, double wcd_weight,
    bool scd_teacher_mass, bool wcd_teacher_mass, double temperature, bool scale_by_t2,
    int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(student_logits.dim() == 2 && teacher_logits.sizes() == student_logits.sizes(),
                    "student_logits and teacher_logits must be [N, V] of equal shape");
  TORCH_CHECK_VALUE(group_rule >= 0 && group_rule <= static_cast<int64_t>(GroupRule::kMass),
                    "unknown group rule id ", group_rule);
  TORCH_CHECK_VALUE(top_k >= 1, "k must be >= 1, got ", top_k);
  TORCH_CHECK_VALUE(mass > 0.0 && mass < 1.0, "mass must lie in (0, 1), got ", mass);
  TORCH_CHECK_VALUE(temperature > 0.0, "temperature must be > 0, got ", temperature);
  const GroupRule rule = static_cast<GroupRule>(group_rule);
  TORCH_CHECK_VALUE(rule != GroupRule::kLabel || labels.has_value(), "groups='label' needs labels");
  const at::Tensor student = student_logits.contiguous();
  const at::Tensor teacher = teacher_logits.contiguous();
  const int64_t N = student.size(0), V = student.size(1);
  at::Tensor label_tensor;
  const int64_t* label_ptr = nullptr;
  if (labels.has_value()) {
    label_tensor = labels->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(label_tensor.numel() == N, "labels must have one entry per row");
    label_ptr = label_tensor.const_data_ptr<int64_t>();
  }
  const float T = static_cast<float>(temperature);
  CakdParams prm;
  prm.rule = rule;
  prm.top_k = top_k;
  prm.mass = static_cast<float>(mass);
  prm.bcd_weight = static_cast<float>(bcd_weight);
  prm.scd_weight = static_cast<float>(scd_weight);
  prm.wcd_weight = static_cast<float>(wcd_weight);
  prm.scd_teacher_mass = scd_teacher_mass;
  prm.wcd_teacher_mass = wcd_teacher_mass;
  prm.inv_temperature = 1.f / T;
  prm.t2 = scale_by_t2 ? T * T : 1.f;
  prm.grad_coef = prm.t2 / T;
  prm.ignore_index = ignore_index;
  const float scale = grad_scale.item<float>();

  at::Tensor row_loss = at::empty({N}, student.options().dtype(at::kFloat));
  // Ignored rows are never visited by the row kernel: their components must start at 0.
  at::Tensor components = at::zeros({N, 3}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? empty_huge_pages({N, V}, student.options())
                                 : at::empty({0}, student.options());
  float* components_ptr = components.mutable_data_ptr<float>();
  std::atomic<int> errors{kRowOk};
  dispatch_float_types(student.scalar_type(), "student_logits", [&](auto s_tag) {
    dispatch_float_types(teacher.scalar_type(), "teacher_logits", [&](auto t_tag) {
      for_each_row<decltype(s_tag), decltype(t_tag)>(
          student, teacher, label_ptr, ignore_index, scale, row_loss.mutable_data_ptr<float>(),
          compute_grad ? &grad : nullptr, &errors, [&]() {
            return [&prm, components_ptr, scratch = CakdScratch{}](const RowArgs& args, int64_t r,
                                                                  int* error) mutable {
              return cakd_row(args, prm, scratch, components_ptr + 3 * r, error);
            };
          });
    });
  });
  const int err = errors.load();
  TORCH_CHECK_VALUE(!(err & kBadTeacher), "teacher_logits contains NaN or +inf");
  TORCH_CHECK_VALUE(!(err & kBadStudent), "student_logits contains NaN or +inf");
  TORCH_CHECK_VALUE(!(err & kBadLabel), "labels must lie in [0, ", V, ") or equal ignore_index (",
                    ignore_index, ")");
  return {row_loss, components, grad};
}

}  // namespace kdkernels
