#include "cpu_alloc.h"

#include <sys/mman.h>

#include <cstdint>

namespace kdkernels {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinBytes = size_t{8} << 20;  // below this the default allocator is as fast
}  // namespace

at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinBytes) return at::empty(sizes, options);
  // Over-map by one huge page so the tensor can start on a 2 MB boundary.
  const size_t mapped = bytes + kHugePage;
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return at::empty(sizes, options);
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(kHugePage - 1);
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
  return at::from_blob(
      reinterpret_cast<void*>(aligned), sizes,
      [base, mapped](void*) { munmap(base, mapped); }, options);
}

}  // namespace kdkernels
