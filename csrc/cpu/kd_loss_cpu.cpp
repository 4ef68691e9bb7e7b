// Fused KD loss on CPU: one row per task, at::vec SIMD inside a row, at::parallel_for across rows.
//
// Per row (DESIGN.md §3):
//   1. statistics, the only pass that reads DRAM: block-wise online max / sum-of-exp of the
//      student (at 1/T, and at T = 1 for the CE blend) and the teacher; the exps are kept in
//      per-thread scratch (L2) so no later pass needs exp; forward KL also gets its value here;
//   2. the divergence value and its row constant C (divergences with kRowSum only), from L2;
//   3. the gradient dL/dz, written once in the input dtype and scaled by grad_scale.
// Rows whose labels equal ignore_index give loss 0 and gradient 0. Non-finite teacher/student
// entries other than -inf (masking) and out-of-range labels are reported as ValueError.
#include "row_ops.h"

#include <kdkernels/divergence.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_alloc.h"

namespace kdkernels {
namespace {

// Per-thread buffers reused across rows.
struct RowScratch {
  std::vector<float> exp_s, exp_t;            // [V] exp((x - running max) / T)
  std::vector<float> block_max_s, block_max_t;  // [blocks] running max each block was shifted by
  std::vector<float> factor_s, factor_t;        // [blocks] turns the stored exps into probabilities
};

// Online softmax statistics of one row at scale 1/T (and at scale 1 for the CE blend), filled
// block by block: each block's max is found in L1, the running sums are rescaled when the max
// grows, and exp((x - running max) / T) is stored so later passes need no exp.
struct OnlineSoftmax {
  float max = kNegInf;
  double sum_t = 0.0;  // sum exp((x - max) / T)
  double sum_1 = 0.0;  // sum exp(x - max)
  bool bad = false;    // NaN or +inf seen

  // Moves the running max to the block's max if larger; returns false for a bad block.
  bool advance(const float* x, int64_t n, float inv_t) {
    const float bmax = block_max(x, n);
    if (std::isnan(bmax) || bmax == std::numeric_limits<float>::infinity()) {
      bad = true;
      return false;
    }
    if (bmax > max) {
      const double shrink = std::exp(static_cast<double>(max - bmax) * inv_t);
      sum_t *= shrink;
      sum_1 *= std::exp(static_cast<double>(max - bmax));
      max = bmax;
    }
    return true;
  }

  // Stores e = exp((x - max) / T) for the block into `out` and adds it to the sums.
  void accumulate(const float* x, int64_t n, float inv_t, bool want_unit, float* out) {
    if (max == kNegInf) {  // everything so far masked
      std::fill(out, out + n, 0.f);
      return;
    }
    const Vec vmax(max), vinv(inv_t);
    Vec acc(0.f), acc_1(0.f);
    for (int64_t i = 0; i < n; i += kW) {
      const int64_t m = std::min(kW, n - i);
      const Vec xv = load_masked(x + i, m);
      const Vec e = exp_nonpositive((xv - vmax) * vinv);
      e.store(out + i, m);
      acc = acc + e;
      if (want_unit) acc_1 = acc_1 + exp_nonpositive(xv - vmax);
    }
    sum_t += hsum(acc);
    if (want_unit) sum_1 += hsum(acc_1);
  }

  bool empty() const { return max == kNegInf; }
  // log-softmax is formed as (x - max) / T - log(sum): the shifted logit is exact and the
  // normaliser stays small, which keeps precision when all logits are large.
  float log_sum_t() const { return static_cast<float>(std::log(sum_t)); }
  float log_sum_1() const { return static_cast<float>(std::log(sum_1)); }

