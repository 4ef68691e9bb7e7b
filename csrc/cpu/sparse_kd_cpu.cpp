// Sparse-teacher KD loss on CPU: a teacher given as k (id, value) pairs per row against the dense
// student logits (the math: csrc/include/kdkernels/sparse.h). One row per task, at::vec inside a
// row, at::parallel_for across rows.
//
// Per row:
//   1. one pass over the student row (the only DRAM read): block-wise online max / sum of
//      exp((z − max) / T) (and at T = 1 for the CE blend), the exps kept in per-thread scratch;
//   2. the k support logits gathered; their exps zeroed in the scratch, so that (residual) one
//      re-sum of the scratch from L2 gives the non-support log-sum-exp without cancellation;
//   3. the k + 1 bucket divergence and the row constant c_row (sparse.h);
//   4. the gradient written once: q_j · c_row (+ the CE blend) from the scratch, then the k
//      support columns and the label from their own formulas.
// Rows whose label is ignore_index, or whose ids are all padding, give loss 0 and gradient 0.
#include "row_ops.h"

#include <kdkernels/sparse.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu_alloc.h"
#include "op_glue.h"

namespace kdkernels {
namespace {

// Errors a row reports beyond row_ops.h's RowError.
constexpr int kBadIds = 8;         // an id outside [0, V) that is not pad_id
constexpr int kInfiniteLoss = 16;  // the student masks (-inf) what the teacher or the label needs

struct SparseScratch {
  std::vector<float> exps;       // [V] exp((z − running max) / T), zero at the support ids
  std::vector<float> exps_1;     // [V] exp(z − running max) for the CE term when T != 1
  std::vector<float> block_max;  // [blocks] the running max each block was shifted by
  std::vector<float> factor;     // [blocks] turns the stored exps into probabilities
  std::vector<float> zs, z_raw, logp, logq, d;  // [k] per support entry
};

// One row in the student's own dtype S: bf16 / fp16 rows are widened vector by vector as the
// statistics pass reads them, and the gradient is narrowed as it is stored (each entry rounded
// once), with no row-sized fp32 copies.
template <typename S>
struct SparseRow {
  const S* z;            // [V] student logits
  S* grad;               // [V] dL/dz out, or nullptr; may alias z (in place)
  const int64_t* ids;    // [k]
  const float* values;   // [k]
  int64_t vocab, k, label;
  float grad_scale;
};

// Returns the row loss; writes the gradient when row.grad is set.
template <typename S>
float sparse_row(const SparseRow<S>& row, const SparseParams& params, SparseScratch& sc, int* error) {
  const int64_t V = row.vocab, k = row.k;
  auto zero_grad = [&]() {
    if (row.grad) std::fill(row.grad, row.grad + V, S(0));
    return 0.f;
  };
  int64_t n_support = 0;
  for (int64_t b = 0; b < k; ++b) {
    const int64_t id = row.ids[b];
    if (id == params.pad_id) continue;
    if (id < 0 || id >= V) {
      *error |= kBadIds;
      return zero_grad();
    }
    ++n_support;
  }
  if (n_support == 0) return zero_grad();  // all padding: an ignored row

  const KDParams& kd = params.kd;
  const float inv_t = kd.inv_temperature;
  const bool use_ce = kd.ce_weight != 0.f && row.label != kd.ignore_index;
  const bool ce_separate = use_ce && inv_t != 1.f;
  const int64_t blocks = (V + kBlock - 1) / kBlock;

  // 1. online statistics, exps into scratch
  sc.exps.resize(V);
  if (ce_separate) sc.exps_1.resize(V);
  sc.block_max.resize(blocks);
  OnlineLse lse_u, lse_1;  // the student at 1/T, and at T = 1 for the CE term when it cannot reuse q
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, n = std::min(kBlock, V - off);
    OnlineLse* unit = ce_separate ? &lse_1 : nullptr;
    if (!raise_to_block_max(row.z + off, n, inv_t, lse_u, unit) ||
        !add_block_exps<true>(row.z + off, n, inv_t, lse_u, unit, sc.exps.data() + off,
                              ce_separate ? sc.exps_1.data() + off : nullptr)) {
      *error |= kBadStudent;
      return zero_grad();
    }
    sc.block_max[b] = lse_u.max;
  }
  if (lse_u.empty()) {  // the whole student row masked: no distribution
    *error |= kInfiniteLoss;
    return zero_grad();
  }
  const float max_z = lse_u.max;
  const double sum_t = lse_u.sum, sum_1 = lse_1.sum;
  const float log_z = static_cast<float>(std::log(sum_t));  // LSE_V(u) − max_z / T

