// Fused KD loss on CPU: one row per task, at::vec SIMD inside a row, at::parallel_for across rows.
//
// Per row (DESIGN.md §3), with the row held in L2 after the first pass:
//   1. statistics: block-wise online max / sum-of-exp for student (at 1/T, and at T = 1 for the CE
//      blend) and teacher -> lse(u), lse(a), lse(z); the only pass that reads DRAM;
//   2. row constant C = sum_i c_i and the divergence value (divergences with kRowSum only);
//   3. gradient dL/dz written in the input dtype, scaled by grad_scale (the reduction factor);
//      forward KL accumulates its value here too, so it needs two passes.
// Rows whose labels equal ignore_index give loss 0 and gradient 0. Non-finite teacher/student
// entries other than -inf (masking) and out-of-range labels are reported as ValueError.
#include "vec_math.h"

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

constexpr int64_t kW = Vec::size();
constexpr int64_t kBlock = 2048;  // elements per online-softmax block (8 KB of fp32: stays in L1)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Loads n <= kW floats; missing lanes read as -inf, which every formula treats as masked.
inline Vec load_masked(const float* ptr, int64_t n) {
  if (n == kW) return Vec::loadu(ptr);
  return Vec::set(Vec(kNegInf), Vec::loadu(ptr, n), n);
}

inline float hsum(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += lanes[i];
  return s;
}

// Max that propagates NaN (so a NaN anywhere in the row is seen).
inline float hmax(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kW; ++i) m = (std::isnan(lanes[i]) || lanes[i] > m) ? lanes[i] : m;
  return m;
}

inline float block_max(const float* x, int64_t n) {
  Vec m(kNegInf);
  for (int64_t i = 0; i < n; i += kW) m = at::vec::maximum(m, load_masked(x + i, std::min(kW, n - i)));
  return hmax(m);
}

// sum_i exp((x_i - shift) * scale) over a block
inline float block_sum_exp(const float* x, int64_t n, float shift, float scale) {
  Vec acc(0.f);
  const Vec vshift(shift), vscale(scale);
  for (int64_t i = 0; i < n; i += kW)
    acc = acc + ((load_masked(x + i, std::min(kW, n - i)) - vshift) * vscale).exp();
  return hsum(acc);
}

// Online (max, sum-of-exp) of one row at scale 1/T, optionally also at scale 1.
struct OnlineLse {
  float max = kNegInf;
  double sum_t = 0.0;  // sum exp((x - max) / T)
  double sum_1 = 0.0;  // sum exp(x - max)
  bool bad = false;    // NaN or +inf seen

  void update(const float* x, int64_t n, float inv_t, bool want_unit) {
    const float bmax = block_max(x, n);
    if (std::isnan(bmax) || bmax == std::numeric_limits<float>::infinity()) {
      bad = true;
      return;
    }
    if (bmax > max) {
      sum_t *= std::exp(static_cast<double>(max - bmax) * inv_t);
      sum_1 *= std::exp(static_cast<double>(max - bmax));
      max = bmax;
    }
    if (max == kNegInf) return;  // everything so far masked
    sum_t += block_sum_exp(x, n, max, inv_t);
    if (want_unit) sum_1 += block_sum_exp(x, n, max, 1.f);
  }
  bool empty() const { return max == kNegInf; }
  float lse_t(float inv_t) const { return max * inv_t + static_cast<float>(std::log(sum_t)); }
  float lse_1() const { return max + static_cast<float>(std::log(sum_1)); }
};

enum RowError : int { kRowOk = 0, kBadTeacher = 1, kBadStudent = 2, kBadLabel = 4 };

struct RowArgs {
  const float* student;  // [V] raw student logits z
  const float* teacher;  // [V] raw teacher logits
  float* grad;           // [V] dL/dz out, or nullptr
  int64_t vocab;
  int64_t label;         // ignore_index when no label
  float grad_scale;
};

