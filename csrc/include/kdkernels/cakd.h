// Decomposed KL (CAKD / DKD): the row constants and per-element terms of the CPU kernel
// (csrc/cpu/cakd_cpu.cpp), written torch-free and host/device like divergence.h so that a CUDA
// kernel can share them.
//
// Notation: u = z_s / T, a = z_t / T; the classes of a row split into the strongly correlated set
// S and the rest W; for a group g, P_g / Q_g are the teacher / student mass and
//   log p̂_i = a_i - lse_g(a),   log q̂_i = u_i - lse_g(u)   (i in g)
// the distributions renormalised inside the group. With d = lse_W - lse_S (log-odds of W vs S):
//   log P_S = -softplus(d_a),  log P_W = -softplus(-d_a)   (same for Q with d_u)
// so that neither mass needs the other's complement 1 - P (which underflows to garbage when one
// group holds nearly all the mass).
//
//   BCD = sum_g P_g (log P_g - log Q_g),  SCD = KL(p̂_S || q̂_S),  WCD = KL(p̂_W || q̂_W)
//   L   = t2 (w_b BCD + w_S SCD + w_W WCD)
// Gradient, exact for any partition and any weights that do not depend on the student:
//   dL/du_i = t2 [ w_b (q_i - P_g q̂_i) + w_g (q̂_i - p̂_i) ]
//           = t2 [ (w_b (Q_g - P_g) + w_g) q̂_i - w_g p̂_i ]      (q_i = Q_g q̂_i),  g = g(i).
// A group without any finite teacher logit has p̂ undefined: its KL term is 0 (weight 0), which
// keeps KL(p||q) = BCD + P_S SCD + P_W WCD true. A group without finite student logits uses 0 as
// its normaliser, so its (all -inf) members give q̂ = 0 rather than NaN.
//
// Precision: a group's lse_g = M_g / T + log(sum_g) (M_g its max logit, sum_g its sum of
// exp((x - M_g) / T)) is kept as hi = fl(M_g / T) plus the rest, and the element's log ratio is
//   log p̂_i - log q̂_i = (a_i - hi_a) - (u_i - hi_u) - (log sum_a - log sum_u),
// so that rounding the (large) lse values to float leaves no error common to every element (it
// would bias the KL by up to eps |lse|); a one-class group gives exactly 0. The row constants are
// computed in double.
#pragma once

#include <kdkernels/divergence.h>

