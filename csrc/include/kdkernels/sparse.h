// Sparse (top-k / sampled) teacher KD: the per-row math shared by the CPU and CUDA kernels.
//
// A row's teacher is given on a support S of k ids (padding id allowed) with values v of one
// kind; the student is dense, u = z / T over the vocabulary V. Buckets:
//   renormalize: teacher p̂ = softmax_S(v · T_gen / T) (probs: w / Σw), student q = softmax_V(u)
//                read at S.  D = Σ_S p̂ (log p̂ − log q)  (forward KL only).
//   support:     p̂ as above, student q̂ = softmax_S(u); any divergence D(p̂ ‖ q̂) on S.
//   residual:    S ∪ {rest}: teacher P_i = (1 − r_t) p̂_i, r_t = 1 − Σ_S exp(v_i) at T_gen
//                (logprobs; probs: P_i = w_i, r_t = 1 − Σ w); student q_i and
//                r_s = exp(LSE_{V∖S}(u) − LSE_V(u)) from the non-support log-sum-exp (never 1 − Σ q).
//                Any divergence on the k + 1 buckets. At T = T_gen, P_i = exp(v_i) exactly; at
//                T ≠ T_gen the teacher's mass outside S stays r_t (its split is unknown) and only
//                the shape inside S is re-tempered.
//
// Gradient (u-space; the kernel multiplies by kd_weight · t2 / T). With G_b = ∂D/∂log Q_b of the
// bucket divergence (up to a multiple of Q_b, which cancels because Σ_b Q_b = 1):
//   column j ∈ S:   dD/du_j = G_j − Q_j · Σ_b G_b
//   column j ∉ S:   dD/du_j = q_j · c_row,  c_row = G_rest / r_s − Σ_b G_b  (residual),
//                   1 (renormalize: q_j − p̂_j [j ∈ S]), 0 (support).
// So one pass over the dense row (online LSE, gather at S) and one gradient write
// g_j = q_j · c_row, with the k support columns written from their own formula.
// Divergence terms and G come from divergence.h: bucket_log_q_derivative (below) is exactly G_b + a
// multiple of Q_b for every divergence there.
#pragma once

#include <kdkernels/divergence.h>

#include <cstdint>

