// SIMD overloads of the elementary functions used by csrc/include/kdkernels/divergence.h.
// Included before that header so that its templates see them when instantiated with
// at::vec::Vectorized<float>.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

// For the small per-vector helpers of the row loops: a call per vector (arguments spilled to
// the stack) costs as much as the helper itself, and GCC stops inlining inside large kernels.
#define KD_ALWAYS_INLINE inline __attribute__((always_inline))

namespace kdkernels {

using Vec = at::vec::Vectorized<float>;

inline Vec kd_exp(Vec x) { return x.exp(); }
inline Vec kd_log(Vec x) { return x.log(); }
inline Vec kd_min(Vec a, Vec b) { return at::vec::minimum(a, b); }
inline Vec kd_abs(Vec x) { return x.abs(); }
inline Vec kd_where_gt(Vec a, Vec b, Vec x, Vec y) { return Vec::blendv(y, x, a > b); }
inline Vec kd_splat(float v, Vec) { return Vec(v); }

// exp(x) for x <= 0: the softmax exps after max subtraction. Cody-Waite range reduction
// x = n ln2 + r and a degree-5 polynomial for e^r (the Cephes expf scheme, ~1 ulp like Sleef's
// u10 variant) but inlined, which makes the statistics pass cheaper. Arguments whose exp is
// below the normal float range (x < -87.3, and -inf for masked entries) give exactly 0: no
// denormal probabilities, whose mixtures (0.5 * p) would round to 0 beside a nonzero p.
KD_ALWAYS_INLINE Vec exp_nonpositive(Vec x) {
  const Vec lowest(-87.33654f);
  const Vec xc = at::vec::maximum(x, lowest);
  const Vec n = (xc * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), xc);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec poly = Vec(1.9875691500e-4f);
  poly = at::vec::fmadd(poly, r, Vec(1.3981999507e-3f));
  poly = at::vec::fmadd(poly, r, Vec(8.3334519073e-3f));
  poly = at::vec::fmadd(poly, r, Vec(4.1665795894e-2f));
  poly = at::vec::fmadd(poly, r, Vec(1.6666665459e-1f));
  poly = at::vec::fmadd(poly, r, Vec(5.0000001201e-1f));
  const Vec e_r = at::vec::fmadd(poly, r * r, r + Vec(1.f));
#if defined(CPU_CAPABILITY_AVX512)
  const Vec scaled(_mm512_scalef_ps(e_r, n));  // e_r * 2^n in one instruction, exact
#else
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec biased = at::vec::convert_to_int_of_same_size(n) + IVec(127);
  const Vec scaled = e_r * at::vec::cast<float>(biased * IVec(1 << 23));
#endif
  return Vec::blendv(scaled, Vec(0.f), x < lowest);
}

// Stores a full vector to `dst` bypassing the caches when the address allows it. The gradient is
// written once and not read again by the kernel, so streaming stores save the read-for-ownership
// of every destination line (a quarter of the kernel's memory traffic). Call stream_fence()
// before the written memory is handed to another thread.
template <typename VecT>
KD_ALWAYS_INLINE void store_streaming(const VecT& v, void* dst) {
  const bool aligned = (reinterpret_cast<uintptr_t>(dst) % sizeof(VecT)) == 0;
#if defined(CPU_CAPABILITY_AVX512)
  if (aligned && sizeof(VecT) == 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_castps_si512(at::vec::cast<float>(v)));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (aligned && sizeof(VecT) == 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_castps_si256(at::vec::cast<float>(v)));
    return;
  }
#endif
  (void)aligned;
  v.store(dst);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace kdkernels
