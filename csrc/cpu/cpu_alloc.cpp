#include "cpu_alloc.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace kdkernels {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinBytes = size_t{8} << 20;  // below this the default allocator is as fast
constexpr size_t kMaxCached = 4;               // mappings kept for reuse

struct Mapping {
  void* base;
  size_t mapped;
};

// Freed gradient (and fused-linear chunk) mappings kept for the next call. A training loop asks
// for the same [N, V] gradient every step; a mapping whose pages are already resident costs no
// page faults and no kernel zeroing (for 512 MB, a sizeable share of the fused kernel's own time).
class BufferCache {
 public:
  BufferCache() {
    const char* flag = std::getenv("KDKERNELS_CPU_BUFFER_CACHE");
    enabled_ = !(flag && std::strcmp(flag, "0") == 0);
  }

  // The smallest cached mapping of at least `mapped` bytes and at most twice that, or {nullptr, 0}.
  Mapping take(size_t mapped) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      const size_t size = free_[i].mapped;
      if (size >= mapped && size <= 2 * mapped && (best == free_.size() || size < free_[best].mapped)) best = i;
    }
    if (best == free_.size()) return {nullptr, 0};
    const Mapping found = free_[best];
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    return found;
  }

  // Keeps a freed mapping (dropping the oldest beyond kMaxCached) or unmaps it when disabled.
  void give(Mapping m) {
    Mapping evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!enabled_) {
        evicted = m;
      } else {
        free_.push_back(m);
        if (free_.size() > kMaxCached) {
          evicted = free_.front();
          free_.erase(free_.begin());
        }
      }
    }
    if (evicted.base) munmap(evicted.base, evicted.mapped);
  }

  int64_t release() {
    std::vector<Mapping> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      dropped.swap(free_);
    }
    int64_t bytes = 0;
    for (const Mapping& m : dropped) {
      munmap(m.base, m.mapped);
      bytes += static_cast<int64_t>(m.mapped);
    }
    return bytes;
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t bytes = 0;
    for (const Mapping& m : free_) bytes += static_cast<int64_t>(m.mapped);
    return bytes;
  }

 private:
  std::mutex mu_;
  std::vector<Mapping> free_;
  bool enabled_ = true;
};

// Never destroyed: tensors freed during interpreter shutdown still hand their mapping back.
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

Mapping map_huge(size_t mapped) {
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return {nullptr, 0};
  // Only whole huge pages inside the mapping can be backed by huge pages.
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(kHugePage - 1);
  madvise(reinterpret_cast<void*>(aligned), mapped - (aligned - reinterpret_cast<uintptr_t>(base)), MADV_HUGEPAGE);
  return {base, mapped};
}
}  // namespace

at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinBytes) return at::empty(sizes, options);
  // Over-map by one huge page so the tensor can start on a 2 MB boundary; round to whole huge
  // pages so that nearby sizes share cached mappings.
  const size_t mapped = (bytes + 2 * kHugePage - 1) & ~(kHugePage - 1);
  Mapping m = cache().take(mapped);
  if (!m.base) m = map_huge(mapped);
  if (!m.base) return at::empty(sizes, options);
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(m.base) + kHugePage - 1) & ~(kHugePage - 1);
  return at::from_blob(
      reinterpret_cast<void*>(aligned), sizes, [m](void*) { cache().give(m); }, options);
}

at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype) {
  return empty_huge_pages(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

int64_t release_cached_buffers() { return cache().release(); }

int64_t cached_buffer_bytes() { return cache().cached_bytes(); }

}  // namespace kdkernels