// Returns the row loss; writes the gradient when args.grad != nullptr.
template <class Div>
float kd_row(const RowArgs& args, const KDParams& prm, int* error) {
  const int64_t V = args.vocab;
  const float inv_t = prm.inv_temperature;
  const bool has_label = args.label != prm.ignore_index;
  const bool use_ce = prm.ce_weight != 0.f && has_label;
  const bool ce_separate = use_ce && inv_t != 1.f;

  OnlineLse st, tt;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    st.update(args.student + b, n, inv_t, ce_separate);
    tt.update(args.teacher + b, n, inv_t, false);
  }
  if (tt.bad) *error |= kBadTeacher;
  if (st.bad) *error |= kBadStudent;
  if (st.bad || tt.bad || st.empty() || tt.empty()) {
    if (args.grad) std::fill(args.grad, args.grad + V, 0.f);
    return 0.f;
  }
  const float lse_u = st.lse_t(inv_t);
  const float lse_a = tt.lse_t(inv_t);
  const float lse_z = ce_separate ? st.lse_1() : lse_u;

  const Vec v_inv_t(inv_t), v_lse_u(lse_u), v_lse_a(lse_a);
  auto log_probs = [&](int64_t i, int64_t n, Vec& z, Vec& logp, Vec& logq) {
    z = load_masked(args.student + i, n);
    logq = z * v_inv_t - v_lse_u;
    logp = load_masked(args.teacher + i, n) * v_inv_t - v_lse_a;
  };

  double divergence = 0.0;
  float row_c = 0.f;
  if (Div::kRowSum) {
    double c_total = 0.0;
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t bend = std::min(V, b + kBlock);
      Vec loss_acc(0.f), c_acc(0.f);
      for (int64_t i = b; i < bend; i += kW) {
        Vec z, logp, logq, loss, c;
        log_probs(i, std::min(kW, bend - i), z, logp, logq);
        Div::terms(logp, logq, logp.exp(), logq.exp(), prm.mix, loss, c);
        loss_acc = loss_acc + loss;
        c_acc = c_acc + c;
      }
      divergence += hsum(loss_acc);
      c_total += hsum(c_acc);
    }
    row_c = static_cast<float>(c_total);
  }

  if (args.grad != nullptr || !Div::kRowSum) {
    const float scale = args.grad_scale;
    const Vec v_kd(prm.kd_coef * scale), v_ce(prm.ce_weight * scale), v_lse_z(lse_z);
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t bend = std::min(V, b + kBlock);
      Vec loss_acc(0.f);
      for (int64_t i = b; i < bend; i += kW) {
        const int64_t n = std::min(kW, bend - i);
        Vec z, logp, logq;
        log_probs(i, n, z, logp, logq);
        const Vec p = logp.exp(), q = logq.exp();
        if (!Div::kRowSum) {
          Vec loss, c;
          Div::terms(logp, logq, p, q, prm.mix, loss, c);
          loss_acc = loss_acc + loss;
        }
        if (args.grad == nullptr) continue;
        Vec g = v_kd * Div::grad(logp, logq, p, q, prm.mix, row_c);
        if (use_ce) g = g + v_ce * (ce_separate ? (z - v_lse_z).exp() : q);
        g.store(args.grad + i, n);
      }
      if (!Div::kRowSum) divergence += hsum(loss_acc);
    }
    if (args.grad != nullptr && use_ce) args.grad[args.label] -= prm.ce_weight * scale;
  }

  float loss = prm.kd_scale * static_cast<float>(divergence);
  if (use_ce) loss += prm.ce_weight * (lse_z - args.student[args.label]);
  return loss;
}

using RowFn = float (*)(const RowArgs&, const KDParams&, int*);

RowFn row_kernel_for(Divergence div) {
  RowFn fn = nullptr;
  dispatch_divergence(div, [&](auto tag) { fn = &kd_row<decltype(tag)>; });
  return fn;
}

// Returns a pointer to the row as fp32: the row itself for float input, else `buf` filled by
// one conversion pass (bf16/fp16 are widened once, all math is fp32).
template <typename scalar_t>
const float* row_as_float(const scalar_t* row, int64_t V, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    buf.resize(V);
    at::vec::convert(row, buf.data(), V);
    return buf.data();
  }
}