  // 2. gather the support, zero its exps
  sc.zs.resize(k);
  sc.z_raw.resize(k);
  bool label_in_support = false;
  for (int64_t b = 0; b < k; ++b) {
    const int64_t id = row.ids[b];
    if (id == params.pad_id) {
      sc.zs[b] = kNegInf;
      continue;
    }
    label_in_support |= id == row.label;
    sc.z_raw[b] = static_cast<float>(row.z[id]) - max_z;  // read before the gradient may overwrite the row
    sc.zs[b] = sc.z_raw[b] * inv_t;
    sc.exps[id] = 0.f;
  }
  sc.factor.resize(blocks);
  for (int64_t b = 0; b < blocks; ++b)
    sc.factor[b] = sc.block_max[b] == kNegInf
                       ? 0.f
                       : static_cast<float>(std::exp(static_cast<double>(sc.block_max[b] - max_z) * inv_t));
  const bool rest_exists = n_support < V;
  float logq_rest = kNegInf;
  if (params.missing == MissingMass::kResidual && rest_exists) {
    double rest = 0.0;  // Σ_{V∖S} exp((z − max) / T), from L2
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t off = b * kBlock, n = std::min(kBlock, V - off);
      Vec acc(0.f);
      for (int64_t i = 0; i < n; i += kW) acc = acc + Vec::loadu(sc.exps.data() + off + i, std::min(kW, n - i));
      rest += static_cast<double>(hsum(acc)) * sc.factor[b];
    }
    logq_rest = rest > 0.0 ? static_cast<float>(std::log(rest / sum_t)) : kNegInf;
  }

  // 3. the bucket divergence
  sc.logp.resize(k);
  sc.logq.resize(k);
  sc.d.resize(k);
  float c_row = 0.f;
  const float divergence = sparse_divergence(row.ids, row.values, sc.zs.data(), k, params, rest_exists, log_z,
                                             logq_rest, sc.logp.data(), sc.logq.data(), sc.d.data(), &c_row);
  double loss = static_cast<double>(kd.kd_scale) * divergence;
  // read before any gradient write
  const float z_label = use_ce ? static_cast<float>(row.z[row.label]) - max_z : 0.f;
  const double log_sum_1 = std::log(ce_separate ? sum_1 : sum_t);
  if (use_ce) loss += kd.ce_weight * (log_sum_1 - static_cast<double>(z_label));
  if (!std::isfinite(loss)) {
    *error |= kInfiniteLoss;
    return zero_grad();
  }
  if (!row.grad) return static_cast<float>(loss);

  // 4. the gradient: dL/dz = kd_coef · dD/du + ce_weight · (softmax(z) − e_y), times grad_scale
  const float scale = row.grad_scale;
  const float kd_coef = kd.kd_coef * scale, ce_coef = kd.ce_weight * scale;
  const float inv_sum = static_cast<float>(1.0 / sum_t);
  const Vec v_dense(kd_coef * c_row), v_ce(ce_coef);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, bend = std::min(V, off + kBlock);
    const Vec to_q(sc.factor[b] * inv_sum);
    // softmax(z) at T = 1 from the stored exps (the block's running max over the row's)
    const Vec to_softmax_1(ce_separate && sc.block_max[b] != kNegInf
                               ? static_cast<float>(std::exp(static_cast<double>(sc.block_max[b] - max_z)) / sum_1)
                               : 0.f);
    for (int64_t i = off; i < bend; i += kW) {
      const int64_t n = std::min(kW, bend - i);
      const Vec q = Vec::loadu(sc.exps.data() + i, n) * to_q;  // 0 at the support ids
      Vec g = v_dense * q;
      if (use_ce) {
        const Vec softmax_1 = ce_separate ? Vec::loadu(sc.exps_1.data() + i, n) * to_softmax_1 : q;
        g = g + v_ce * softmax_1;
        // the CE term's -e_y on the label's entry, so that entry is rounded once (a support id's
        // entry is written below instead)
        if (!label_in_support && row.label >= i && row.label < i + n) g = minus_on_lane(g, row.label - i, ce_coef);
      }
      store_row(g, row.grad + i, n, /*stream=*/true);
    }
  }
  stream_fence();  // the scalar writes below land after the streamed ones
  for (int64_t b = 0; b < k; ++b) {
    const int64_t id = row.ids[b];
    if (id == params.pad_id) continue;
    float g = kd_coef * sc.d[b];
    if (use_ce) {
      const float shifted = ce_separate ? sc.z_raw[b] : sc.zs[b];
      g += ce_coef * std::exp(shifted - static_cast<float>(log_sum_1));
      if (id == row.label) g -= ce_coef;
    }
    row.grad[id] = static_cast<S>(g);
  }
  return static_cast<float>(loss);
}

