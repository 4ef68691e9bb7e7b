// Fused decomposed KL (CAKD / DKD) on CPU: one row per task, at::vec SIMD inside a row,
// at::parallel_for across rows. The math (group constants, per-element terms, gradient) is in
// csrc/include/kdkernels/cakd.h.
//
// Per row:
//   0. S is chosen (class_sets.h) and marked in a per-thread lane mask of the row (all-ones bits
//      for S, 0 for W), so every later pass is plain SIMD over the row, the mask selecting each
//      lane's group constants by blend;
//   1. statistics: online max / sum-of-exp of student and teacher, per group, each group with
//      its own max, so a group whose mass underflows keeps an exact log-sum-exp; the exps are
//      kept in per-thread scratch, so no later pass needs exp;
//   2. the SCD / WCD terms and the gradient dL/dz, written in the same pass.
// The top-k rule with k <= 64 (CAKD's usual one) and the label rule (DKD) take their own road
// first (cakd_fused_row): S is told apart inside the statistics pass, which reads both rows from
// DRAM once, and WCD comes from block sums, so the gradient pass needs neither logits nor logs;
// rows it cannot take (NaN / inf logits, masked prefixes, many ties at the k-th logit) go the
// general way above. The fused path reads bf16 / fp16 rows in place and writes their gradient in
// place, converting vector by vector; the general way widens a row it gets into fp32 scratch.
// Rows whose label is ignore_index give loss 0 and gradient 0; a row whose teacher is entirely
// -inf has no teacher distribution and gives 0. NaN / +inf logits, out-of-range labels, and a
// student that is -inf where the teacher has mass (the loss would be +inf; a whole student row
// -inf with a live teacher included) are reported as ValueError.
#include "class_sets.h"
#include "cpu_alloc.h"
#include "row_ops.h"

