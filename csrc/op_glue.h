// What every device's implementation of the KD ops shares (schemas in csrc/ops.cpp): the op
// arguments turned into kernel parameters with their checks, the in-place rule, and the two
// kd_loss ops written once over a device's row function.
#pragma once

#include <kdkernels/divergence.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace kdkernels {

// The kernel parameters of an op call; the divergence id is checked here, once for every device.
inline KDParams op_kd_params(int64_t divergence, double temperature, double beta, double kd_weight,
                             double ce_weight, bool scale_by_t2, int64_t ignore_index) {
  TORCH_CHECK_VALUE(is_divergence_id(divergence), "unknown divergence id ", divergence);
  return make_kd_params(divergence, static_cast<float>(temperature), beta, static_cast<float>(kd_weight),
                        static_cast<float>(ce_weight), scale_by_t2, ignore_index);
}

// The in-place ops write the gradient over the student logits' own storage, row by row.
inline void check_grad_in_place(const at::Tensor& student_logits) {
  TORCH_CHECK_VALUE(student_logits.is_contiguous(), "student_logits must be contiguous to take the gradient in place");
}

// The gradient output of a forward op called without compute_grad.
inline at::Tensor no_grad_output(const at::Tensor& student_logits) { return at::empty({0}, student_logits.options()); }

// A kd_loss op's tensors as the caller gave them; each device makes them as contiguous as its
// kernel needs.
struct KdLossTensors {
  const at::Tensor& student;
  const at::Tensor& teacher;
  const std::optional<at::Tensor>& labels;
  const at::Tensor& grad_scale;
};

// Where a row function writes the gradient: nowhere, into a new [N, V] tensor of the student
// dtype, or over the (contiguous) student logits.
enum class GradInto { kNone, kNew, kStudent };

// A device's row function: -> (row_loss [N] float32, the gradient tensor it wrote; undefined
// for GradInto::kNone).
using KdRowsFn = std::tuple<at::Tensor, at::Tensor> (*)(const KdLossTensors&, const KDParams&, GradInto);

// kd_loss_fwd: -> (row_loss, grad or an empty tensor when !compute_grad).
template <KdRowsFn Rows>
std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_op(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, int64_t divergence, double temperature, double beta, double kd_weight,
    double ce_weight, bool scale_by_t2, int64_t ignore_index, bool compute_grad) {
  const KDParams params = op_kd_params(divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2, ignore_index);
  auto [row_loss, grad] = Rows({student_logits, teacher_logits, labels, grad_scale}, params,
                               compute_grad ? GradInto::kNew : GradInto::kNone);
  return {row_loss, compute_grad ? grad : no_grad_output(student_logits)};
}

// kd_loss_fwd_inplace_: the gradient over student_logits; -> row_loss.
template <KdRowsFn Rows>
at::Tensor kd_loss_fwd_inplace_op(
    at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, int64_t divergence, double temperature, double beta, double kd_weight,
    double ce_weight, bool scale_by_t2, int64_t ignore_index) {
  check_grad_in_place(student_logits);
  const KDParams params = op_kd_params(divergence, temperature, beta, kd_weight, ce_weight, scale_by_t2, ignore_index);
  return std::get<0>(Rows({student_logits, teacher_logits, labels, grad_scale}, params, GradInto::kStudent));
}

// Registers the two kd_loss ops of a device over its row function.
template <KdRowsFn Rows>
void impl_kd_loss_ops(torch::Library& m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_op<Rows>);
  m.impl("kd_loss_fwd_inplace_", &kd_loss_fwd_inplace_op<Rows>);
}

}  // namespace kdkernels
