// out = beta * out + alpha * mat1 @ mat2 with bfloat16 (or float16) matrices and a float32 `out`:
// one GEMM that reads the 16-bit operands, accumulates in float32 and writes float32. A 16-bit
// lm_head's float32 weight-gradient accumulator needs exactly that, once per chunk of tokens; CPU
// torch has no such matmul (its bf16 matmul rounds its output to bf16, and a float32 matmul of
// widened copies runs at a third of the speed). The MKL that x86 CPU builds of torch link exports
// one (cblas_gemm_bf16bf16f32, cblas_gemm_f16f16f32, LP64). It is declared weak here: a torch
// without it leaves the pointers null, widening_gemm_available() says so, and the caller keeps
// its float32-copy path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

extern "C" {
// cblas enums and MKL_INT (int in the LP64 interface) written out: no MKL header is needed
void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                          int ldc) __attribute__((weak));
}

namespace kdkernels {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

using WideningGemm = decltype(&cblas_gemm_bf16bf16f32);

WideningGemm widening_gemm_for(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return cblas_gemm_bf16bf16f32;
  if (dtype == at::kHalf) return cblas_gemm_f16f16f32;
  return nullptr;
}

bool widening_gemm_available(at::ScalarType dtype) { return widening_gemm_for(dtype) != nullptr; }

// A [rows, cols] matrix as BLAS sees it in row-major layout: itself with leading dimension
// stride(0), or the transpose of a row-major [cols, rows] matrix with leading dimension stride(1);
// any other layout is copied to a contiguous one first.
struct Operand {
  at::Tensor tensor;
  int trans;
  int64_t ld;
};

Operand as_operand(const at::Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  if (x.stride(1) == 1 && x.stride(0) >= std::max<int64_t>(cols, 1)) return {x, kNoTrans, x.stride(0)};
  if (x.stride(0) == 1 && x.stride(1) >= std::max<int64_t>(rows, 1)) return {x, kTrans, x.stride(1)};
  return {x.contiguous(), kNoTrans, std::max<int64_t>(cols, 1)};
}

void addmm_widening_cpu(at::Tensor& out, const at::Tensor& mat1, const at::Tensor& mat2, double beta, double alpha) {
  TORCH_CHECK_VALUE(out.dim() == 2 && mat1.dim() == 2 && mat2.dim() == 2,
                    "addmm_widening_: out, mat1 and mat2 must be 2-D, got ", out.dim(), ", ", mat1.dim(), " and ",
                    mat2.dim(), " dimensions");
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "addmm_widening_: out must be float32, got ", out.scalar_type());
  TORCH_CHECK_TYPE(mat1.scalar_type() == mat2.scalar_type() && widening_gemm_for(mat1.scalar_type()) != nullptr,
                   "addmm_widening_: mat1 and mat2 must both be bfloat16 or both float16 with this torch's "
                   "widening GEMM available, got ", mat1.scalar_type(), " and ", mat2.scalar_type());
  const int64_t m = mat1.size(0), k = mat1.size(1), n = mat2.size(1);
  TORCH_CHECK_VALUE(mat2.size(0) == k && out.size(0) == m && out.size(1) == n, "addmm_widening_: shapes ",
                    mat1.sizes(), " @ ", mat2.sizes(), " do not give out's ", out.sizes());
  TORCH_CHECK_VALUE(out.stride(1) == 1 || n <= 1, "addmm_widening_: out must have unit stride along its columns");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS semantics: beta = 0 does not read out
    if (beta == 0.0) out.zero_(); else out.mul_(beta);
    return;
  }
  const Operand a = as_operand(mat1), b = as_operand(mat2);
  const int64_t ldc = std::max<int64_t>(out.stride(0), std::max<int64_t>(n, 1));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(std::max({m, n, k, a.ld, b.ld, ldc}) <= kIntMax,
                    "addmm_widening_: sizes and strides must fit a 32-bit int");
  widening_gemm_for(mat1.scalar_type())(
      kRowMajor, a.trans, b.trans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
      static_cast<float>(alpha), static_cast<const uint16_t*>(a.tensor.const_data_ptr()), static_cast<int>(a.ld),
      static_cast<const uint16_t*>(b.tensor.const_data_ptr()), static_cast<int>(b.ld), static_cast<float>(beta),
      out.mutable_data_ptr<float>(), static_cast<int>(ldc));
}

}  // namespace

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) { m.impl("addmm_widening_", &addmm_widening_cpu); }
TORCH_LIBRARY_IMPL(kdkernels, CompositeExplicitAutograd, m) {
  m.impl("widening_gemm_available", &widening_gemm_available);
}

}  // namespace kdkernels