#include <kdkernels/cakd.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace kdkernels {
namespace {

// Per-thread buffers reused across rows.
struct CakdScratch {
  std::vector<Ranked> buffer;
  std::vector<float> probs;            // [V] teacher probabilities (mass rule, flat teachers)
  std::vector<int64_t> in_s;          // the classes of S
  std::vector<float> s_mask;          // [V] all-ones bits on S, 0 on W (all 0 between rows)
  std::vector<int32_t> block_s_count;  // [blocks] classes of S in each block (all 0 between rows)
  std::vector<float> exp_s, exp_t;    // [V] exp((x - group shift of the block) / T)
  std::vector<float> shifts;          // [blocks x 4] shifts used: student S, W, teacher S, W
  // fused path (cakd_fused_row): W's shifts and forward-KL block sums, the classes kept out of W
  std::vector<float> w_shift_s, w_shift_t;  // [blocks]
  std::vector<double> w_mass, w_gap;         // [blocks]
  std::vector<int64_t> pending;
  // bf16 / fp16 rows: the first k teacher logits as floats (top-k rule); a row the fused path
  // leaves to the general one, widened, and its fp32 gradient
  std::vector<float> head, wide_s, wide_t, wide_g;
};

// Fills scratch.in_s with S.
void choose_s(const RowArgs& args, const CakdParams& params, CakdScratch& scratch) {
  const int64_t V = args.vocab;
  scratch.in_s.clear();
  switch (params.rule) {
    case GroupRule::kLabel:
      scratch.in_s.push_back(args.label);
      break;
    case GroupRule::kTopK:
      select_top_k(args.teacher, args.student, V, params.top_k, scratch.buffer, scratch.in_s);
      break;
    case GroupRule::kMass:
      select_mass(args.teacher, args.student, V, params.inv_temperature, params.mass, scratch.buffer, scratch.probs,
                  scratch.in_s);
      break;
  }
}

// Marks scratch.in_s in scratch.s_mask and scratch.block_s_count.
void mark_s(int64_t V, CakdScratch& scratch) {
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

// Row sums (of exps, of KL terms) fold kFold vectors in float into a DoubleSum.
constexpr int64_t kFold = DoubleSum<>::kFold;

// Online softmax statistics at scale 1/T of the S lanes and of the W lanes of a row, each group
// with its own running max, block by block; stores exp((x - shift) / T) with the group's shift
// (its running max) of the block, so the gradient pass needs no exp.
struct GroupedSoftmax {
  OnlineLse s, w;
  bool bad = false;  // NaN or +inf seen

  // s_mask: the block's lanes of the row mask, or nullptr when the block holds no class of S.
  void add_block(const float* x, const float* s_mask, int64_t n, float inv_t, float* exps, float* shift_s,
                 float* shift_w) {
    // The maxima may drop a NaN lane (max_unordered); its exp is NaN, which the sums then show.
    float bmax_s = kNegInf, bmax_w;
    if (s_mask == nullptr) {
      Vec vmax_w(kNegInf);
      for_each_vec(0, n, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
        vmax_w = max_unordered(vmax_w, load_masked(x + i, m));
      });
      bmax_w = hmax(vmax_w);
    } else {
      const Vec neg_inf(kNegInf);
      Vec vmax_s(kNegInf), vmax_w(kNegInf);
      for_each_vec(0, n, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
        const Vec xv = load_masked(x + i, m), in_s = Vec::loadu(s_mask + i, m);
        vmax_s = max_unordered(vmax_s, by_group(in_s, xv, neg_inf));
        vmax_w = max_unordered(vmax_w, by_group(in_s, neg_inf, xv));
      });
      bmax_s = hmax(vmax_s);
      bmax_w = hmax(vmax_w);
    }
    if (bad_logit(bmax_s) || bad_logit(bmax_w)) {
      bad = true;
      return;
    }
    s.raise_max(bmax_s, inv_t);
    w.raise_max(bmax_w, inv_t);
    // A group without a finite logit yet shifts by 0: its lanes are -inf and give exp(-inf) = 0.
    *shift_s = finite_shift(s.max);
    *shift_w = finite_shift(w.max);
    const Vec vinv(inv_t), zero(0.f), vshift_s(*shift_s), vshift_w(*shift_w);
    DoubleSum<> block_s, block_w;
    for (int64_t c = 0; c < n; c += kFold * kW) {
      const int64_t cend = std::min(n, c + kFold * kW);
      Vec acc_s(0.f), acc_w(0.f);
      for_each_vec(c, cend, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
        prefetch_block_ahead</*kLocality=*/3>(x + i);  // into L1: the row itself is in L2 already
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
      });
      if (s_mask != nullptr) block_s.add_partial(acc_s);
      block_w.add_partial(acc_w);
    }
    const double sum_s = s_mask != nullptr ? block_s.total() : 0.0, sum_w = block_w.total();
    if (std::isnan(sum_s) || std::isnan(sum_w)) bad = true;
    s.sum += sum_s;
    w.sum += sum_w;
  }

  bool empty() const { return s.empty() && w.empty(); }
};

