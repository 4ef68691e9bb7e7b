// Divergence terms and their gradients: the one definition shared by the CPU and CUDA kernels.
//
// Notation: u = z_s / T, a = z_t / T, q = softmax(u), p = softmax(a).
// Every function takes the per-element log-probabilities and probabilities
//   logp = a_i - lse(a),  logq = u_i - lse(u),  p = exp(logp),  q = exp(logq)
// which may be -inf / 0 for masked vocabulary entries, and returns values in which a zero
// probability contributes exactly 0 (0 * log 0 = 0), never NaN.
//
// Each divergence D provides
//   kRowSum                : true when the gradient needs a per-row constant C = sum_i c_i
//                            computed in a pass of its own before the gradient pass;
//   terms(..., loss, c)    : the per-element loss term and the element's share c_i of C;
//   grad(..., C)           : dD/du_i (the derivative with respect to the tempered student logit).
// Divergences with kCachedGrad also give, from the same terms call, the per-element quantity x_i
// their gradient needs besides q and C (`cached`, 0 where q = 0), and
//   grad_cached(q, x, C)   : the same dD/du_i from it,
// so a kernel that keeps x_i from the row-constant pass (the CPU kernel stores it in its L2
// scratch) computes the gradient without the logs and mixtures a second time.
// Divergences with kSecondRowSum (skew KL) give second_term, the share of a second row constant
// C2, and grad2(..., C, C2) instead of grad; kernels call divergence_grad, which picks the one.
// The kernels sum `loss` over the row for the divergence value. Everything is written for a
// generic arithmetic type F: `float` (scalar CPU and CUDA code) or `at::vec::Vectorized<float>`
// (CPU SIMD); the elementary functions below are overloaded for each.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

namespace kdkernels {

enum class Divergence : int64_t {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
};

// ---- scalar elementary functions -------------------------------------------------------------
KD_HD float kd_exp(float x) { return ::expf(x); }
KD_HD float kd_log(float x) { return ::logf(x); }
KD_HD float kd_min(float a, float b) { return a < b ? a : b; }
// min(1 / x, 1e30) for x >= 0, to about 1 ulp (the SIMD version refines a hardware estimate): a
// denormal or zero x gives a large finite factor on terms that are themselves ~0 there, not
// inf * 0 = NaN.
KD_HD float kd_inverse_capped(float x) { return kd_min(1.f / x, 1e30f); }
KD_HD float kd_abs(float x) { return ::fabsf(x); }
// a > b ? x : y
KD_HD float kd_where_gt(float a, float b, float x, float y) { return a > b ? x : y; }
KD_HD float kd_splat(float v, float) { return v; }

// p > 0 ? value : 0 ; guards 0 * inf and 0 * NaN from masked entries.
template <class F>
KD_HD F kd_if_pos(F prob, F value) {
  const F zero = kd_splat(0.f, prob);
  return kd_where_gt(prob, zero, value, zero);
}

// ---- online log-sum-exp --------------------------------------------------------------------------
// Running log-sum-exp of a stream of logits at scale 1/T: the largest logit seen (raw units, -inf
// while every logit seen is -inf) and sum exp((x - max) / T), rescaled whenever the max grows.
// The kernels add the exps themselves (SIMD, per thread); this keeps the pair and what follows
// from it, in double.
struct OnlineLse {
  float max = -INFINITY;
  double sum = 0.0;

