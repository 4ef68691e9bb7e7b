// Fused KD loss on CPU: one row per task, at::vec SIMD inside a row, at::parallel_for across rows.
//
// Per row (the math of csrc/include/kdkernels/divergence.h):
//   1. statistics, the only pass that reads DRAM: block-wise online max / sum-of-exp of the
//      student (at 1/T, and at T = 1 for the CE blend) and the teacher; the exps are kept in
//      per-thread scratch (L2) so no later pass needs exp; forward KL also gets its value here
//      (forward_kl_from_blocks);
//   2. the divergence value and its row constant C (divergences with kRowSum only), from L2;
//   3. the gradient dL/dz, written once in the input dtype and scaled by grad_scale.
// Rows whose labels equal ignore_index give loss 0 and gradient 0. A teacher row that is entirely
// -inf has no distribution: its KD term is 0 and its CE term stays. Non-finite teacher/student
// entries other than -inf (masking), out-of-range labels, and a student that is -inf where the
// loss needs it finite (RowError) are reported as ValueError.
#include "row_ops.h"

#include <kdkernels/divergence.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_alloc.h"
#include "op_glue.h"

namespace kdkernels {
namespace {

// Per-thread buffers reused across rows.
struct RowScratch {
  std::vector<float> exp_s, exp_t;            // [V] exp((x - running max) / T)
  std::vector<float> exp_1;                   // [V] the student's exp(z - running max), for CE at T != 1
  std::vector<float> block_max_s, block_max_t;  // [blocks] running max each block was shifted by
  std::vector<float> factor_s, factor_t, factor_1;  // [blocks] turn the stored exps into probabilities
  std::vector<double> mass_t, gap_t;            // [blocks] forward KL's block sums (stats_block)
  std::vector<float> log_shift_s, log_shift_t, log_ratio;  // [blocks] the logs' shifts and constant (kd_row)
};

// How far (in units of the exps' argument) a block's max may lie above the running max its exps
// were taken at in stats_block's one-loop form: exps up to e^64, and sums of a block of them,
// stay far inside the float range.
constexpr float kAboveShift = 64.f;

// Pass 1 over one block of both rows (read from DRAM once; the block then stays in L1): adds the
// exps at 1/T to the sums and stores them in scratch, adds the student's exps at T = 1 to `unit`
// when given (and stores them in `exp_1`), and raises both running maxima to the block's. The
// exps are taken at a shift: the running max before the block, in one loop that also finds the
// block's maxima, when both rows already have one and the block's maxima stay within kAboveShift
// of it (the usual case after the first block); otherwise at the running max raised to the
// block's, found by a max loop first. The shifts used go to *shift_s, *shift_t (probability
// factors and forward KL's block sums are taken at them).
// With kGapSums it also returns
// the block's sums E = sum e_t and G = sum e_t ((t - shift_t) - (z - shift_s)) at the block's
// shifts, from which forward KL's value follows without a per-element log (kd_row). Returns false
// (and sets the error bits) when the block holds NaN or +inf: +inf from the maxima, NaN from the
// sums (the maxima may drop a NaN lane; its exp is NaN).
template <bool kGapSums, typename S, typename T>
bool stats_block(const S* z, const T* t, int64_t n, const ExpScale& at_t, const ExpScale& at_1, OnlineLse& lse_u,
                 OnlineLse* unit, OnlineLse& lse_a,
                 float* exp_s, float* exp_t, float* exp_1, double* mass, double* gap, float* shift_s_out,
                 float* shift_t_out, int* error) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float inv_t = at_t.inv_t;
  // the block's sums and maxima, in registers through the loop (for_each_vec with a state)
  struct Sums {
    Vec s{0.f}, t{0.f}, unit{0.f}, gap{0.f}, max_s{kNegInf}, max_t{kNegInf};
  };
  // exps of the block at the given shifts into scratch and the sums; with with_maxima
  // (std::true_type) also the block's maxima
  auto exps_at_with = [&](float shift_s, float shift_t, auto with_maxima, auto with_unit) KD_ALWAYS_INLINE_LAMBDA {
    constexpr bool kMaxima = decltype(with_maxima)::value, kUnit = decltype(with_unit)::value;
    const Vec vshift_s(shift_s), vshift_t(shift_t);
    const ExpScale scale_t = at_t, scale_1 = at_1;
    Sums sums;
    for_each_vec(0, n, sums, [=](int64_t i, int64_t m, Sums& acc) KD_ALWAYS_INLINE_LAMBDA {
      prefetch_block_ahead(z + i);
      prefetch_block_ahead(t + i);
      const Vec zv = load_row(z + i, m), tv = load_row(t + i, m);
      if constexpr (kMaxima) {
        acc.max_s = max_unordered(acc.max_s, zv);
        acc.max_t = max_unordered(acc.max_t, tv);
      }
      const Vec ds = zv - vshift_s, dt = tv - vshift_t;
      const Vec es = exp_scaled(ds, scale_t), et = exp_scaled(dt, scale_t);
      es.store(exp_s + i, m);
      et.store(exp_t + i, m);
      acc.s = acc.s + es;
      acc.t = acc.t + et;
      if constexpr (kUnit) {
        const Vec e_1 = exp_scaled(ds, scale_1);
        e_1.store(exp_1 + i, m);
        acc.unit = acc.unit + e_1;
      }
      if constexpr (kGapSums) acc.gap = acc.gap + kd_if_pos(et, et * (dt - ds));
    });
    return sums;
  };
  auto exps_at = [&](float shift_s, float shift_t, auto with_maxima) KD_ALWAYS_INLINE_LAMBDA {
    return unit ? exps_at_with(shift_s, shift_t, with_maxima, std::true_type{})
                : exps_at_with(shift_s, shift_t, with_maxima, std::false_type{});
  };
  Sums sums;
  Vec max_s(kNegInf), max_t(kNegInf);
  bool one_loop = false;
  if (!lse_u.empty() && !lse_a.empty()) {
    sums = exps_at(lse_u.max, lse_a.max, std::true_type{});
    max_s = sums.max_s;
    max_t = sums.max_t;
    const float block_s = hmax(max_s), block_t = hmax(max_t);
    // the student's exps at T = 1 too, when the CE term keeps them
    const float scale_s = unit ? std::max(inv_t, 1.f) : inv_t;
    one_loop = bad_logit(block_s) || bad_logit(block_t) ||
               ((block_s - lse_u.max) * scale_s <= kAboveShift && (block_t - lse_a.max) * inv_t <= kAboveShift);
  } else {
    for_each_vec(0, n, [&](int64_t i, int64_t m) KD_ALWAYS_INLINE_LAMBDA {
      max_s = max_unordered(max_s, load_row(z + i, m));
      max_t = max_unordered(max_t, load_row(t + i, m));
    });
  }
  const float block_s = hmax(max_s), block_t = hmax(max_t);
  if (bad_logit(block_s)) *error |= kBadStudent;
  if (bad_logit(block_t)) *error |= kBadTeacher;
  if (bad_logit(block_s) || bad_logit(block_t)) return false;
  if (!one_loop) {
    lse_u.raise_max(block_s, inv_t);
    if (unit) unit->raise_max(block_s, 1.f);
    lse_a.raise_max(block_t, inv_t);
    // An empty stream (every logit so far -inf) shifts by +inf: its exps come out exactly 0.
    sums = exps_at(lse_u.empty() ? kInf : lse_u.max, lse_a.empty() ? kInf : lse_a.max, std::false_type{});
  }
  *shift_s_out = lse_u.max;
  *shift_t_out = lse_a.max;
  const float block_mass = hsum(sums.t), block_sum_s = hsum(sums.s);
  // A NaN logit the maxima dropped still makes its exp, and so the block's sum, NaN.
  if (std::isnan(block_sum_s)) *error |= kBadStudent;
  if (std::isnan(block_mass)) *error |= kBadTeacher;
  if (std::isnan(block_sum_s) || std::isnan(block_mass)) return false;
  lse_u.sum += block_sum_s;
  lse_a.sum += block_mass;
  if (unit) unit->sum += hsum(sums.unit);
  if (one_loop) {  // the sums were taken at the shifts: now raise the maxima to the block's
    lse_u.raise_max(block_s, inv_t);
    if (unit) unit->raise_max(block_s, 1.f);
    lse_a.raise_max(block_t, inv_t);
  }
  if constexpr (kGapSums) {
    *mass = block_mass;
    *gap = hsum(sums.gap);
  }
  return true;
}

// CE = lse(z) - z_y = (max - z_y) + log sum exp(z - max), from the student's statistics at T = 1.
double cross_entropy(const OnlineLse& lse_z, float z_label) {
  return static_cast<double>(lse_z.max - z_label) + std::log(lse_z.sum);
}

// Stores the gradient vector g of the row's entries [i, i + n), with the CE term's -label_term
// added on the label's entry when it lies there (so that entry is rounded once, like the rest).
template <typename S, typename T>
KD_ALWAYS_INLINE void store_grad_vector(const RowArgsT<S, T>& args, int64_t i, int64_t n, Vec g, bool use_ce, float label_term) {
  if (use_ce && args.label >= i && args.label < i + n) g = minus_on_lane(g, args.label - i, label_term);
  store_row(g, args.grad + i, n, args.stream_grad);
}

// A row whose teacher is entirely -inf has no teacher distribution, so no KD term: its loss is
// the CE term ce_weight (lse(z) - z_y) with gradient ce_weight (softmax(z) - e_y) when the row
// has one, else 0 and 0. lse_z: the student's statistics at T = 1.
template <typename S, typename T>
float ce_only_row(const RowArgsT<S, T>& args, const KDParams& params, const OnlineLse& lse_z, float z_label,
                  bool use_ce) {
  const int64_t V = args.vocab;
  if (!use_ce) {
    if (args.grad) std::fill(args.grad, args.grad + V, S(0));
    return 0.f;
  }
  if (args.grad) {
    const float coef = params.ce_weight * args.grad_scale;
    const Vec v_coef(coef), v_max(lse_z.max), v_log_sum(static_cast<float>(std::log(lse_z.sum)));
    for (int64_t i = 0; i < V; i += kW) {
      const int64_t n = std::min(kW, V - i);
      const Vec g = v_coef * exp_nonpositive(load_row(args.student + i, n) - v_max - v_log_sum);
      store_grad_vector(args, i, n, g, true, coef);
    }
  }
  return static_cast<float>(params.ce_weight * cross_entropy(lse_z, z_label));
}

// Returns the row loss; writes the gradient when args.grad != nullptr. The rows are read in their
// own dtypes (S, T) and converted vector by vector; all arithmetic is fp32.
template <class Div, typename S, typename T>
float kd_row(const RowArgsT<S, T>& args, const KDParams& params, RowScratch& scratch, int* error) {
  const int64_t V = args.vocab;
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  const float inv_t = params.inv_temperature;
  const bool use_ce = params.ce_weight != 0.f && args.label != params.ignore_index;
  const bool ce_separate = use_ce && !params.ce_reuses_q;

  // Pass 1 (reads DRAM): statistics of u = z / T, of z at T = 1 for the CE term when it cannot
  // reuse q, and of a = t / T; the exps at 1/T kept in scratch.
  scratch.exp_s.resize(V);
  scratch.exp_t.resize(V);
  scratch.block_max_s.resize(blocks);
  scratch.block_max_t.resize(blocks);
  constexpr bool kGapSums = std::is_same_v<Div, ForwardKL>;
  if constexpr (kGapSums) {
    scratch.mass_t.resize(blocks);
    scratch.gap_t.resize(blocks);
  }
  OnlineLse lse_u, lse_z, lse_a;
  OnlineLse* const ce_lse = ce_separate ? &lse_z : nullptr;
  if (ce_separate) scratch.exp_1.resize(V);
  bool bad = false;
  const ExpScale at_t(inv_t), at_1(1.f);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, n = std::min(kBlock, V - off);
    bad |= !stats_block<kGapSums>(args.student + off, args.teacher + off, n, at_t, at_1, lse_u, ce_lse, lse_a,
                                  scratch.exp_s.data() + off, scratch.exp_t.data() + off,
                                  ce_separate ? scratch.exp_1.data() + off : nullptr,
                                  kGapSums ? scratch.mass_t.data() + b : nullptr,
                                  kGapSums ? scratch.gap_t.data() + b : nullptr, &scratch.block_max_s[b],
                                  &scratch.block_max_t[b], error);
  }
  // A student row that is entirely -inf has no distribution: the loss is undefined unless the
  // teacher row is masked too and there is no CE term (a fully masked row).
  if (lse_u.empty() && (use_ce || !lse_a.empty())) *error |= kStudentMassOnNegInf;
  if (bad || lse_u.empty()) {
    if (args.grad) std::fill(args.grad, args.grad + V, S(0));
    return 0.f;
  }
  // z_y is read before the gradient passes: in the in-place op the gradient overwrites the row.
  const float z_label = use_ce ? static_cast<float>(args.student[args.label]) : 0.f;
  if (use_ce && z_label == kNegInf) *error |= kStudentMassOnNegInf;  // CE = +inf
  if (lse_a.empty()) return ce_only_row(args, params, ce_separate ? lse_z : lse_u, z_label, use_ce);
  scratch.factor_s.resize(blocks);
  scratch.factor_t.resize(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    scratch.factor_s[b] = lse_u.probability_factor(scratch.block_max_s[b], inv_t);
    scratch.factor_t[b] = lse_a.probability_factor(scratch.block_max_t[b], inv_t);
  }