// Returns the row loss; writes the gradient when args.grad != nullptr and the unweighted
// (BCD, SCD, WCD) into components[0..2]. Expects S marked in the scratch.
float cakd_marked_row(const RowArgs& args, const CakdParams& params, CakdScratch& scratch, float* components,
                      int* error) {
  const int64_t V = args.vocab;
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  const float inv_t = params.inv_temperature;
  std::fill(components, components + 3, 0.f);
  scratch.exp_s.resize(V);
  scratch.exp_t.resize(V);
  scratch.shifts.resize(4 * blocks);
  auto block_mask = [&](int64_t b) {
    return scratch.block_s_count[b] ? scratch.s_mask.data() + b * kBlock : nullptr;
  };

  // Pass 1 (reads DRAM for the student): per-group statistics, exps kept in scratch.
  GroupedSoftmax student, teacher;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, n = std::min(kBlock, V - off);
    float* shift = scratch.shifts.data() + 4 * b;
    student.add_block(args.student + off, block_mask(b), n, inv_t, scratch.exp_s.data() + off, shift, shift + 1);
    teacher.add_block(args.teacher + off, block_mask(b), n, inv_t, scratch.exp_t.data() + off, shift + 2, shift + 3);
  }
  if (teacher.bad) *error |= kBadTeacher;
  if (student.bad) *error |= kBadStudent;
  // A live teacher against a student row that is entirely -inf: KL(p || q) is +inf.
  if (student.empty() && !teacher.empty()) *error |= kStudentMassOnNegInf;
  if (student.bad || teacher.bad || student.empty() || teacher.empty()) {
    if (args.grad) std::fill(args.grad, args.grad + V, 0.f);
    return 0.f;
  }
  const CakdRow row = cakd_row_constants(student.s, student.w, teacher.s, teacher.w, args.grad_scale, params);

  // Pass 2 (from L2): the group KL terms and the gradient.
  DoubleSum<> scd, wcd;
  const Vec vinv(inv_t), zero(0.f);
  const Vec hi_u_s(row.s.hi_u), hi_u_w(row.w.hi_u), hi_a_s(row.s.hi_a), hi_a_w(row.w.hi_a);
  const Vec lo_s(row.s.lo_diff), lo_w(row.w.lo_diff);
  const Vec grad_bcd_s(row.s.grad_bcd), grad_bcd_w(row.w.grad_bcd), grad_kl_s(row.s.grad_kl), grad_kl_w(row.w.grad_kl);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, bend = std::min(V, off + kBlock);
    const float* shift = scratch.shifts.data() + 4 * b;
    const Vec fq_s(student.s.probability_factor(shift[0], inv_t)), fq_w(student.w.probability_factor(shift[1], inv_t));
    const Vec fp_s(teacher.s.probability_factor(shift[2], inv_t)), fp_w(teacher.w.probability_factor(shift[3], inv_t));
    const bool mixed = scratch.block_s_count[b] != 0;
    for (int64_t c = off; c < bend; c += kFold * kW) {
      const int64_t cend = std::min(bend, c + kFold * kW);
      Vec acc_s(0.f), acc_w(0.f);
      for_each_vec(c, cend, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
        args.next.prefetch(i);
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
      });
      if (mixed) scd.add_partial(acc_s);
      wcd.add_partial(acc_w);
    }
  }
  components[0] = row.bcd;
  components[1] = static_cast<float>(scd.total());
  components[2] = static_cast<float>(wcd.total());
  // Each component is +inf only where the teacher has mass on student -inf entries (in a group,
  // or a whole group): the loss would be +inf, or NaN under a zero weight.
  if (!std::isfinite(components[0]) || !std::isfinite(components[1]) || !std::isfinite(components[2]))
    *error |= kStudentMassOnNegInf;
  return cakd_row_loss(row, components[1], components[2], params);
}

// cakd_fused_row's gradient pass (from L2), S marked: q̂ = e_s fq and p̂ = e_t fp with S's
// factors (its exps were taken at its maxima) or W's at the block's shifts, and dL/dz =
// cakd_grad(p̂, q̂, ...). It prefetches nothing: the statistics pass already fetched the thread's
// next rows while computing its exps (prefetch_block_ahead), where this pass has too little work
// to hide DRAM reads behind.
template <typename S, typename T>
void cakd_grad_pass(const RowArgsT<S, T>& args, const CakdRow& row, const CakdScratch& scratch, const OnlineLse& s_u,
                    const OnlineLse& s_a, const OnlineLse& w_u, const OnlineLse& w_a, float inv_t) {
  const int64_t V = args.vocab;
  const Vec grad_bcd_s(row.s.grad_bcd), grad_bcd_w(row.w.grad_bcd), grad_kl_s(row.s.grad_kl), grad_kl_w(row.w.grad_kl);
  const Vec vfq_s(s_u.probability_factor(s_u.max, inv_t)), vfp_s(s_a.probability_factor(s_a.max, inv_t));
  for (int64_t b = 0, off = 0; off < V; ++b, off += kBlock) {
    const int64_t bend = std::min(V, off + kBlock);
    const Vec vfq_w(w_u.probability_factor(scratch.w_shift_s[b], inv_t));
    const Vec vfp_w(w_a.probability_factor(scratch.w_shift_t[b], inv_t));
    const bool mixed = scratch.block_s_count[b] != 0;
    const float *exp_s = scratch.exp_s.data(), *exp_t = scratch.exp_t.data(), *s_mask = scratch.s_mask.data();
    S* out = args.grad;
    for_each_vec(off, bend, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
      const Vec es = Vec::loadu(exp_s + i, m), et = Vec::loadu(exp_t + i, m);
      Vec grad;
      if (mixed) {
        const Vec in_s = Vec::loadu(s_mask + i, m);
        grad = cakd_grad(et * by_group(in_s, vfp_s, vfp_w), es * by_group(in_s, vfq_s, vfq_w),
                         by_group(in_s, grad_bcd_s, grad_bcd_w), by_group(in_s, grad_kl_s, grad_kl_w));
      } else {
        grad = cakd_grad(et * vfp_w, es * vfq_w, grad_bcd_w, grad_kl_w);
      }
      store_row(grad, out + i, m, args.stream_grad);
    });
  }
}