  // factor[b] * exp_stored = probability, for every block.
  void probability_factors(const std::vector<float>& block_max, float inv_t,
                           std::vector<float>& factor) const {
    factor.resize(block_max.size());
    for (size_t b = 0; b < block_max.size(); ++b)
      factor[b] = block_max[b] == kNegInf
                      ? 0.f
                      : static_cast<float>(std::exp(static_cast<double>(block_max[b] - max) * inv_t) / sum_t);
  }
};

// Divergences that carry a second row constant for precision (see SkewKL).
template <class Div, class = void>
constexpr bool kSecondRowSum = false;
template <class Div>
constexpr bool kSecondRowSum<Div, std::void_t<decltype(Div::kSecondRowSum)>> = Div::kSecondRowSum;

// Divergences whose gradient comes from a per-element quantity kept by pass 2 (see divergence.h).
template <class Div, class = void>
constexpr bool kCachedGrad = false;
template <class Div>
constexpr bool kCachedGrad<Div, std::void_t<decltype(Div::kCachedGrad)>> = Div::kCachedGrad;

// Returns the row loss; writes the gradient when args.grad != nullptr.
template <class Div>
float kd_row(const RowArgs& args, const KDParams& prm, RowScratch& scratch, int* error) {
  const int64_t V = args.vocab;
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  const float inv_t = prm.inv_temperature;
  const bool use_ce = prm.ce_weight != 0.f && args.label != prm.ignore_index;
  const bool ce_separate = use_ce && inv_t != 1.f;

  // Pass 1 (reads DRAM): statistics, and the exps kept in scratch.
  scratch.exp_s.resize(V);
  scratch.exp_t.resize(V);
  scratch.block_max_s.resize(blocks);
  scratch.block_max_t.resize(blocks);
  OnlineSoftmax st, tt;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, n = std::min(kBlock, V - off);
    if (st.advance(args.student + off, n, inv_t))
      st.accumulate(args.student + off, n, inv_t, ce_separate, scratch.exp_s.data() + off);
    if (tt.advance(args.teacher + off, n, inv_t))
      tt.accumulate(args.teacher + off, n, inv_t, false, scratch.exp_t.data() + off);
    scratch.block_max_s[b] = st.max;
    scratch.block_max_t[b] = tt.max;
  }
  if (tt.bad) *error |= kBadTeacher;
  if (st.bad) *error |= kBadStudent;
  if (st.bad || tt.bad || st.empty() || tt.empty()) {
    if (args.grad) std::fill(args.grad, args.grad + V, 0.f);
    return 0.f;
  }
  st.probability_factors(scratch.block_max_s, inv_t, scratch.factor_s);
  tt.probability_factors(scratch.block_max_t, inv_t, scratch.factor_t);