  // Moves the running max up to `new_max` when that is larger, rescaling the sum.
  KD_HD void raise_max(float new_max, float inv_t) {
    if (new_max > max) {
      sum *= ::exp(static_cast<double>(max - new_max) * inv_t);
      max = new_max;
    }
  }
  KD_HD bool empty() const { return max == -INFINITY; }
  // lse(x / T); -inf for an empty stream.
  KD_HD double lse(float inv_t) const {
    return empty() ? -INFINITY : static_cast<double>(max) * inv_t + ::log(sum);
  }
  // The factor turning exp((x - shift) / T) into the probability exp(x / T - lse); 0 when empty.
  KD_HD float probability_factor(float shift, float inv_t) const {
    return empty() ? 0.f : static_cast<float>(::exp(static_cast<double>(shift - max) * inv_t) / sum);
  }
};

// Weights of the mixture m = w_p p + w_q q used by jsd and the skew divergences.
struct Mixture {
  float wp;
  float wq;
  float log_wp;  // log(wp), log(wq): -inf for a zero weight
  float log_wq;
};

// m = wp p + wq q. The mixture divergences below work from the probabilities, not from log p -
// log m of the logits, so that entries where both probabilities are tiny still give well-scaled
// ratios. Entries with zero probability are guarded by kd_if_pos.
template <class F>
KD_HD F mixture_of(F p, F q, const Mixture& mix) {
  return kd_splat(mix.wp, p) * p + kd_splat(mix.wq, q) * q;
}

// log(m / x) for the mixture m = w_x x + w_y y of x (p or q) and the other distribution y, to
// full precision both where m is close to x (student and teacher nearly agree, or w is near 0:
// the log of a ratio rounded near 1 would be off by ~eps per element, a bias of that size in a
// KL(x || m) that is itself tiny there) and where m is far from it (log1p of t = m/x - 1 near -1
// would cancel). u = w_x + w_y y / x is a sum of positive terms, so exact in relative terms
// everywhere, and log(u) is right wherever u is not close to 1. Near 1, u's own rounding would
// dominate log(u); there t = w_y (y - x) / x, exact relative to itself, gives the true 1 + t and
// the first-order correction log(1 + t) = log(u) + (1 + t - u) / u, with 1 + t - u = t - (u - 1)
// (u - 1 exact there) and 1 / u ~ 2 - u (its error is second order in a correction that is
// already ~eps). One reciprocal and one log per call. The reciprocal and both ratios are capped
// so that a denormal x gives a large finite log, not inf or NaN. x > 0. Both weights come from
// the Mixture (formed in double): 1 - w_y in float would lose w_x's digits when w_x is tiny (a
// skew weight of 1e-7).
template <class F>
KD_HD F log_mixture_over(F x, F y, float w_x, float w_y) {
  const F one = kd_splat(1.f, x);
  const F cap = kd_splat(1e30f, x);
  const F inv_x = kd_inverse_capped(x);
  const F t = kd_min(kd_splat(w_y, x) * ((y - x) * inv_x), cap);
  const F u = kd_min(kd_splat(w_x, x) + kd_splat(w_y, x) * (y * inv_x), cap);
  const F u_minus_1 = u - one;
  const F correction = (t - u_minus_1) * (kd_splat(2.f, x) - u);
  const F half = kd_splat(0.5f, x);
  return kd_log(u) + kd_where_gt(half, kd_abs(u_minus_1), correction, kd_splat(0.f, x));
}

// ---- forward KL: KL(p || q) = sum p (log p - log q);  dD/du_i = q_i - p_i ------------------
struct ForwardKL {
  static constexpr bool kRowSum = false;
  template <class F>
  KD_HD static void terms(F logp, F logq, F p, F q, const Mixture&, F& loss, F& c) {
    loss = kd_if_pos(p, p * (logp - logq));
    c = kd_splat(0.f, p);
  }
  template <class F>
  KD_HD static F grad(F, F, F p, F q, const Mixture&, float) {
    return q - p;
  }
};

// Base of the kCachedGrad divergences: their seven-argument terms, for kernels that do not keep
// the cached quantity, from the eight-argument one each defines.
template <class Div>
struct CachedGrad {
  static constexpr bool kCachedGrad = true;
  template <class F>
  KD_HD static void terms(F logp, F logq, F p, F q, const Mixture& mix, F& loss, F& c) {
    F cached;
    Div::terms(logp, logq, p, q, mix, loss, c, cached);
  }
};

// ---- reverse KL: KL(q || p);  r = log q - log p,  C = sum q r,  dD/du_i = q_i (r_i - C) -------
struct ReverseKL : CachedGrad<ReverseKL> {
  using CachedGrad<ReverseKL>::terms;
  static constexpr bool kRowSum = true;
  template <class F>
  KD_HD static void terms(F logp, F logq, F p, F q, const Mixture& mix, F& loss, F& c, F& cached) {
    cached = kd_if_pos(q, logq - logp);  // r
    loss = q * cached;
    c = loss;
  }
  template <class F>
  KD_HD static F grad_cached(F q, F r, const Mixture&, float row_c) {
    return q * (r - kd_splat(row_c, q));
  }
  template <class F>
  KD_HD static F grad(F logp, F logq, F, F q, const Mixture&, float row_c) {
    return kd_if_pos(q, q * (logq - logp - kd_splat(row_c, q)));
  }
};

// ---- generalized JSD(beta): m = beta p + (1-beta) q,
//      D = beta KL(p||m) + (1-beta) KL(q||m);  s = log(q/m),  C = sum q s,
//      dD/du_i = (1-beta) q_i (s_i - C).  D = 0 at beta in {0, 1} (continuous convention).
//      log(p/m), log(q/m) come from log_mixture_over (beta near 0 or 1 puts m near q or p). -----
struct JSD : CachedGrad<JSD> {
  using CachedGrad<JSD>::terms;
  static constexpr bool kRowSum = true;
  // One log per element: log_mixture_over on the side the mixture leans to (where its log is
  // small and must be exact), the other side from it and log p - log q, which is exact relative
  // to itself where both are small. Where the exact side's probability is below
  // log_mixture_over's range (<= 1e-30, or 0), m is the other side's share alone: log(w) there.
  template <class F>
  KD_HD static void log_mixture_ratios(F logp, F logq, F p, F q, const Mixture& mix, F& log_m_over_p,
                                       F& log_m_over_q) {
    const F tiny = kd_splat(1e-30f, p);
    if (mix.wp > 0.5f) {
      log_m_over_p = log_mixture_over(p, q, mix.wp, mix.wq);
      log_m_over_q = kd_where_gt(p, tiny, log_m_over_p + (logp - logq), kd_splat(mix.log_wq, p));
    } else {
      log_m_over_q = log_mixture_over(q, p, mix.wq, mix.wp);
      log_m_over_p = kd_where_gt(q, tiny, log_m_over_q - (logp - logq), kd_splat(mix.log_wp, p));
    }
  }
  template <class F>
  KD_HD static void terms(F logp, F logq, F p, F q, const Mixture& mix, F& loss, F& c, F& cached) {
    const F zero = kd_splat(0.f, p);
    F log_m_over_p, log_m_over_q;
    log_mixture_ratios(logp, logq, p, q, mix, log_m_over_p, log_m_over_q);
    cached = kd_if_pos(q, zero - log_m_over_q);  // s
    const F kl_q = q * cached;
    loss = zero;
    if (mix.wp > 0.f) loss = loss + kd_splat(mix.wp, p) * kd_if_pos(p, zero - p * log_m_over_p);
    if (mix.wq > 0.f) loss = loss + kd_splat(mix.wq, p) * kl_q;
    c = kl_q;
  }
  template <class F>
  KD_HD static F grad_cached(F q, F s, const Mixture& mix, float row_c) {
    if (!(mix.wq > 0.f) || !(mix.wp > 0.f)) return kd_splat(0.f, q);
    return kd_splat(mix.wq, q) * q * (s - kd_splat(row_c, q));
  }
  template <class F>
  KD_HD static F grad(F, F, F p, F q, const Mixture& mix, float row_c) {
    if (!(mix.wq > 0.f) || !(mix.wp > 0.f)) return kd_splat(0.f, q);
    const F s = kd_splat(0.f, q) - log_mixture_over(q, p, mix.wq, mix.wp);
    return kd_splat(mix.wq, q) * kd_if_pos(q, q * (s - kd_splat(row_c, q)));
  }
};

// ---- skew KL(alpha): m = alpha p + (1-alpha) q,  D = KL(p || m);
//      w = p/m,  C = W = sum q w,  dD/du_i = (1-alpha) q_i (W - w_i).
//      W - w_i cancels when w_i ~ W. Small w are exact enough directly; for w near 1 the small
//      quantity w - 1 = (1-alpha)(p - q)/m keeps the precision, with C2 = sum q (w - 1) = W - 1.
//      The kernels carry both constants and use grad2. log(p/m) comes from log_mixture_over
//      (alpha near 1 puts m near p, where D is tiny).
struct SkewKL {
  static constexpr bool kRowSum = true;
  static constexpr bool kSecondRowSum = true;
  template <class F>
  KD_HD static void terms(F, F, F p, F q, const Mixture& mix, F& loss, F& c) {
    loss = kd_if_pos(p, kd_splat(0.f, p) - p * log_mixture_over(p, q, mix.wp, mix.wq));
    c = kd_if_pos(mixture_of(p, q, mix), q * p * inverse_mixture(p, q, mix));  // m = 0 only where p = q = 0
  }
  // 1 / m, one reciprocal shared by the terms that need it (a kernel computing c and
  // second_term together takes it once).
  template <class F>
  KD_HD static F inverse_mixture(F p, F q, const Mixture& mix) {
    return kd_inverse_capped(mixture_of(p, q, mix));
  }
  // c2_i = q_i (w_i - 1)
  template <class F>
  KD_HD static F second_term(F p, F q, const Mixture& mix) {
    return kd_if_pos(mixture_of(p, q, mix), kd_splat(mix.wq, q) * q * (p - q) * inverse_mixture(p, q, mix));
  }
  template <class F>
  KD_HD static F grad2(F, F, F p, F q, const Mixture& mix, float row_c, float row_c2) {
    if (!(mix.wq > 0.f)) return kd_splat(0.f, q);
    const F m = mixture_of(p, q, mix);
    const F inv_m = inverse_mixture(p, q, mix);
    const F w = kd_if_pos(m, p * inv_m);
    const F w_minus_1 = kd_if_pos(m, kd_splat(mix.wq, q) * (p - q) * inv_m);
    const F gap = kd_where_gt(w, kd_splat(0.5f, q), kd_splat(row_c2, q) - w_minus_1,
                              kd_splat(row_c, q) - w);
    return kd_splat(mix.wq, q) * q * gap;
  }
};

// ---- skew reverse KL(alpha): m = (1-alpha) p + alpha q,  D = KL(q || m);
//      h = log(q/m) - alpha q/m,  C = sum q h,  dD/du_i = q_i (h_i - C).
//      Near alpha = 1 (m near q) h is close to -1 and h - C cancels: the kernels carry the
//      shifted h' = h + 1 = (1-alpha) p/m - log(m/q) instead (alpha q/m + (1-alpha) p/m = 1),
//      small there and exact from log_mixture_over; the shift cancels in h - C. ----------------
struct SkewReverseKL : CachedGrad<SkewReverseKL> {
  using CachedGrad<SkewReverseKL>::terms;
  static constexpr bool kRowSum = true;
  // h' from log(m/q) (q > 0). The shift pays near alpha = 1; near alpha = 0 (m near p) h itself
  // is the small one (-log(m/q) - alpha q/m, with alpha q/m tiny) and h' = h + 1 would round it
  // to float's spacing at 1, so the kernels carry h there: either way the constant cancels in
  // h - C, and the choice is one per call.
  template <class F>
  KD_HD static F h_shifted(F p, F q, F log_m_over_q, const Mixture& mix) {
    const F inv_m = kd_inverse_capped(mixture_of(p, q, mix));
    if (mix.wp > 0.5f) return kd_splat(0.f, q) - log_m_over_q - kd_splat(mix.wq, q) * q * inv_m;
    return kd_splat(mix.wp, p) * p * inv_m - log_m_over_q;
  }
  template <class F>
  KD_HD static void terms(F, F, F p, F q, const Mixture& mix, F& loss, F& c, F& cached) {
    const F log_m_over_q = log_mixture_over(q, p, mix.wq, mix.wp);
    loss = kd_if_pos(q, kd_splat(0.f, q) - q * log_m_over_q);
    cached = kd_if_pos(q, h_shifted(p, q, log_m_over_q, mix));
    c = q * cached;
  }
  template <class F>
  KD_HD static F grad_cached(F q, F h, const Mixture& mix, float row_c) {
    if (!(mix.wp > 0.f)) return kd_splat(0.f, q);
    return q * (h - kd_splat(row_c, q));
  }
  template <class F>
  KD_HD static F grad(F, F, F p, F q, const Mixture& mix, float row_c) {
    if (!(mix.wp > 0.f)) return kd_splat(0.f, q);  // alpha = 1: m = q, D = 0 for every q
    const F h = h_shifted(p, q, log_mixture_over(q, p, mix.wq, mix.wp), mix);
    return kd_if_pos(q, q * (h - kd_splat(row_c, q)));
  }
};

// ---- total variation: D = 1/2 sum |p - q|;  sigma = 1/2 sign(q - p),  C = sum q sigma,
//      dD/du_i = q_i (sigma_i - C). ----------------------------------------------------------
struct TVD : CachedGrad<TVD> {
  using CachedGrad<TVD>::terms;
  static constexpr bool kRowSum = true;
  template <class F>
  KD_HD static F sigma(F p, F q) {
    const F half = kd_splat(0.5f, p);
    const F zero = kd_splat(0.f, p);
    return kd_where_gt(q, p, half, kd_where_gt(p, q, zero - half, zero));
  }
  template <class F>
  KD_HD static void terms(F, F, F p, F q, const Mixture&, F& loss, F& c, F& cached) {
    loss = kd_splat(0.5f, p) * kd_abs(p - q);
    cached = sigma(p, q);
    c = q * cached;
  }
  template <class F>
  KD_HD static F grad_cached(F q, F sigma_i, const Mixture&, float row_c) {
    return q * (sigma_i - kd_splat(row_c, q));
  }
  template <class F>
  KD_HD static F grad(F, F, F p, F q, const Mixture&, float row_c) {
    return q * (sigma(p, q) - kd_splat(row_c, q));
  }
};

// Divergences that carry a second row constant for precision (see SkewKL): they give
// second_term and grad2.
template <class Div, class = void>
constexpr bool kSecondRowSum = false;
template <class Div>
constexpr bool kSecondRowSum<Div, std::void_t<decltype(Div::kSecondRowSum)>> = Div::kSecondRowSum;

// Divergences whose gradient comes from a per-element quantity a kernel may keep (see CachedGrad).
template <class Div, class = void>
constexpr bool kCachedGrad = false;
template <class Div>
constexpr bool kCachedGrad<Div, std::void_t<decltype(Div::kCachedGrad)>> = Div::kCachedGrad;

// dD/du_i with the row constants a kernel carries: grad2 for the divergences with a second one.
template <class Div, class F>
KD_HD F divergence_grad(F logp, F logq, F p, F q, const Mixture& mix, float row_c, float row_c2) {
  if constexpr (kSecondRowSum<Div>) {
    return Div::grad2(logp, logq, p, q, mix, row_c, row_c2);
  } else {
    return Div::grad(logp, logq, p, q, mix, row_c);
  }
}

// Whether `id` names a divergence of the enum above (the ops take it as an integer).
KD_HD bool is_divergence_id(int64_t id) { return id >= 0 && id <= static_cast<int64_t>(Divergence::kTVD); }

// The mixture each divergence uses, from its `beta` argument. Both weights are formed in double
// and then rounded: 1 - beta from a beta already rounded to float loses the digits that matter
// when beta is close to 1 (a relative error of 1e-2 in w at beta = 0.999999).
KD_HD Mixture mixture_for(Divergence div, double beta) {
  const float beta_f = static_cast<float>(beta), rest_f = static_cast<float>(1.0 - beta);
  const float log_beta = static_cast<float>(::log(beta)), log_rest = static_cast<float>(::log(1.0 - beta));
  switch (div) {
    case Divergence::kJSD:
    case Divergence::kSkewKL:
      return Mixture{beta_f, rest_f, log_beta, log_rest};  // m = beta p + (1 - beta) q
    case Divergence::kSkewReverseKL:
      return Mixture{rest_f, beta_f, log_rest, log_beta};  // m = (1 - alpha) p + alpha q
    default:
      return Mixture{0.f, 0.f, -INFINITY, -INFINITY};
  }
}

// Calls f(Tag{}) with the divergence type selected at run time.
template <class Fn>
inline void dispatch_divergence(Divergence div, Fn&& fn) {
  switch (div) {
    case Divergence::kForwardKL: fn(ForwardKL{}); break;
    case Divergence::kReverseKL: fn(ReverseKL{}); break;
    case Divergence::kJSD: fn(JSD{}); break;
    case Divergence::kSkewKL: fn(SkewKL{}); break;
    case Divergence::kSkewReverseKL: fn(SkewReverseKL{}); break;
    case Divergence::kTVD: fn(TVD{}); break;
  }
}

// The factor on a distillation term: T^2 when scale_by_t2 (its gradient then keeps the scale of
// the CE term's as T grows), else 1.
KD_HD float t2_scale(float temperature, bool scale_by_t2) { return scale_by_t2 ? temperature * temperature : 1.f; }

// Per-call parameters of the fused KD row loss
//   loss_row = ce_weight * (lse(z) - z_y) + kd_weight * t2 * D(p_T || q_T)
// with t2 = t2_scale(T); dL/dz = kd_coef * dD/du + ce_weight * (softmax(z) - e_y)
// where kd_coef = kd_weight * t2 / T.
struct KDParams {
  Divergence divergence;
  float inv_temperature;
  float kd_scale;  // kd_weight * t2   (multiplies D in the loss)
  float kd_coef;   // kd_scale / T     (multiplies dD/du in dL/dz)
  float ce_weight;
  // T == 1: the CE term's softmax(z) is the student's q, and its log-sum-exp the student's one,
  // so a kernel computes neither a second time.
  bool ce_reuses_q;
  int64_t ignore_index;
  Mixture mix;
};

KD_HD KDParams make_kd_params(int64_t divergence, float temperature, double beta, float kd_weight,
                              float ce_weight, bool scale_by_t2, int64_t ignore_index) {
  KDParams p;
  p.divergence = static_cast<Divergence>(divergence);
  p.inv_temperature = 1.f / temperature;
  p.kd_scale = kd_weight * t2_scale(temperature, scale_by_t2);
  p.kd_coef = p.kd_scale / temperature;
  p.ce_weight = ce_weight;
  p.ce_reuses_q = p.inv_temperature == 1.f;
  p.ignore_index = ignore_index;
  p.mix = mixture_for(p.divergence, beta);
  return p;
}

}  // namespace kdkernels