// Beyond this many classes kept out of W (ties at the k-th teacher logit), cakd_fused_row leaves
// the row to the general path.
constexpr size_t kMaxPending = 1024;

// How cakd_fused_row tells S from W as the row streams by. Each vector gives a (key, threshold)
// pair: lanes with key > threshold are candidates (kept out of W's maxima) in the first loop of a
// block and pending (kept out of W's sums; every class of the final S is among them) in the
// second; a pending class outside the final S joins W at the row's end.
//
// The top-k rule: candidates lie above the running k-th teacher logit when they arrive
// (RunningTopK takes them), pending classes at or above the k-th logit at the block's end.
struct TopKGroups {
  RunningTopK top;
  float kth_end = kNegInf;
  Vec below_kth_end{kNegInf};  // pending: t >= kth_end, i.e. t > below_kth_end

  // head: the row's first k teacher logits as floats
  TopKGroups(const float* head, int64_t k, std::vector<Ranked>& buffer) : top(head, k, buffer) {}
  KD_ALWAYS_INLINE std::pair<Vec, Vec> candidates(int64_t, const Vec& t) const { return {t, Vec(top.kth())}; }
  // the classes [i, i + n) of the teacher row; tv: their logits, widened
  template <typename T>
  void offer(const T* teacher, const Vec& tv, int64_t i, int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
      top.offer(teacher, i, n);
    } else {
      alignas(64) float lanes[kW];
      tv.store(lanes);
      top.offer_lanes(lanes, i, n);
    }
  }
  // After a block's first loop; false while fewer than k teacher logits are finite (no threshold).
  bool end_block() {
    kth_end = top.kth();
    below_kth_end = Vec(std::nextafter(kth_end, kNegInf));
    return kth_end != kNegInf;
  }
  KD_ALWAYS_INLINE std::pair<Vec, Vec> pending(int64_t, const Vec& t) const { return {t, below_kth_end}; }
  template <typename T>
  bool is_pending(const T* teacher, int64_t j) const { return static_cast<float>(teacher[j]) >= kth_end; }
  void finish(std::vector<int64_t>& out) { top.finish(out); }
};

// The label rule (DKD): S = {label}, known from the start; one lane of one vector is set apart.
struct LabelGroups {
  int64_t label;

  // 1 on the label's lane of the vector at i, 0 elsewhere; (0, +inf) for every other vector
  KD_ALWAYS_INLINE std::pair<Vec, Vec> candidates(int64_t i, const Vec&) const {
    static const std::array<float, 2 * kW> kOneHot = [] {
      std::array<float, 2 * kW> one_hot{};
      one_hot[kW] = 1.f;
      return one_hot;
    }();
    if (label < i || label >= i + kW) return {Vec(0.f), Vec(std::numeric_limits<float>::infinity())};
    return {Vec::loadu(kOneHot.data() + kW - (label - i)), Vec(0.5f)};
  }
  template <typename T>
  void offer(const T*, const Vec&, int64_t, int64_t) {}
  bool end_block() { return true; }
  KD_ALWAYS_INLINE std::pair<Vec, Vec> pending(int64_t i, const Vec& t) const { return candidates(i, t); }
  template <typename T>
  bool is_pending(const T*, int64_t j) const { return j == label; }
  void finish(std::vector<int64_t>& out) { out.push_back(label); }
};

