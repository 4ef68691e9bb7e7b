// Torch glue of the CUDA kernels: registers kdkernels::kd_loss_fwd and kd_loss_fwd_inplace_ for
// CUDA tensors (the schemas are declared once, in csrc/ops.cpp, which the CPU modules carry) and
// turns tensors into the raw pointers, sizes and current stream of launch_kd_loss_fwd. Built only
// against a CUDA torch.
#include "kd_loss_kernel.h"
#include "op_glue.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace kdkernels {
namespace {

cuda::LogitsType logits_type(const at::Tensor& logits, const char* name) {
  switch (logits.scalar_type()) {
    case at::kFloat: return cuda::LogitsType::kFloat32;
    case at::kBFloat16: return cuda::LogitsType::kBFloat16;
    case at::kHalf: return cuda::LogitsType::kFloat16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", logits.scalar_type());
  }
}

// The kernels take any row stride but need contiguous columns.
at::Tensor with_unit_column_stride(const at::Tensor& logits) {
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

// The row function of both kd_loss ops (csrc/op_glue.h): launches the kernel over the student
// [N, V] with the gradient written to a new contiguous tensor, or over the student logits; returns
// the row losses and that gradient.
std::tuple<at::Tensor, at::Tensor> kd_rows_cuda(const KdLossTensors& tensors, const KDParams& params,
                                                GradInto into) {
  TORCH_CHECK_VALUE(tensors.student.dim() == 2 && tensors.teacher.sizes() == tensors.student.sizes(),
                    "student_logits and teacher_logits must be [N, V] of equal shape");
  TORCH_CHECK_VALUE(tensors.teacher.device() == tensors.student.device(),
                    "teacher_logits must be on the device of student_logits");
  const c10::cuda::CUDAGuard device_guard(tensors.student.device());
  // in place, the student is contiguous (op_glue.h checks it), so this is the same tensor
  const at::Tensor student = with_unit_column_stride(tensors.student);
  const at::Tensor teacher = with_unit_column_stride(tensors.teacher);
  const int64_t rows = student.size(0), vocab = student.size(1);
  at::Tensor grad;
  if (into == GradInto::kNew) grad = at::empty(student.sizes(), student.options());
  if (into == GradInto::kStudent) grad = tensors.student;

  at::Tensor label_tensor;
  if (tensors.labels.has_value()) {
    label_tensor = tensors.labels->to(student.device(), at::kLong).contiguous();
    TORCH_CHECK_VALUE(label_tensor.numel() == rows, "labels must have one entry per row");
  }
  // Stays on the device: the kernel reads it, so no host synchronisation.
  const at::Tensor scale = tensors.grad_scale.to(student.device(), at::kFloat).contiguous();
  at::Tensor row_loss = at::empty({rows}, student.options().dtype(at::kFloat));
  if (rows == 0) return {row_loss, grad};

  cuda::KDRowsProblem problem;
  problem.student = student.const_data_ptr();
  problem.teacher = teacher.const_data_ptr();
  problem.student_type = logits_type(student, "student_logits");
  problem.teacher_type = logits_type(teacher, "teacher_logits");
  problem.student_row_stride = student.stride(0);
  problem.teacher_row_stride = teacher.stride(0);
  problem.labels = label_tensor.defined() ? label_tensor.const_data_ptr<int64_t>() : nullptr;
  problem.grad_scale = scale.const_data_ptr<float>();
  problem.row_loss = row_loss.mutable_data_ptr<float>();
  problem.grad = grad.defined() ? grad.mutable_data_ptr() : nullptr;
  problem.rows = rows;
  problem.vocab = vocab;
  const cudaError_t status = cuda::launch_kd_loss_fwd(problem, params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "kdkernels: kd_loss_fwd CUDA launch failed: ", cudaGetErrorString(status));
  return {row_loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) { impl_kd_loss_ops<&kd_rows_cuda>(m); }

}  // namespace kdkernels

// Importing kdkernels._C_cuda loads the library above. The schema it implements lives in the CPU
// modules, so without one of them loaded first the op would not exist: refuse to import then.
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  if (!c10::Dispatcher::singleton().findSchema({"kdkernels::kd_loss_fwd", ""}).has_value()) {
    PyErr_SetString(PyExc_ImportError,
                    "kdkernels._C_cuda implements ops declared by the kdkernels CPU module "
                    "(kdkernels._C_<isa>); import that first");
    return nullptr;
  }
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
