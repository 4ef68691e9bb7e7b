// Large CPU outputs backed by transparent huge pages.
//
// A fresh multi-hundred-MB tensor pays one page fault per 4 KB page on first touch (tens of ms
// for 512 MB, comparable to the loss itself); with 2 MB pages that cost drops ~4x. The default allocator
// only asks for huge pages when THP_MEM_ALLOC_ENABLE=1 is set process-wide, so the gradient
// buffers the kernels write are mapped by this allocator directly with madvise(MADV_HUGEPAGE). A freed
// buffer's mapping is reused by the next call of the same size, whose pages are then resident.
#pragma once

#include <ATen/ATen.h>

namespace kdkernels {

// An uninitialised tensor; from 8 MB up, mapped with MADV_HUGEPAGE, and on free its mapping is
// kept (up to four, KDKERNELS_CPU_BUFFER_CACHE=0 disables it) for the next call of the same size.
at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

// The op kdkernels::empty_cached: empty_huge_pages for Python callers (fused-linear buffers).
at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype);

// Unmaps the kept mappings; returns their bytes.
int64_t release_cached_buffers();
// Bytes currently kept.
int64_t cached_buffer_bytes();

}  // namespace kdkernels