// The top-k rule (k <= kBufferedSelection, k < V) and the label rule in one pass over the row
// from DRAM: S is told apart inside the statistics pass (Groups: TopKGroups, LabelGroups), which
// is W's (the largest group) alone, with forward KL's block sums (forward_kl_from_blocks) for WCD,
// so the gradient pass needs neither logits nor logs. Per block:
//   1. the maxima of W, over the classes that are not candidates for S; the first touch of the
//      block;
//   2. the exps at W's running maxima, kept in scratch, and W's sums over the classes that are
//      not pending (every class of the final S is pending).
// At the row's end S is known: pending classes outside S join W one by one (their exps taken at
// their block's shifts), S's statistics and SCD come from its k classes in double, and the
// gradient pass follows. Returns false, having written nothing, for rows it leaves to the general
// path (choose_s + cakd_marked_row), which then decides them from scratch: NaN / +inf logits, a
// teacher with fewer than k finite logits so far, a W class far above W's shift, ties beyond
// kMaxPending, a non-finite component.
// Out of line: inlined into the row loop (as GCC does for bf16 / fp16 rows), its loops kept
// their sums and constants on the stack, stored and reloaded at every vector.
template <class Groups, typename S, typename T>
__attribute__((noinline)) bool cakd_fused_row(const RowArgsT<S, T>& args, const CakdParams& params, Groups&& groups,
                                              CakdScratch& scratch, float* components, float* loss) {
  const int64_t V = args.vocab;
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  const float inv_t = params.inv_temperature;
  const S* z = args.student;
  const T* t = args.teacher;
  float *exp_s = (scratch.exp_s.resize(V), scratch.exp_s.data()), *exp_t = (scratch.exp_t.resize(V), scratch.exp_t.data());
  scratch.w_shift_s.resize(blocks);
  scratch.w_shift_t.resize(blocks);
  scratch.w_mass.resize(blocks);
  scratch.w_gap.resize(blocks);
  scratch.pending.clear();
  OnlineLse w_u, w_a;  // W's statistics: student, teacher
  const ExpScale at_t(inv_t);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, bend = std::min(V, off + kBlock);
    Vec max_u(kNegInf), max_a(kNegInf);
    for_each_vec(off, bend, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
      const Vec tv = load_row(t + i, m), zv = load_row(z + i, m);
      const auto [key, threshold] = groups.candidates(i, tv);
      const NotAbove w(key, threshold);
      max_a = w.max(max_a, tv);
      max_u = w.max(max_u, zv);
      if (!w.all()) groups.offer(t, tv, i, m);
    });
    const float block_a = hmax(max_a), block_u = hmax(max_u);
    if (bad_logit(block_a) || bad_logit(block_u) || !groups.end_block()) return false;
    w_a.raise_max(block_a, inv_t);
    w_u.raise_max(block_u, inv_t);
    const float shift_a = finite_shift(w_a.max), shift_u = finite_shift(w_u.max);
    scratch.w_shift_t[b] = shift_a;
    scratch.w_shift_s[b] = shift_u;
    const Vec vshift_a(shift_a), vshift_u(shift_u);
    // W's sums in double, kFold vectors at a time: WCD takes log(sum) of each side's, so their
    // rounding is an absolute error of WCD, which a float sum over the block would make ~1e-7
    DoubleSum<> sums_u, sums_a, sums_gap;
    for (int64_t c = off; c < bend; c += kFold * kW) {
      Vec acc_u(0.f), acc_a(0.f), acc_gap(0.f);
      for_each_vec(c, std::min(bend, c + kFold * kW), [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
        prefetch_block_ahead(z + i);
        prefetch_block_ahead(t + i);
        const Vec tv = load_row(t + i, m);
        const Vec du = load_row(z + i, m) - vshift_u, da = tv - vshift_a;
        // capped: exps beyond the float range come out +inf, which the checks on W's sums need
        const Vec eu = exp_scaled<true>(du, at_t), ea = exp_scaled<true>(da, at_t);
        eu.store(exp_s + i, m);
        ea.store(exp_t + i, m);
        const auto [key, threshold] = groups.pending(i, tv);
        const NotAbove w(key, threshold);
        acc_u = w.add(acc_u, eu);
        acc_a = w.add(acc_a, ea);
        acc_gap = w.add(acc_gap, kd_if_pos(ea, ea * (da - du)));
        if (!w.all())
          for (int64_t j = i; j < i + m; ++j)
            if (groups.is_pending(t, j)) scratch.pending.push_back(j);
      });
      sums_u.add_partial(acc_u);
      sums_a.add_partial(acc_a);
      sums_gap.add_partial(acc_gap);
    }
    const double sum_u = sums_u.total(), sum_a = sums_a.total(), gap = sums_gap.total();
    // NaN logits (the maxima may drop them), or a W class far above its shift
    if (!std::isfinite(sum_u) || !std::isfinite(sum_a) || !std::isfinite(gap)) return false;
    if (scratch.pending.size() > kMaxPending) return false;
    // A W whose maxima are still -inf (its classes so far all arrived as candidates) took its
    // exps at the shift 0: its running max must say so before a later block rescales its sum.
    if (w_u.empty() && sum_u > 0.0) w_u.max = shift_u;
    if (w_a.empty() && sum_a > 0.0) w_a.max = shift_a;
    w_u.sum += sum_u;
    w_a.sum += sum_a;
    scratch.w_mass[b] = sum_a;
    scratch.w_gap[b] = gap;
  }

  scratch.in_s.clear();
  groups.finish(scratch.in_s);
  std::sort(scratch.in_s.begin(), scratch.in_s.end());  // pending is in index order
  // S's statistics, exps (at S's maxima) and SCD, in double
  OnlineLse s_u, s_a;
  auto t_at = [t](int64_t j) { return static_cast<float>(t[j]); };
  auto z_at = [z](int64_t j) { return static_cast<float>(z[j]); };
  for (int64_t j : scratch.in_s) {
    if (!std::isfinite(t_at(j)) || !std::isfinite(z_at(j))) return false;
    s_a.max = std::max(s_a.max, t_at(j));
    s_u.max = std::max(s_u.max, z_at(j));
  }
  for (int64_t j : scratch.in_s) {
    const double ea = std::exp(static_cast<double>(t_at(j) - s_a.max) * inv_t);
    const double eu = std::exp(static_cast<double>(z_at(j) - s_u.max) * inv_t);
    s_a.sum += ea;
    s_u.sum += eu;
    exp_t[j] = static_cast<float>(ea);
    exp_s[j] = static_cast<float>(eu);
  }
  double scd = 0.0;
  const double log_sum_a = std::log(s_a.sum), log_sum_u = std::log(s_u.sum);
  for (int64_t j : scratch.in_s) {
    const double log_p = static_cast<double>(t_at(j) - s_a.max) * inv_t - log_sum_a;
    const double log_q = static_cast<double>(z_at(j) - s_u.max) * inv_t - log_sum_u;
    scd += std::exp(log_p) * (log_p - log_q);
  }
  // the pending classes outside S join W at their block's shifts
  auto in_s = scratch.in_s.begin();
  for (int64_t j : scratch.pending) {
    if (in_s != scratch.in_s.end() && *in_s == j) {
      ++in_s;
      continue;
    }
    const int64_t b = j / kBlock;
    const float da = t_at(j) - scratch.w_shift_t[b], du = z_at(j) - scratch.w_shift_s[b];
    const double ea = std::exp(static_cast<double>(da) * inv_t), eu = std::exp(static_cast<double>(du) * inv_t);
    if (!(ea <= 1e30) || !(eu <= 1e30)) return false;  // far above the shift (or NaN)
    exp_t[j] = static_cast<float>(ea);
    exp_s[j] = static_cast<float>(eu);
    scratch.w_mass[b] += ea;
    if (ea > 0.0) scratch.w_gap[b] += ea * (static_cast<double>(da) - du);
    // the class's exp at its block's shift, rescaled to W's running max (raised to it first, so
    // that an empty W starts from the class itself)
    w_a.raise_max(t_at(j), inv_t);
    w_u.raise_max(z_at(j), inv_t);
    if (ea > 0.0) w_a.sum += ea * std::exp(static_cast<double>(scratch.w_shift_t[b] - w_a.max) * inv_t);
    if (eu > 0.0) w_u.sum += eu * std::exp(static_cast<double>(scratch.w_shift_s[b] - w_u.max) * inv_t);
  }
  if (in_s != scratch.in_s.end()) return false;  // not every class of S was kept out of W
  if (w_a.empty() || w_u.empty()) return false;

  const double wcd = forward_kl_from_blocks(scratch.w_shift_t.data(), scratch.w_shift_s.data(), scratch.w_mass.data(),
                                            scratch.w_gap.data(), blocks, w_u, w_a, inv_t);
  const CakdRow row = cakd_row_constants(s_u, w_u, s_a, w_a, args.grad_scale, params);
  if (!std::isfinite(row.bcd) || !std::isfinite(scd) || !std::isfinite(wcd)) return false;
  components[0] = row.bcd;
  components[1] = static_cast<float>(scd);
  components[2] = static_cast<float>(wcd);
  *loss = cakd_row_loss(row, components[1], components[2], params);
  if (args.grad) {
    mark_s(V, scratch);
    cakd_grad_pass(args, row, scratch, s_u, s_a, w_u, w_a, inv_t);
    clear_s(scratch);
  }
  return true;
}