  // Visits every vector of the row (from L2) with the tempered student logit z, the teacher
  // and student log-probabilities and probabilities.
  const Vec v_inv_t(inv_t), v_max_s(st.max), v_max_t(tt.max);
  const Vec v_log_sum_s(st.log_sum_t()), v_log_sum_t(tt.log_sum_t());
  auto for_each_vector = [&](auto&& body) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t off = b * kBlock, bend = std::min(V, off + kBlock);
      const Vec fq(scratch.factor_s[b]), fp(scratch.factor_t[b]);
      for (int64_t i = off; i < bend; i += kW) {
        const int64_t n = std::min(kW, bend - i);
        const Vec z = load_masked(args.student + i, n);
        const Vec q = Vec::loadu(scratch.exp_s.data() + i, n) * fq;
        const Vec p = Vec::loadu(scratch.exp_t.data() + i, n) * fp;
        body(i, n, z, p, q);
      }
    }
  };
  auto logs = [&](int64_t i, int64_t n, const Vec& z, Vec& logp, Vec& logq) {
    logq = (z - v_max_s) * v_inv_t - v_log_sum_s;
    logp = (load_masked(args.teacher + i, n) - v_max_t) * v_inv_t - v_log_sum_t;
  };

  // Sums vector partials in fp32 and folds them into double once per block, for accuracy.
  struct RowSum {
    Vec partial = Vec(0.f);
    double total = 0.0;
    int64_t count = 0;
    void add(const Vec& v) {
      partial = partial + v;
      if (++count == kBlock / kW) flush();
    }
    void flush() {
      total += hsum(partial);
      partial = Vec(0.f);
      count = 0;
    }
    double value() {
      flush();
      return total;
    }
  };

  // Pass 2: the divergence value and its row constant C (kRowSum divergences). kCachedGrad
  // divergences keep their gradient's per-element quantity in place of the teacher's exps,
  // which pass 3 then no longer needs.
  const bool write_grad = args.grad != nullptr;
  RowSum divergence, row_c_sum, row_c2_sum;
  float row_c = 0.f, row_c2 = 0.f;
  if constexpr (Div::kRowSum) {
    for_each_vector([&](int64_t i, int64_t n, const Vec& z, const Vec& p, const Vec& q) {
      Vec logp, logq, loss, c;
      logs(i, n, z, logp, logq);
      if constexpr (kCachedGrad<Div>) {
        Vec cached;
        Div::terms(logp, logq, p, q, prm.mix, loss, c, cached);
        if (write_grad) cached.store(scratch.exp_t.data() + i, n);
      } else {
        Div::terms(logp, logq, p, q, prm.mix, loss, c);
      }
      divergence.add(loss);
      row_c_sum.add(c);
      if constexpr (kSecondRowSum<Div>) row_c2_sum.add(Div::second_term(p, q, prm.mix));
    });
    row_c = static_cast<float>(row_c_sum.value());
    row_c2 = static_cast<float>(row_c2_sum.value());
  }

  // Pass 3: the gradient dL/dz = kd_coef * dD/du + ce_weight * (softmax(z) - e_y), times the
  // reduction factor; divergences without a row constant add up their value here.
  // z_y is read before pass 3: in the in-place op the gradient overwrites the student row.
  const float z_label = use_ce ? args.student[args.label] : 0.f;
  const float scale = args.grad_scale;
  const Vec v_kd(prm.kd_coef * scale), v_ce(prm.ce_weight * scale);
  const Vec v_log_sum_1(ce_separate ? st.log_sum_1() : 0.f);
  auto store_grad = [&](int64_t i, int64_t n, const Vec& g) {
    if (n == kW && args.stream_grad) {
      store_streaming(g, args.grad + i);
    } else {
      g.store(args.grad + i, n);
    }
  };
  // softmax(z) at T = 1 for the CE blend: q itself when T = 1
  auto ce_softmax = [&](int64_t i, int64_t n, const Vec& q) {
    return ce_separate ? exp_nonpositive(load_masked(args.student + i, n) - v_max_s - v_log_sum_1) : q;
  };
  if constexpr (kCachedGrad<Div>) {
    // From L2: q and the cached quantity only, no logs or mixtures recomputed (the value and C
    // came from pass 2, so without a gradient there is nothing left to do).
    for (int64_t b = 0; write_grad && b < blocks; ++b) {
      const int64_t off = b * kBlock, bend = std::min(V, off + kBlock);
      const Vec fq(scratch.factor_s[b]);
      for (int64_t i = off; i < bend; i += kW) {
        const int64_t n = std::min(kW, bend - i);
        const Vec q = Vec::loadu(scratch.exp_s.data() + i, n) * fq;
        Vec g = v_kd * Div::grad_cached(q, Vec::loadu(scratch.exp_t.data() + i, n), prm.mix, row_c);
        if (use_ce) g = g + v_ce * ce_softmax(i, n, q);
        store_grad(i, n, g);
      }
    }
  } else if (write_grad || !Div::kRowSum) {
    for_each_vector([&](int64_t i, int64_t n, const Vec& z, const Vec& p, const Vec& q) {
      Vec logp, logq;
      if constexpr (!Div::kRowSum) {
        Vec loss, c;
        logs(i, n, z, logp, logq);
        Div::terms(logp, logq, p, q, prm.mix, loss, c);
        divergence.add(loss);
      }
      if (!write_grad) return;
      if constexpr (Div::kRowSum) logs(i, n, z, logp, logq);
      Vec g;
      if constexpr (kSecondRowSum<Div>) {
        g = v_kd * Div::grad2(logp, logq, p, q, prm.mix, row_c, row_c2);
      } else {
        g = v_kd * Div::grad(logp, logq, p, q, prm.mix, row_c);
      }
      if (use_ce) g = g + v_ce * ce_softmax(i, n, q);
      store_grad(i, n, g);
    });
  }
  if (write_grad && use_ce) {
    stream_fence();
    args.grad[args.label] -= prm.ce_weight * scale;
  }

  double loss = prm.kd_scale * divergence.value();
  if (use_ce) {  // CE = lse(z) - z_y = (max - z_y) + log sum exp(z - max)
    const double log_sum = std::log(ce_separate ? st.sum_1 : st.sum_t);
    loss += prm.ce_weight * (static_cast<double>(st.max - z_label) + log_sum);
  }
  return static_cast<float>(loss);
}

