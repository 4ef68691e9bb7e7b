// Makes each ISA build an importable module named by KDK_MODULE (e.g. _C_avx512): importing it
// loads the library, which registers the schemas (csrc/ops.cpp) and the CPU kernels (each kernel
// file registers its own ops), and registers here the ops without tensor arguments.
#include "build_info.h"
#include "cpu_alloc.h"

#include <Python.h>
#include <torch/library.h>

namespace kdkernels {

// Ops without tensor arguments: one kernel for every dispatch key.
TORCH_LIBRARY_IMPL(kdkernels, CompositeExplicitAutograd, m) {
  m.impl("empty_cached", &empty_cached);
  m.impl("release_cached_buffers", &release_cached_buffers);
  m.impl("cached_buffer_bytes", &cached_buffer_bytes);
  m.impl("build_info", &build_info);
  m.impl("parallel_threads_used", &parallel_threads_used);
}

}  // namespace kdkernels

#define KDK_STR2(x) #x
#define KDK_STR(x) KDK_STR2(x)
#define KDK_CONCAT2(a, b) a##b
#define KDK_CONCAT(a, b) KDK_CONCAT2(a, b)
extern "C" PyMODINIT_FUNC KDK_CONCAT(PyInit_, KDK_MODULE)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, KDK_STR(KDK_MODULE), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