// S chosen by choose_s and the row done by cakd_marked_row, over float rows.
float cakd_general_row(const RowArgs& args, const CakdParams& params, CakdScratch& scratch, float* components,
                       int* error) {
  choose_s(args, params, scratch);
  mark_s(args.vocab, scratch);
  const float loss = cakd_marked_row(args, params, scratch, components, error);
  clear_s(scratch);
  return loss;
}

// A row in its own dtypes (S, T): bf16 / fp16 rows are read and written in place by the fused
// path (cakd_fused_row), converted vector by vector; the rows it leaves to the general path are
// widened into fp32 scratch there, and their fp32 gradient narrowed once.
template <typename S, typename T>
float cakd_row(const RowArgsT<S, T>& args, const CakdParams& params, CakdScratch& scratch, float* components,
               int* error) {
  const int64_t V = args.vocab;
  float loss;
  if (params.rule == GroupRule::kTopK && params.top_k <= kBufferedSelection && params.top_k < V) {
    const float* head = row_as_float(args.teacher, params.top_k, scratch.head);  // the first k teacher logits
    if (cakd_fused_row(args, params, TopKGroups(head, params.top_k, scratch.buffer), scratch, components, &loss))
      return loss;
  }
  if (params.rule == GroupRule::kLabel && V > 1 &&
      cakd_fused_row(args, params, LabelGroups{args.label}, scratch, components, &loss))
    return loss;
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
    return cakd_general_row(args, params, scratch, components, error);
  } else {
    RowArgs wide;
    wide.student = row_as_float(args.student, V, scratch.wide_s);
    wide.teacher = row_as_float(args.teacher, V, scratch.wide_t);
    wide.vocab = V;
    wide.label = args.label;
    wide.grad_scale = args.grad_scale;
    wide.stream_grad = false;  // per-thread scratch, narrowed below
    wide.next = args.next;
    if (args.grad) scratch.wide_g.resize(V);
    wide.grad = args.grad ? scratch.wide_g.data() : nullptr;
    loss = cakd_general_row(wide, params, scratch, components, error);
    if (args.grad) convert_row(scratch.wide_g.data(), args.grad, V);
    return loss;
  }
}

