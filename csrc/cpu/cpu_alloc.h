// Large CPU outputs backed by transparent huge pages.
//
// A fresh multi-hundred-MB tensor pays one page fault per 4 KB page on first touch (~95 ms for
// 512 MB on the reference machine); with 2 MB pages that cost drops ~4x. The default allocator
// only asks for huge pages when THP_MEM_ALLOC_ENABLE=1 is set process-wide, so the gradient
// buffers the kernels write are mapped here directly with madvise(MADV_HUGEPAGE).
#pragma once

#include <ATen/ATen.h>

namespace kdkernels {

at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace kdkernels