template <typename student_t, typename teacher_t>
void kd_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
             float grad_scale, const KDParams& prm, float* row_loss, at::Tensor* grad,
             std::atomic<int>* errors) {
  const int64_t N = student.size(0), V = student.size(1);
  const student_t* s_base = student.const_data_ptr<student_t>();
  const teacher_t* t_base = teacher.const_data_ptr<teacher_t>();
  student_t* g_base = grad ? grad->mutable_data_ptr<student_t>() : nullptr;
  const RowFn row_fn = row_kernel_for(prm.divergence);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf, t_buf, g_buf;
    int local_errors = kRowOk;
    for (int64_t r = begin; r < end; ++r) {
      RowArgs args;
      args.vocab = V;
      args.grad_scale = grad_scale;
      args.label = labels ? labels[r] : prm.ignore_index;
      student_t* g_row = g_base ? g_base + r * V : nullptr;
      if (labels && args.label != prm.ignore_index && (args.label < 0 || args.label >= V)) {
        local_errors |= kBadLabel;
        args.label = prm.ignore_index;
      }
      if (labels && args.label == prm.ignore_index) {  // ignored row: no loss, no gradient
        row_loss[r] = 0.f;
        if (g_row) std::fill(g_row, g_row + V, student_t(0));
        continue;
      }
      args.student = row_as_float(s_base + r * V, V, s_buf);
      args.teacher = row_as_float(t_base + r * V, V, t_buf);
      if constexpr (std::is_same_v<student_t, float>) {
        args.grad = g_row;
      } else {
        if (g_row) g_buf.resize(V);
        args.grad = g_row ? g_buf.data() : nullptr;
      }
      row_loss[r] = row_fn(args, prm, &local_errors);
      if constexpr (!std::is_same_v<student_t, float>) {
        if (g_row) at::vec::convert(g_buf.data(), g_row, V);
      }
    }
    if (local_errors) errors->fetch_or(local_errors);
  });
}

template <typename Fn>
void dispatch_float_types(at::ScalarType type, const char* name, Fn&& fn) {
  switch (type) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", type);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t divergence,
    double temperature, double beta, double kd_weight, double ce_weight, bool scale_by_t2,
    int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(student_logits.dim() == 2 && teacher_logits.sizes() == student_logits.sizes(),
                    "student_logits and teacher_logits must be [N, V] of equal shape");
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= static_cast<int64_t>(Divergence::kTVD),
                    "unknown divergence id ", divergence);
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
  const KDParams prm = make_kd_params(divergence, static_cast<float>(temperature),
                                      static_cast<float>(beta), static_cast<float>(kd_weight),
                                      static_cast<float>(ce_weight), scale_by_t2, ignore_index);
  const float scale = grad_scale.item<float>();

  at::Tensor row_loss = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? empty_huge_pages({N, V}, student.options())
                                 : at::empty({0}, student.options());
  std::atomic<int> errors{kRowOk};
  dispatch_float_types(student.scalar_type(), "student_logits", [&](auto s_tag) {
    dispatch_float_types(teacher.scalar_type(), "teacher_logits", [&](auto t_tag) {
      kd_rows<decltype(s_tag), decltype(t_tag)>(student, teacher, label_ptr, scale, prm,
                                                row_loss.mutable_data_ptr<float>(),
                                                compute_grad ? &grad : nullptr, &errors);
    });
  });
  const int err = errors.load();
  TORCH_CHECK_VALUE(!(err & kBadTeacher), "teacher_logits contains NaN or +inf");
  TORCH_CHECK_VALUE(!(err & kBadStudent), "student_logits contains NaN or +inf");
  TORCH_CHECK_VALUE(!(err & kBadLabel), "labels must lie in [0, ", V, ") or equal ignore_index (",
                    ignore_index, ")");
  return {row_loss, grad};
}

}  // namespace kdkernels