template <typename student_t>
void run_sparse_rows(const at::Tensor& student, at::Tensor* grad, const at::Tensor& ids, const at::Tensor& values,
                     const int64_t* labels, const SparseParams& params, float grad_scale, float* row_loss,
                     std::atomic<int>* errors) {
  const int64_t N = student.size(0), V = student.size(1), k = ids.size(1);
  const student_t* s_base = student.const_data_ptr<student_t>();
  student_t* g_base = grad ? grad->mutable_data_ptr<student_t>() : nullptr;
  const int64_t* id_base = ids.const_data_ptr<int64_t>();
  const float* v_base = values.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  const int64_t ignore_index = params.kd.ignore_index;

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    SparseScratch sc;
    int local_errors = kRowOk;
    for (int64_t r = begin; r < end; ++r) {
      SparseRow<student_t> row;
      row.vocab = V;
      row.k = k;
      row.ids = id_base + r * k;
      row.values = v_base + r * k;
      row.grad_scale = grad_scale;
      row.label = labels ? labels[r] : ignore_index;
      student_t* g_row = g_base ? g_base + r * V : nullptr;
      if (labels && row.label != ignore_index && (row.label < 0 || row.label >= V)) {
        local_errors |= kBadLabel;
        row.label = ignore_index;
      }
      if (labels && row.label == ignore_index) {
        row_loss[r] = 0.f;
        if (g_row) std::fill(g_row, g_row + V, student_t(0));
        continue;
      }
      row.z = s_base + r * V;
      row.grad = g_row;
      row_loss[r] = sparse_row(row, params, sc, &local_errors);
    }
    stream_fence();
    if (local_errors) errors->fetch_or(local_errors);
  });
}

at::Tensor sparse_rows_cpu(const at::Tensor& student_in, at::Tensor* grad, const at::Tensor& teacher_ids,
                           const at::Tensor& teacher_values, const std::optional<at::Tensor>& labels,
                           const at::Tensor& grad_scale, int64_t teacher_kind, double teacher_temperature,
                           int64_t missing_mass, int64_t divergence, double temperature, double beta,
                           double kd_weight, double ce_weight, bool scale_by_t2, int64_t ignore_index,
                           int64_t pad_id) {
  TORCH_CHECK_VALUE(student_in.dim() == 2, "student_logits must be [N, V]");
  TORCH_CHECK_VALUE(teacher_ids.dim() == 2 && teacher_ids.size(0) == student_in.size(0) &&
                        teacher_values.sizes() == teacher_ids.sizes(),
                    "teacher_ids and teacher_values must be [N, k] with the student's N");
  TORCH_CHECK_TYPE(teacher_ids.scalar_type() == at::kLong, "teacher_ids must be int64");
  TORCH_CHECK_TYPE(teacher_values.scalar_type() == at::kFloat, "teacher_values must be float32");
  TORCH_CHECK_VALUE(teacher_kind >= 0 && teacher_kind <= 2, "unknown teacher_kind id ", teacher_kind);
  TORCH_CHECK_VALUE(missing_mass >= 0 && missing_mass <= 2, "unknown missing_mass id ", missing_mass);
  const at::Tensor student = student_in.contiguous();
  const at::Tensor ids = teacher_ids.contiguous(), values = teacher_values.contiguous();
  at::Tensor label_tensor;
  const int64_t* label_ptr = nullptr;
  if (labels.has_value()) {
    label_tensor = labels->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(label_tensor.numel() == student.size(0), "labels must have one entry per row");
    label_ptr = label_tensor.const_data_ptr<int64_t>();
  }
  const KDParams kd = op_kd_params(divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2, ignore_index);
  const SparseParams params = make_sparse_params(kd, teacher_kind, teacher_temperature, missing_mass, temperature,
                                              pad_id);
  const float scale = grad_scale.item<float>();
  at::Tensor row_loss = at::empty({student.size(0)}, student.options().dtype(at::kFloat));
  std::atomic<int> errors{kRowOk};
  dispatch_float_types(student.scalar_type(), "student_logits", [&](auto tag) {
    run_sparse_rows<decltype(tag)>(student, grad, ids, values, label_ptr, params, scale,
                                   row_loss.mutable_data_ptr<float>(), &errors);
  });
  const int err = errors.load();
  TORCH_CHECK_VALUE(!(err & kBadStudent), "student_logits contains NaN or +inf");
  TORCH_CHECK_VALUE(!(err & kBadIds), "teacher_ids must lie in [0, ", student.size(1), ") or equal pad_id (",
                    pad_id, ")");
  TORCH_CHECK_VALUE(!(err & kBadLabel), "labels must lie in [0, ", student.size(1),
                    ") or equal ignore_index (", ignore_index, ")");
  TORCH_CHECK_VALUE(!(err & kInfiniteLoss),
                    "student_logits: a row's loss is infinite: the teacher or the label puts mass on an "
                    "entry the student masks with -inf (or the whole student row is -inf)");
  return row_loss;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_ids, const at::Tensor& teacher_values,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t teacher_kind,
    double teacher_temperature, int64_t missing_mass, int64_t divergence, double temperature, double beta,
    double kd_weight, double ce_weight, bool scale_by_t2, int64_t ignore_index, int64_t pad_id,
    bool compute_grad) {
  TORCH_CHECK_VALUE(student_logits.dim() == 2, "student_logits must be [N, V]");
  at::Tensor grad = compute_grad ? empty_huge_pages({student_logits.size(0), student_logits.size(1)},
                                                    student_logits.options())
                                 : no_grad_output(student_logits);
  at::Tensor row_loss = sparse_rows_cpu(student_logits, compute_grad ? &grad : nullptr, teacher_ids, teacher_values,
                                        labels, grad_scale, teacher_kind, teacher_temperature, missing_mass,
                                        divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2,
                                        ignore_index, pad_id);
  return {row_loss, grad};
}

