// The CPU implementations of the kdkernels ops (schemas in csrc/ops.cpp, registered for the CPU in
// csrc/cpu/register.cpp). Arguments follow the schemas; ids are those of kdkernels/_config.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu_alloc.h"

namespace kdkernels {

// Fused KD loss (kd_loss_cpu.cpp): -> (row_loss [N] float32, grad [N, V] in the student dtype, or
// an empty tensor when !compute_grad). grad = d(grad_scale * sum(row_loss)) / d(student_logits).
std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t divergence,
    double temperature, double beta, double kd_weight, double ce_weight, bool scale_by_t2,
    int64_t ignore_index, bool compute_grad);

// The same with the gradient written over student_logits (contiguous): -> row_loss [N].
at::Tensor kd_loss_fwd_inplace_cpu(
    at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, int64_t divergence, double temperature, double beta, double kd_weight,
    double ce_weight, bool scale_by_t2, int64_t ignore_index);

// Decomposed KL, CAKD / DKD (cakd_cpu.cpp): -> (row_loss [N], components [N, 3] = BCD, SCD, WCD,
// grad as above).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cakd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t group_rule,
    int64_t top_k, double mass, double bcd_weight, double scd_weight, double wcd_weight,
    bool scd_teacher_mass, bool wcd_teacher_mass, double temperature, bool scale_by_t2,
    int64_t ignore_index, bool compute_grad);

// What this build of the CPU kernels is (build_info.cpp): "isa=...;vector_width=...;threading=...;
// max_threads=...".
std::string build_info();

// Number of distinct OS threads that ran chunks of a parallel_for over `tasks` items
// (build_info.cpp): lets the tests check that the kernels' loop really runs on several threads.
int64_t parallel_threads_used(int64_t tasks);

}  // namespace kdkernels