  // softmax(z) at T = 1 for the CE blend: q itself when T = 1, else the stored exps at T = 1
  // times their block's factor
  if (ce_separate) {
    scratch.factor_1.resize(blocks);
    for (int64_t b = 0; b < blocks; ++b) scratch.factor_1[b] = lse_z.probability_factor(scratch.block_max_s[b], 1.f);
  }

  // The loops below capture by value and carry their sums in a state (for_each_vec with a state),
  // so nothing they read is reloaded around their stores: the row, the scratch pointers and the
  // constants are locals here.
  const RowArgsT<S, T> row = args;
  const Mixture mix = params.mix;
  const float* const exp_s = scratch.exp_s.data();
  float* const exp_t = scratch.exp_t.data();  // pass 2 may keep kCachedGrad's quantity here
  const float* const exp_1 = ce_separate ? scratch.exp_1.data() : nullptr;
  const float *const factor_s = scratch.factor_s.data(), *const factor_t = scratch.factor_t.data();
  const float* const factor_1 = ce_separate ? scratch.factor_1.data() : nullptr;
  // The divergences read the logs only as log p - log q (divergence.h), and must read it as the
  // log of the ratio of the very floats p and q they get: the mixture divergences combine the two
  // (JSD takes log(m / q) from p and q, log(m / p) from it and log p - log q), and a difference
  // of a few ulps between them is an error of that size in every element's term, which does not
  // cancel over the row: at a high temperature JSD is ~1e-4 and such an error its 1e-3 part.
  // So per block b, with the shifts its exps were taken at and its probability factors f:
  // logq = (z - shift_s) / T, logp = (t - shift_t) / T + K_b, K_b = log(f_t) - log(f_s) of the
  // float factors, in double, rounded once (a small number when the rows are alike). A factor
  // that underflowed (a block far below the row's max) takes the row's form instead: shifts at
  // the maxima, K = log(sum_s) - log(sum_t).
  const Vec v_inv_t(inv_t);
  scratch.log_shift_s.resize(blocks);
  scratch.log_shift_t.resize(blocks);
  scratch.log_ratio.resize(blocks);
  {
    const double row_ratio = std::log(lse_u.sum) - std::log(lse_a.sum);
    constexpr float kMinNormal = std::numeric_limits<float>::min();
    for (int64_t b = 0; b < blocks; ++b) {
      const float f_s = scratch.factor_s[b], f_t = scratch.factor_t[b];
      const bool own = f_s >= kMinNormal && f_t >= kMinNormal && std::isfinite(f_s) && std::isfinite(f_t);
      scratch.log_shift_s[b] = own ? scratch.block_max_s[b] : lse_u.max;
      scratch.log_shift_t[b] = own ? scratch.block_max_t[b] : lse_a.max;
      scratch.log_ratio[b] = static_cast<float>(own ? std::log(static_cast<double>(f_t)) - std::log(static_cast<double>(f_s))
                                                    : row_ratio);
    }
  }
  const float *const log_shift_s = scratch.log_shift_s.data(), *const log_shift_t = scratch.log_shift_t.data();
  const float* const log_ratio = scratch.log_ratio.data();
  // Visits every vector of the row (from L2), block by block, with the factors that turn the block's
  // stored exps into q and p: body(i, n, fq, fp, state).
  auto for_each_block_vector = [&](auto& state, const auto& body) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t off = b * kBlock, bend = std::min(V, off + kBlock);
      const Vec fq(factor_s[b]), fp(factor_t[b]);
      for_each_vec(off, bend, state, [=](int64_t i, int64_t n, auto& st) KD_ALWAYS_INLINE_LAMBDA {
        body(i, n, fq, fp, st);
      });
    }
  };
  // The same with the student logit z and the probabilities p and q: body(i, n, z, p, q, state).
  auto for_each_vector = [&](auto& state, const auto& body) {
    for_each_block_vector(state, [=](int64_t i, int64_t n, const Vec& fq, const Vec& fp, auto& st) KD_ALWAYS_INLINE_LAMBDA {
      const Vec z = load_row(row.student + i, n);
      const Vec q = Vec::loadu(exp_s + i, n) * fq;
      const Vec p = Vec::loadu(exp_t + i, n) * fp;
      body(i, n, z, p, q, st);
    });
  };
  auto logs = [=](int64_t i, int64_t n, const Vec& z, Vec& logp, Vec& logq) KD_ALWAYS_INLINE_LAMBDA {
    const int64_t b = i / kBlock;
    logq = (z - Vec(log_shift_s[b])) * v_inv_t;
    logp = at::vec::fmadd(load_row(row.teacher + i, n) - Vec(log_shift_t[b]), v_inv_t, Vec(log_ratio[b]));
  };

  // Pass 2: the divergence value and its row constant C (kRowSum divergences). kCachedGrad
  // divergences keep their gradient's per-element quantity in place of the teacher's exps,
  // which pass 3 then no longer needs.
  const bool write_grad = args.grad != nullptr;
  // one fold per block, as a block's vectors stream through the loops below
  struct RowSums {
    DoubleSum<kBlock / kW> divergence, c, c2;
  };
  RowSums sums;
  float row_c = 0.f, row_c2 = 0.f;
  if constexpr (Div::kRowSum) {
    for_each_vector(sums, [=](int64_t i, int64_t n, const Vec& z, const Vec& p, const Vec& q, RowSums& acc)
                              KD_ALWAYS_INLINE_LAMBDA {
      Vec logp, logq, loss, c;
      logs(i, n, z, logp, logq);
      if constexpr (kCachedGrad<Div>) {
        Vec cached;
        Div::terms(logp, logq, p, q, mix, loss, c, cached);
        if (write_grad) cached.store(exp_t + i, n);
      } else {
        Div::terms(logp, logq, p, q, mix, loss, c);
      }
      acc.divergence.add(loss);
      acc.c.add(c);
      if constexpr (kSecondRowSum<Div>) acc.c2.add(Div::second_term(p, q, mix));
    });
    row_c = static_cast<float>(sums.c.total());
    row_c2 = static_cast<float>(sums.c2.total());
  }

  // Pass 3: the gradient dL/dz = kd_coef * dD/du + ce_weight * (softmax(z) - e_y), times the
  // reduction factor; divergences without a row constant add up their value here.
  const float scale = args.grad_scale;
  const Vec v_kd(params.kd_coef * scale), v_ce(params.ce_weight * scale);
  const float label_term = params.ce_weight * scale;
  auto store_grad = [=](int64_t i, int64_t n, const Vec& g) KD_ALWAYS_INLINE_LAMBDA {
    store_grad_vector(row, i, n, g, use_ce, label_term);
  };
  auto ce_softmax = [=](int64_t i, int64_t n, const Vec& q) KD_ALWAYS_INLINE_LAMBDA {
    return ce_separate ? Vec::loadu(exp_1 + i, n) * Vec(factor_1[i / kBlock]) : q;
  };
  NoState none;
  if constexpr (kGapSums) {
    // Forward KL's value came from pass 1: its gradient q - p needs the two exps only.
    if (write_grad) for_each_block_vector(none, [=](int64_t i, int64_t n, const Vec& fq, const Vec& fp, NoState&)
                                                    KD_ALWAYS_INLINE_LAMBDA {
      const Vec q = Vec::loadu(exp_s + i, n) * fq;
      const Vec p = Vec::loadu(exp_t + i, n) * fp;
      Vec g = v_kd * Div::grad(q, q, p, q, mix, 0.f);
      if (use_ce) g = g + v_ce * ce_softmax(i, n, q);
      store_grad(i, n, g);
    });
  } else if constexpr (kCachedGrad<Div>) {
    // From L2: q and the cached quantity only, no logs or mixtures recomputed (the value and C
    // came from pass 2, so without a gradient there is nothing left to do).
    if (write_grad) for_each_block_vector(none, [=](int64_t i, int64_t n, const Vec& fq, const Vec&, NoState&)
                                                    KD_ALWAYS_INLINE_LAMBDA {
      const Vec q = Vec::loadu(exp_s + i, n) * fq;
      Vec g = v_kd * Div::grad_cached(q, Vec::loadu(exp_t + i, n), mix, row_c);
      if (use_ce) g = g + v_ce * ce_softmax(i, n, q);
      store_grad(i, n, g);
    });
  } else if (write_grad || !Div::kRowSum) {
    for_each_vector(sums, [=](int64_t i, int64_t n, const Vec& z, const Vec& p, const Vec& q, RowSums& acc)
                              KD_ALWAYS_INLINE_LAMBDA {
      Vec logp, logq;
      if constexpr (!Div::kRowSum) {
        Vec loss, c;
        logs(i, n, z, logp, logq);
        Div::terms(logp, logq, p, q, mix, loss, c);
        acc.divergence.add(loss);
      }
      if (!write_grad) return;
      if constexpr (Div::kRowSum) logs(i, n, z, logp, logq);
      Vec g = v_kd * divergence_grad<Div>(logp, logq, p, q, mix, row_c, row_c2);
      if (use_ce) g = g + v_ce * ce_softmax(i, n, q);
      store_grad(i, n, g);
    });
  }
  const double kd = kGapSums ? forward_kl_from_blocks(scratch.block_max_t.data(), scratch.block_max_s.data(),
                                                     scratch.mass_t.data(), scratch.gap_t.data(), blocks, lse_u,
                                                     lse_a, inv_t)
                             : sums.divergence.total();
  // forward KL is +inf only where the teacher has mass on a student -inf entry
  if constexpr (std::is_same_v<Div, ForwardKL>)
    if (!std::isfinite(kd)) *error |= kStudentMassOnNegInf;
  // reverse KL is +inf only where the student has mass on a teacher -inf entry
  if constexpr (std::is_same_v<Div, ReverseKL>)
    if (!std::isfinite(kd)) *error |= kTeacherNegInfUnderStudent;
  double loss = params.kd_scale * kd;
  if (use_ce) loss += params.ce_weight * cross_entropy(ce_separate ? lse_z : lse_u, z_label);
  return static_cast<float>(loss);
}

