// Launcher of the fused KD row loss on CUDA: raw pointers, sizes and a stream; no torch types, so
// the kernels compile with plain nvcc and the torch glue (kd_loss_cuda_glue.cpp) stays thin.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include <kdkernels/divergence.h>

namespace kdkernels {
namespace cuda {

enum class LogitsType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One call: `rows` rows of `vocab` logits each. Row r of the student starts at
// student + r * student_row_stride elements; columns are contiguous. Same for the teacher.
struct KDRowsProblem {
  const void* student;        // [rows, vocab] student logits z
  const void* teacher;        // [rows, vocab] teacher logits
  LogitsType student_type;
  LogitsType teacher_type;
  int64_t student_row_stride;
  int64_t teacher_row_stride;
  const int64_t* labels;      // [rows] or nullptr
  const float* grad_scale;    // [] on the device: the factor on the gradient (no host read)
  float* row_loss;            // [rows] out
  // [rows, vocab] out, contiguous, student_type; nullptr: no gradient. May be `student` itself
  // (the gradient written over the logits, in place) when student_row_stride == vocab.
  void* grad;
  int64_t rows;
  int64_t vocab;
};

// Enqueues the kernel on `stream`. Per row: loss = kd_scale * D + ce_weight * CE, gradient
// dL/dz * (*grad_scale) in the student dtype; rows labelled ignore_index give 0 and 0; a teacher
// row entirely -inf gives the CE term alone (no KD term). Rows with NaN/+inf logits, a label
// outside [0, vocab), or a loss made +inf or undefined by student -inf entries (the whole row, the
// label's entry, forward KL's teacher mass on one) give NaN (no host synchronisation to report
// them).
// Returns the launch status (cudaErrorInvalidValue for an unsupported problem).
cudaError_t launch_kd_loss_fwd(const KDRowsProblem& problem, const KDParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdkernels
