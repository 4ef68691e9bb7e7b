// What a CPU build is, for kdkernels.backend_info() and the build tests: its SIMD level, vector
// width and threading runtime, and a probe of how many threads at::parallel_for really uses.
#include "build_info.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <mutex>
#include <set>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kdkernels {

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

}  // namespace kdkernels