// The row function of both kd_loss ops (csrc/op_glue.h). Each row is read before its gradient is
// written over it (every pass works row by row, the label's logit is read first), so the student
// logits' own storage can hold the gradient: no [N, V] allocation and no first-touch page faults
// for callers that reuse a logits buffer.
std::tuple<at::Tensor, at::Tensor> kd_rows_cpu(const KdLossTensors& tensors, const KDParams& params, GradInto into) {
  const RowInputs in = row_inputs(tensors.student, tensors.teacher, tensors.labels);
  at::Tensor grad;
  if (into == GradInto::kNew) grad = empty_huge_pages({in.rows, in.vocab}, in.student.options());
  if (into == GradInto::kStudent) grad = tensors.student;
  const float scale = tensors.grad_scale.item<float>();
  at::Tensor row_loss = at::empty({in.rows}, in.student.options().dtype(at::kFloat));
  run_rows</*kNativeRows=*/true>(in, params.ignore_index, scale, row_loss.mutable_data_ptr<float>(),
                                 grad.defined() ? &grad : nullptr, [&]() {
    return [&params, scratch = RowScratch{}](const auto& args, int64_t, int* error) mutable {
      float loss = 0.f;
      dispatch_divergence(params.divergence, [&](auto tag) { loss = kd_row<decltype(tag)>(args, params, scratch, error); });
      return loss;
    };
  });
  return {row_loss, grad};
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) { impl_kd_loss_ops<&kd_rows_cpu>(m); }

}  // namespace
}  // namespace kdkernels