namespace kdkernels {

enum class TeacherKind : int64_t { kLogprobs = 0, kLogits = 1, kProbs = 2 };
enum class MissingMass : int64_t { kRenormalize = 0, kResidual = 1, kSupport = 2 };

struct SparseParams {
  KDParams kd;
  TeacherKind kind;
  MissingMass missing;
  float value_scale;  // T_gen / T: re-tempers log-prob and logit values
  int64_t pad_id;
};

KD_HD SparseParams make_sparse_params(const KDParams& kd, int64_t kind, double teacher_temperature,
                                      int64_t missing, double temperature, int64_t pad_id) {
  SparseParams p;
  p.kd = kd;
  p.kind = static_cast<TeacherKind>(kind);
  p.missing = static_cast<MissingMass>(missing);
  p.value_scale = static_cast<float>(teacher_temperature / temperature);
  p.pad_id = pad_id;
  return p;
}

constexpr float kSparseNegInf = -__builtin_huge_valf();

// log Σ_b exp(x_b) over k entries (-inf entries allowed; -inf when all are).
KD_HD float log_sum_exp(const float* x, int64_t k) {
  float m = kSparseNegInf;
  for (int64_t b = 0; b < k; ++b) m = x[b] > m ? x[b] : m;
  if (m == kSparseNegInf) return m;
  float s = 0.f;
  for (int64_t b = 0; b < k; ++b) s += kd_exp(x[b] - m);
  return m + kd_log(s);
}

// The teacher's bucket log-probabilities: logp[b] for the support entries (-inf at padding) and
// the log of its mass outside S (*log_rest; residual with a rest bucket only, else -inf).
// `rest_exists`: the support does not cover the vocabulary. Returns false when the teacher has
// no mass to compare (all support values -inf / zero outside residual): the KD term is 0.
KD_HD bool teacher_buckets(const int64_t* ids, const float* values, int64_t k, const SparseParams& params,
                           bool rest_exists, float* logp, float* log_rest) {
  const bool residual = params.missing == MissingMass::kResidual && rest_exists;
  *log_rest = kSparseNegInf;
  if (params.kind == TeacherKind::kProbs) {
    float total = 0.f;
    for (int64_t b = 0; b < k; ++b) total += ids[b] != params.pad_id ? values[b] : 0.f;
    // residual keeps the weights as probabilities when they leave mass outside S; weights
    // summing to >= 1 (rounding) are renormalised, leaving none
    const bool keep = residual && total < 1.f;
    if (!(total > 0.f)) {
      for (int64_t b = 0; b < k; ++b) logp[b] = kSparseNegInf;
      if (!residual) return false;
      *log_rest = 0.f;
      return true;
    }
    const float log_norm = keep ? 0.f : kd_log(total);
    for (int64_t b = 0; b < k; ++b)
      logp[b] = ids[b] != params.pad_id && values[b] > 0.f ? kd_log(values[b]) - log_norm : kSparseNegInf;
    if (keep) *log_rest = ::log1pf(-total);
    return true;
  }
  // log-probs / logits, re-tempered over the support: a_b = v_b · T_gen / T
  for (int64_t b = 0; b < k; ++b) logp[b] = ids[b] != params.pad_id ? values[b] * params.value_scale : kSparseNegInf;
  const float lse_a = log_sum_exp(logp, k);
  if (lse_a == kSparseNegInf) {  // no teacher mass on S
    if (!residual) return false;
    *log_rest = 0.f;  // residual: all of it outside
    return true;
  }
  float log_inside = 0.f;  // log of the teacher's mass on S: log Σ_S exp(v) at T_gen (<= 0)
  if (residual && params.kind == TeacherKind::kLogprobs) {
    // in double: the rest mass 1 − Σ exp(v) may be far below float32's resolution of Σ exp(v)
    double m = -__builtin_huge_val();
    for (int64_t b = 0; b < k; ++b)
      if (ids[b] != params.pad_id && values[b] > m) m = values[b];
    double s = 0.0;
    for (int64_t b = 0; b < k; ++b)
      if (ids[b] != params.pad_id) s += ::exp(static_cast<double>(values[b]) - m);
    const double log_inside_d = m + ::log(s);
    // 1 − Σ exp(v) = −expm1(log Σ exp(v)); the support holding everything (or more, by
    // rounding of the values) leaves no rest
    *log_rest = log_inside_d < 0.0 ? static_cast<float>(::log(-::expm1(log_inside_d))) : kSparseNegInf;
    log_inside = log_inside_d < 0.0 ? static_cast<float>(log_inside_d) : 0.f;
  }
  for (int64_t b = 0; b < k; ++b) logp[b] = logp[b] - lse_a + log_inside;
  return true;
}

// The divergence between the teacher and student buckets and its u-space gradient.
// g_i = dD/d(log q_i) of one bucket, before the softmax's -q_i·Σg: each divergence's grad with
// no row constant; skew KL's kernels carry two row constants (grad2), whose split by w does not
// take that form, so its g_i = -(1-α) q_i p_i / m_i is written here.
template <class Div>
KD_HD float bucket_log_q_derivative(float logp, float logq, float p, float q, const Mixture& mix) {
  if constexpr (kSecondRowSum<Div>) {
    if (!(mix.wq > 0.f)) return 0.f;
    const float m = mixture_of(p, q, mix);
    return m > 0.f ? -mix.wq * q * p / m : 0.f;
  } else {
    return Div::grad(logp, logq, p, q, mix, 0.f);
  }
}

// logp / logq: [k] bucket log-probabilities (-inf at padding); the rest bucket (logp_rest,
// logq_rest) takes part when `with_rest`. Writes d[b] = dD/du at support column b and returns
// the divergence; *c_row is the off-support coefficient (dD/du_j = q_j · c_row).
template <class Div>
KD_HD float bucket_divergence(const float* logp, const float* logq, int64_t k, bool with_rest, float logp_rest,
                              float logq_rest, const Mixture& mix, float* d, float* c_row) {
  float loss = 0.f, sum_g = 0.f;
  for (int64_t b = 0; b < k; ++b) {
    const float p = kd_exp(logp[b]), q = kd_exp(logq[b]);
    float term, unused;
    Div::terms(logp[b], logq[b], p, q, mix, term, unused);
    loss += term;
    d[b] = bucket_log_q_derivative<Div>(logp[b], logq[b], p, q, mix);
    sum_g += d[b];
  }
  float g_rest_per_q = 0.f;  // G_rest / r_s
  if (with_rest) {
    const float p = kd_exp(logp_rest), q = kd_exp(logq_rest);
    float term, unused;
    Div::terms(logp_rest, logq_rest, p, q, mix, term, unused);
    loss += term;
    const float g = bucket_log_q_derivative<Div>(logp_rest, logq_rest, p, q, mix);
    sum_g += g;
    if (q > 0.f) g_rest_per_q = g / q;
  }
  for (int64_t b = 0; b < k; ++b) d[b] = d[b] - kd_exp(logq[b]) * sum_g;
  *c_row = with_rest ? g_rest_per_q - sum_g : 0.f;
  return loss;
}

// renormalize: forward KL of p̂ against the full-vocabulary student q read at S.
// logq[b] = log q at the support ids. d[b] = q_b − p̂_b, c_row = 1.
KD_HD float renormalized_forward_kl(const float* logp, const float* logq, int64_t k, float* d, float* c_row) {
  float loss = 0.f;
  for (int64_t b = 0; b < k; ++b) {
    const float p = kd_exp(logp[b]), q = kd_exp(logq[b]);
    loss += kd_if_pos(p, p * (logp[b] - logq[b]));
    d[b] = q - p;
  }
  *c_row = 1.f;
  return loss;
}

// The whole KD part of a row from the teacher values and the student's support logits.
//   zs[b]: shifted support logits (z_id − max_z) · inv_T (-inf at padding)
//   log_z: log Σ_V exp((z − max_z) · inv_T), i.e. LSE_V(u) in the same shift
//   logq_rest: LSE_{V∖S}(u) − LSE_V(u) (residual only)
// Fills logp, logq (scratch [k]) and d [k]; returns the divergence (0 without teacher mass)
// and *c_row.
KD_HD float sparse_divergence(const int64_t* ids, const float* values, const float* zs, int64_t k,
                              const SparseParams& params, bool rest_exists, float log_z, float logq_rest,
                              float* logp, float* logq, float* d, float* c_row) {
  float logp_rest;
  if (!teacher_buckets(ids, values, k, params, rest_exists, logp, &logp_rest)) {
    for (int64_t b = 0; b < k; ++b) d[b] = 0.f;
    *c_row = 0.f;
    return 0.f;
  }
  const float norm = params.missing == MissingMass::kSupport ? log_sum_exp(zs, k) : log_z;
  if (norm == kSparseNegInf) return __builtin_huge_valf();  // the student masks all of S: infinite
  for (int64_t b = 0; b < k; ++b) logq[b] = zs[b] - norm;
  if (params.missing == MissingMass::kRenormalize) return renormalized_forward_kl(logp, logq, k, d, c_row);
  const bool with_rest = params.missing == MissingMass::kResidual && rest_exists;
  float loss = 0.f;
  dispatch_divergence(params.kd.divergence, [&](auto tag) {
    loss = bucket_divergence<decltype(tag)>(logp, logq, k, with_rest, logp_rest, logq_rest, params.kd.mix, d,
                                            c_row);
  });
  return loss;
}

}  // namespace kdkernels