using RowFn = float (*)(const RowArgs&, const KDParams&, RowScratch&, int*);

RowFn row_kernel_for(Divergence div) {
  RowFn fn = nullptr;
  dispatch_divergence(div, [&](auto tag) { fn = &kd_row<decltype(tag)>; });
  return fn;
}

// The forward of both ops: row losses, and the gradient into `grad` when it is given.
at::Tensor kd_rows_cpu(const RowInputs& in, at::Tensor* grad, const at::Tensor& grad_scale,
                       int64_t divergence, double temperature, double beta, double kd_weight,
                       double ce_weight, bool scale_by_t2, int64_t ignore_index) {
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= static_cast<int64_t>(Divergence::kTVD),
                    "unknown divergence id ", divergence);
  const KDParams prm = make_kd_params(divergence, static_cast<float>(temperature),
                                      static_cast<float>(beta), static_cast<float>(kd_weight),
                                      static_cast<float>(ce_weight), scale_by_t2, ignore_index);
  const float scale = grad_scale.item<float>();
  at::Tensor row_loss = at::empty({in.rows}, in.student.options().dtype(at::kFloat));
  const RowFn row_fn = row_kernel_for(prm.divergence);
  run_rows(in, ignore_index, scale, row_loss.mutable_data_ptr<float>(), grad, [&]() {
    return [&prm, row_fn, scratch = RowScratch{}](const RowArgs& args, int64_t, int* error) mutable {
      return row_fn(args, prm, scratch, error);
    };
  });
  return row_loss;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t divergence,
    double temperature, double beta, double kd_weight, double ce_weight, bool scale_by_t2,
    int64_t ignore_index, bool compute_grad) {
  const RowInputs in = row_inputs(student_logits, teacher_logits, labels);
  at::Tensor grad = compute_grad ? empty_huge_pages({in.rows, in.vocab}, in.student.options())
                                 : at::empty({0}, in.student.options());
  at::Tensor row_loss = kd_rows_cpu(in, compute_grad ? &grad : nullptr, grad_scale, divergence, temperature,
                                    beta, kd_weight, ce_weight, scale_by_t2, ignore_index);
  return {row_loss, grad};
}

// Each row is read before its gradient is written over it (every pass works row by row, the
// label's logit is read first), so the student logits' own storage can hold the gradient: no
// [N, V] allocation and no first-touch page faults for callers that reuse a logits buffer.
at::Tensor kd_loss_fwd_inplace_cpu(
    at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, int64_t divergence, double temperature, double beta, double kd_weight,
    double ce_weight, bool scale_by_t2, int64_t ignore_index) {
  TORCH_CHECK_VALUE(student_logits.is_contiguous(), "student_logits must be contiguous to take the gradient in place");
  const RowInputs in = row_inputs(student_logits, teacher_logits, labels);
  at::Tensor grad = student_logits;
  return kd_rows_cpu(in, &grad, grad_scale, divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2,
                     ignore_index);
}

}  // namespace kdkernels
