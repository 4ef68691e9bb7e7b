// What a build of the CPU kernels is, for the build_info and parallel_threads_used ops (defined in
// build_info.cpp, registered in register.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace kdkernels {

// "isa=...;vector_width=...;threading=...;max_threads=..."
std::string build_info();

// Number of distinct OS threads that ran chunks of a parallel_for over `tasks` items: lets the
// tests check that the kernels' loop really runs on several threads.
int64_t parallel_threads_used(int64_t tasks);

}  // namespace kdkernels