// Each row's support logits, label logit and statistics are read before its gradient is
// written, so the student logits' own storage can take the gradient (fused-linear chunks).
at::Tensor sparse_kd_loss_fwd_inplace_cpu(
    at::Tensor& student_logits, const at::Tensor& teacher_ids, const at::Tensor& teacher_values,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t teacher_kind,
    double teacher_temperature, int64_t missing_mass, int64_t divergence, double temperature, double beta,
    double kd_weight, double ce_weight, bool scale_by_t2, int64_t ignore_index, int64_t pad_id) {
  check_grad_in_place(student_logits);
  at::Tensor grad = student_logits;
  return sparse_rows_cpu(student_logits, &grad, teacher_ids, teacher_values, labels, grad_scale, teacher_kind,
                         teacher_temperature, missing_mass, divergence, temperature, beta, kd_weight, ce_weight,
                         scale_by_t2, ignore_index, pad_id);
}

// Schemas of the sparse-teacher ops (a fragment of the kdkernels library declared in ops.cpp).
TORCH_LIBRARY_FRAGMENT(kdkernels, m) {
  // -> (row_loss [N] float32, grad [N, V] in the student dtype, or [0] without compute_grad)
  m.def(
      "sparse_kd_loss_fwd(Tensor student_logits, Tensor teacher_ids, Tensor teacher_values, Tensor? labels, "
      "Tensor grad_scale, int teacher_kind, float teacher_temperature, int missing_mass, int divergence, "
      "float temperature, float beta, float kd_weight, float ce_weight, bool scale_by_t2, int ignore_index, "
      "int pad_id, bool compute_grad) -> (Tensor, Tensor)");
  // The same, with the gradient written over student_logits (contiguous): -> row_loss [N]
  m.def(
      "sparse_kd_loss_fwd_inplace_(Tensor(a!) student_logits, Tensor teacher_ids, Tensor teacher_values, "
      "Tensor? labels, Tensor grad_scale, int teacher_kind, float teacher_temperature, int missing_mass, "
      "int divergence, float temperature, float beta, float kd_weight, float ce_weight, bool scale_by_t2, "
      "int ignore_index, int pad_id) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("sparse_kd_loss_fwd", &sparse_kd_loss_fwd_cpu);
  m.impl("sparse_kd_loss_fwd_inplace_", &sparse_kd_loss_fwd_inplace_cpu);
}

}  // namespace kdkernels
