// Operator schemas of the kdkernels library: declared here once; implementations register per
// device (CPU below, CUDA in csrc/cuda/kd_loss_cuda_glue.cpp); the Python side adds fake (meta)
// functions and autograd in kdkernels/_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <Python.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kdkernels {

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t divergence,
    double temperature, double beta, double kd_weight, double ce_weight, bool scale_by_t2,
    int64_t ignore_index, bool compute_grad);

at::Tensor kd_loss_fwd_inplace_cpu(
    at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    const at::Tensor& grad_scale, int64_t divergence, double temperature, double beta, double kd_weight,
    double ce_weight, bool scale_by_t2, int64_t ignore_index);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cakd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t group_rule,
    int64_t top_k, double mass, double bcd_weight, double scd_weight, double wcd_weight,
    bool scd_teacher_mass, bool wcd_teacher_mass, double temperature, bool scale_by_t2,
    int64_t ignore_index, bool compute_grad);

int64_t release_cached_buffers();
int64_t cached_buffer_bytes();
at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype);

namespace {

#define KDK_STR2(x) #x
#define KDK_STR(x) KDK_STR2(x)

// What this build of the CPU kernels is: its SIMD level, vector width, and threading runtime.
std::string build_info() {
  std::string isa =
#if defined(CPU_CAPABILITY_AVX512)
      "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
      "AVX2";
#else
      "DEFAULT";
#endif
  std::string threading =
#ifdef _OPENMP
      "openmp";
#else
      "none";
#endif
  return "isa=" + isa + ";vector_width=" + std::to_string(at::vec::Vectorized<float>::size()) +
         ";threading=" + threading + ";max_threads=" + std::to_string(at::get_num_threads());
}

// Number of distinct OS threads that ran chunks of a parallel_for over `tasks` items: lets the
// tests check that the kernels' loop really runs on several threads.
int64_t parallel_threads_used(int64_t tasks) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    volatile double sink = 0;
    for (int64_t i = begin; i < end; ++i)
      for (int k = 0; k < 200000; ++k) sink = sink + k;
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

}  // namespace

TORCH_LIBRARY(kdkernels, m) {
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
  m.def("build_info() -> str", &build_info);
  m.def("parallel_threads_used(int tasks) -> int", &parallel_threads_used);
  // The CPU gradient buffers kept for reuse (csrc/cpu/cpu_alloc.h): release them / their size.
  m.def("release_cached_buffers() -> int", &release_cached_buffers);
  m.def("cached_buffer_bytes() -> int", &cached_buffer_bytes);
  // An uninitialised CPU tensor from those buffers (huge pages, reused after free).
  m.def("empty_cached(int[] size, ScalarType dtype) -> Tensor");
}

// A factory without tensor arguments: one kernel for every dispatch key (it only makes CPU tensors).
TORCH_LIBRARY_IMPL(kdkernels, CompositeExplicitAutograd, m) { m.impl("empty_cached", &empty_cached); }

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu);
  m.impl("kd_loss_fwd_inplace_", &kd_loss_fwd_inplace_cpu);
  m.impl("cakd_loss_fwd", &cakd_loss_fwd_cpu);
}

}  // namespace kdkernels

// Each ISA build is an importable module named by KDK_MODULE (e.g. _C_avx512); importing it
// loads the library and registers the ops above.
#define KDK_CONCAT2(a, b) a##b
#define KDK_CONCAT(a, b) KDK_CONCAT2(a, b)
extern "C" PyMODINIT_FUNC KDK_CONCAT(PyInit_, KDK_MODULE)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, KDK_STR(KDK_MODULE), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