namespace kdkernels {

// How S is chosen (ids shared with kdkernels/_config.py, CAKD_GROUPS).
enum class GroupRule : int64_t {
  kLabel = 0,  // S = {label}
  kTopK = 1,   // S = the teacher's top_k classes (teacher_top1: top_k = 1)
  kMass = 2,   // S = the fewest top teacher classes whose mass reaches `mass` (crossing one included)
};

// Per-call options of the decomposed-KL row loss.
struct CakdParams {
  GroupRule rule;
  int64_t top_k;
  float mass;
  float bcd_weight;
  float scd_weight;
  float wcd_weight;
  bool scd_teacher_mass;  // w_S = P_S of the row instead of scd_weight
  bool wcd_teacher_mass;  // w_W = P_W of the row instead of wcd_weight
  float inv_temperature;
  float t2;         // T^2 when scale_by_t2, else 1 (multiplies the loss)
  float grad_coef;  // t2 / T (multiplies dL/du in dL/dz)
  int64_t ignore_index;
};

KD_HD CakdParams make_cakd_params(int64_t group_rule, int64_t top_k, float mass, float bcd_weight, float scd_weight,
                                  float wcd_weight, bool scd_teacher_mass, bool wcd_teacher_mass, float temperature,
                                  bool scale_by_t2, int64_t ignore_index) {
  CakdParams p;
  p.rule = static_cast<GroupRule>(group_rule);
  p.top_k = top_k;
  p.mass = mass;
  p.bcd_weight = bcd_weight;
  p.scd_weight = scd_weight;
  p.wcd_weight = wcd_weight;
  p.scd_teacher_mass = scd_teacher_mass;
  p.wcd_teacher_mass = wcd_teacher_mass;
  p.inv_temperature = 1.f / temperature;
  p.t2 = t2_scale(temperature, scale_by_t2);
  p.grad_coef = p.t2 / temperature;
  p.ignore_index = ignore_index;
  return p;
}

KD_HD double kd_softplus(double x) {
  // max(x, 0) + log1p(exp(-|x|)): exact at +-inf, no overflow.
  return (x > 0.0 ? x : 0.0) + ::log1p(::exp(-::fabs(x)));
}

// One group's per-element constants (see Precision above):
//   log p̂_i - log q̂_i = (a_i - hi_a) - (u_i - hi_u) - lo_diff,
//   dL/dz_i = grad_bcd q̂_i + grad_kl (q̂_i - p̂_i)  (grad_scale, t2 / T and the weights folded
// in; not as one coefficient on q̂ minus one on p̂, which would cancel catastrophically when
// w_g >> w_b |Q_g - P_g|).
struct CakdGroup {
  float hi_u;     // fl(M_u / T), 0 for a group without finite student logits
  float hi_a;     // fl(M_a / T), 0 for a group without finite teacher logits
  float lo_diff;  // log sum_a - log sum_u (0 when either side is empty)
  float grad_bcd;  // (t2 / T) grad_scale w_b (Q_g - P_g)
  float grad_kl;   // (t2 / T) grad_scale w_g
  float weight;   // w_g actually used (0 for a group without teacher mass)
};

// What a row's loss and gradient need, from the groups' statistics.
struct CakdRow {
  float bcd;
  CakdGroup s;
  CakdGroup w;
};

// x (log x - log y), 0 where x = 0.
KD_HD double xlogratio(double x, double log_x, double log_y) { return x > 0.0 ? x * (log_x - log_y) : 0.0; }

KD_HD CakdGroup cakd_group(const OnlineLse& u, const OnlineLse& a, float inv_t, double grad_bcd,
                           double grad_kl, double weight) {
  const bool has_u = u.max > -INFINITY, has_a = a.max > -INFINITY;
  CakdGroup g;
  g.hi_u = has_u ? u.max * inv_t : 0.f;
  g.hi_a = has_a ? a.max * inv_t : 0.f;
  g.lo_diff = (has_u && has_a) ? static_cast<float>(::log(a.sum) - ::log(u.sum)) : 0.f;
  g.grad_bcd = static_cast<float>(grad_bcd);
  g.grad_kl = static_cast<float>(grad_kl);
  g.weight = static_cast<float>(weight);
  return g;
}

// u_s, u_w, a_s, a_w: student / teacher statistics of S and W (max, sum exp((x - max) / T)); at least one group of each side
// holds a finite logit.
KD_HD CakdRow cakd_row_constants(const OnlineLse& u_s, const OnlineLse& u_w, const OnlineLse& a_s,
                                 const OnlineLse& a_w, float grad_scale, const CakdParams& params) {
  const float inv_t = params.inv_temperature;
  const double d_a = a_w.lse(inv_t) - a_s.lse(inv_t);
  const double d_u = u_w.lse(inv_t) - u_s.lse(inv_t);
  const double log_ps = -kd_softplus(d_a), log_pw = -kd_softplus(-d_a);
  const double log_qs = -kd_softplus(d_u), log_qw = -kd_softplus(-d_u);
  const double p_s = ::exp(log_ps), p_w = ::exp(log_pw), q_s = ::exp(log_qs), q_w = ::exp(log_qw);
  // Q_S - P_S = P_W - Q_W: taken from the smaller group, where it is not a difference of two
  // numbers close to 1.
  const double delta_s = (d_a + d_u > 0.0) ? q_s - p_s : p_w - q_w;
  const double w_s = a_s.max > -INFINITY ? (params.scd_teacher_mass ? p_s : params.scd_weight) : 0.0;
  const double w_w = a_w.max > -INFINITY ? (params.wcd_teacher_mass ? p_w : params.wcd_weight) : 0.0;
  const double coef = static_cast<double>(grad_scale) * params.grad_coef;
  CakdRow row;
  row.bcd = static_cast<float>(xlogratio(p_s, log_ps, log_qs) + xlogratio(p_w, log_pw, log_qw));
  row.s = cakd_group(u_s, a_s, inv_t, coef * params.bcd_weight * delta_s, coef * w_s, w_s);
  row.w = cakd_group(u_w, a_w, inv_t, -coef * params.bcd_weight * delta_s, coef * w_w, w_w);
  return row;
}

// Row loss from its components: t2 (w_b BCD + w_S SCD + w_W WCD).
KD_HD float cakd_row_loss(const CakdRow& row, float scd, float wcd, const CakdParams& params) {
  return params.t2 * (params.bcd_weight * row.bcd + row.s.weight * scd + row.w.weight * wcd);
}

// Element i of group g: its term of KL(p̂_g || q̂_g) and its dL/dz_i, from the renormalised
// probabilities p̂_i, q̂_i, the shifted logits x_a = a_i - hi_a, x_u = u_i - hi_u and the group's
// constants (given per lane in SIMD code, where a vector mixes groups). Masked entries
// (p̂ = q̂ = 0) give 0 for both, whatever x_a - x_u is (NaN for -inf - -inf). The gradient alone
// (cakd_grad) needs only p̂_i, q̂_i and the group's constants.
template <class F>
KD_HD F cakd_grad(F phat, F qhat, F grad_bcd, F grad_kl) {
  return grad_bcd * qhat + grad_kl * (qhat - phat);
}
template <class F>
KD_HD void cakd_element(F phat, F qhat, F x_a, F x_u, F lo_diff, F grad_bcd, F grad_kl, F& kl, F& grad) {
  kl = kd_if_pos(phat, phat * ((x_a - x_u) - lo_diff));
  grad = cakd_grad(phat, qhat, grad_bcd, grad_kl);
}

}  // namespace kdkernels