// The op (schema in csrc/ops.cpp): -> (row_loss [N], components [N, 3] = BCD, SCD, WCD, grad [N, V]
// in the student dtype or an empty tensor when !compute_grad).
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
  const CakdParams params = make_cakd_params(group_rule, top_k, static_cast<float>(mass),
                                             static_cast<float>(bcd_weight), static_cast<float>(scd_weight),
                                             static_cast<float>(wcd_weight), scd_teacher_mass, wcd_teacher_mass,
                                             static_cast<float>(temperature), scale_by_t2, ignore_index);
  const float scale = grad_scale.item<float>();

  at::Tensor row_loss = at::empty({in.rows}, in.student.options().dtype(at::kFloat));
  // Ignored rows are never visited by the row kernel: their components must start at 0.
  at::Tensor components = at::zeros({in.rows, 3}, in.student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? empty_huge_pages({in.rows, in.vocab}, in.student.options())
                                 : at::empty({0}, in.student.options());
  float* components_ptr = components.mutable_data_ptr<float>();
  run_rows</*kNativeRows=*/true>(in, ignore_index, scale, row_loss.mutable_data_ptr<float>(),
                                 compute_grad ? &grad : nullptr, [&]() {
    return [&params, components_ptr, scratch = CakdScratch{}](const auto& args, int64_t r, int* error) mutable {
      return cakd_row(args, params, scratch, components_ptr + 3 * r, error);
    };
  });
  return {row_loss, components, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) { m.impl("cakd_loss_fwd", &cakd_loss_fwd_cpu); }

}  // namespace kdkernels
