// Operator schemas of the kdkernels library (the sparse ops' beside their kernel, in
// csrc/cpu/sparse_kd_cpu.cpp). The implementations register per device beside their kernels: CPU
// in csrc/cpu/*_cpu.cpp, CUDA in csrc/cuda/kd_loss_cuda_glue.cpp, with what the devices share in
// csrc/op_glue.h. The ops have no autograd formula: they compute the gradient in the forward
// (compute_grad), and the Python package's autograd Functions hand it on in backward; it also
// registers the fake (meta) functions that torch.compile needs.
#include <torch/library.h>

TORCH_LIBRARY(kdkernels, m) {
  // Fused KD loss: -> (row_loss [N] float32, grad [N, V] in the student dtype; empty when
  // !compute_grad). grad is d(grad_scale * sum(row_loss)) / d(student_logits).
  m.def(
      "kd_loss_fwd(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
      "Tensor grad_scale, int divergence, float temperature, float beta, float kd_weight, "
      "float ce_weight, bool scale_by_t2, int ignore_index, bool compute_grad) "
      "-> (Tensor, Tensor)");
  // The same, with the gradient written over student_logits (contiguous): -> row_loss [N]
  m.def(
      "kd_loss_fwd_inplace_(Tensor(a!) student_logits, Tensor teacher_logits, Tensor? labels, "
      "Tensor grad_scale, int divergence, float temperature, float beta, float kd_weight, "
      "float ce_weight, bool scale_by_t2, int ignore_index) -> Tensor");
  // Decomposed KL (CAKD / DKD): -> (row_loss [N], components [N, 3] = BCD, SCD, WCD, grad)
  m.def(
      "cakd_loss_fwd(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
      "Tensor grad_scale, int group_rule, int top_k, float mass, float bcd_weight, "
      "float scd_weight, float wcd_weight, bool scd_teacher_mass, bool wcd_teacher_mass, "
      "float temperature, bool scale_by_t2, int ignore_index, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor)");
  // out (float32) = beta * out + alpha * mat1 @ mat2 for bfloat16 / float16 mat1 and mat2, accumulated
  // in float32 (CPU: csrc/cpu/widening_gemm.cpp), where widening_gemm_available(dtype) is true.
  m.def("addmm_widening_(Tensor(a!) out, Tensor mat1, Tensor mat2, float beta, float alpha) -> ()");
  m.def("widening_gemm_available(ScalarType dtype) -> bool");
  // The CPU build's ISA, vector width and threading: "isa=AVX512;vector_width=16;..."
  m.def("build_info() -> str");
  // Test probe: how many OS threads an at::parallel_for over `tasks` items ran on.
  m.def("parallel_threads_used(int tasks) -> int");
  // The CPU gradient buffers kept for reuse (csrc/cpu/cpu_alloc.h): release them / their size.
  m.def("release_cached_buffers() -> int");
  m.def("cached_buffer_bytes() -> int");
  // An uninitialised CPU tensor from those buffers (huge pages, reused after free).
  m.def("empty_cached(int[] size, ScalarType dtype) -> Tensor");
}
