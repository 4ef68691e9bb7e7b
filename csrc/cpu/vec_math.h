// SIMD overloads of the elementary functions used by csrc/include/kdkernels/divergence.h.
// Included before that header so that its templates see them when instantiated with
// at::vec::Vectorized<float>.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

// For the small per-vector helpers of the row loops: a call per vector (arguments spilled to
// the stack) costs as much as the helper itself, and GCC stops inlining inside large kernels.
#define KD_ALWAYS_INLINE inline __attribute__((always_inline))
// The same for a lambda, written after its parameter list.
#define KD_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

namespace kdkernels {

using Vec = at::vec::Vectorized<float>;

inline Vec kd_exp(Vec x) { return x.exp(); }
// log(x) inlined (at::vec's log is an out-of-line call per vector): x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), log x = e ln2 + log1p(m - 1), the log1p by the Cephes logf polynomial
// (~1 ulp) and ln2 split in two parts so that e ln2 adds exactly. log(0) = -inf, log(inf) = inf,
// NaN or a negative x give NaN. Denormal x are treated as 0 (-inf): no kernel produces them as
// an argument (exp_nonpositive flushes them).
KD_ALWAYS_INLINE Vec log_inline(Vec x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 xv = x;
  __m512 m = _mm512_getmant_ps(xv, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);  // [0.5, 1)
  __m512 e = _mm512_add_ps(_mm512_getexp_ps(xv), _mm512_set1_ps(1.f));
  const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  m = _mm512_mask_add_ps(m, small, m, m);
  e = _mm512_mask_sub_ps(e, small, e, _mm512_set1_ps(1.f));
  const Vec f = Vec(m) - Vec(1.f), ev(e);
#else
  // frexp by bits: x = 2^e m, m in [0.5, 1)
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec bits = at::vec::cast<int32_t>(x);
  const IVec exp_bits = (bits >> IVec(23)) & IVec(0xFF);
  Vec m = at::vec::cast<float>((bits & IVec(0x807FFFFF)) | IVec(0x3F000000));
  Vec ev = at::vec::convert_to_fp_of_same_size<float>(exp_bits - IVec(126));
  const Vec small = m < Vec(0.707106781186547524f);
  m = Vec::blendv(m, m + m, small);
  ev = Vec::blendv(ev, ev - Vec(1.f), small);
  const Vec f = m - Vec(1.f);
#endif
  const Vec z = f * f;
  Vec poly(7.0376836292e-2f);
  poly = at::vec::fmadd(poly, f, Vec(-1.1514610310e-1f));
  poly = at::vec::fmadd(poly, f, Vec(1.1676998740e-1f));
  poly = at::vec::fmadd(poly, f, Vec(-1.2420140846e-1f));
  poly = at::vec::fmadd(poly, f, Vec(1.4249322787e-1f));
  poly = at::vec::fmadd(poly, f, Vec(-1.6668057665e-1f));
  poly = at::vec::fmadd(poly, f, Vec(2.0000714765e-1f));
  poly = at::vec::fmadd(poly, f, Vec(-2.4999993993e-1f));
  poly = at::vec::fmadd(poly, f, Vec(3.3333331174e-1f));
  Vec y = poly * f * z;
  y = at::vec::fmadd(ev, Vec(-2.12194440e-4f), y);
  y = at::vec::fmadd(z, Vec(-0.5f), y);
  const Vec result = at::vec::fmadd(ev, Vec(0.693359375f), f + y);
  constexpr float kInf = std::numeric_limits<float>::infinity();
#if defined(CPU_CAPABILITY_AVX512)
  __m512 out = _mm512_mask_mov_ps(result, _mm512_cmp_ps_mask(xv, _mm512_set1_ps(std::numeric_limits<float>::min()), _CMP_LT_OQ),
                                  _mm512_set1_ps(-kInf));
  out = _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask(xv, _mm512_set1_ps(kInf), _CMP_EQ_OQ), _mm512_set1_ps(kInf));
  const __mmask16 invalid = _mm512_cmp_ps_mask(xv, _mm512_setzero_ps(), _CMP_NGE_UQ);  // x < 0 or NaN
  return Vec(_mm512_mask_mov_ps(out, invalid, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN())));
#else
  Vec out = Vec::blendv(result, Vec(-kInf), x < Vec(std::numeric_limits<float>::min()));
  out = Vec::blendv(out, Vec(kInf), x == Vec(kInf));
  return Vec::blendv(out, Vec(std::numeric_limits<float>::quiet_NaN()), (x < Vec(0.f)) | (x != x));
#endif
}
inline Vec kd_log(Vec x) { return log_inline(x); }

// kd_min and kd_where_gt in mask-register form where the ISA has it (at::vec's minimum adds NaN
// propagation and its comparisons widen masks into vectors: three extra instructions each, in
// the divergences' inner loops). kd_min(a, b) gives b where a is NaN.
inline Vec kd_min(Vec a, Vec b) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_min_ps(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_min_ps(a, b));
#else
  return at::vec::minimum(a, b);
#endif
}
inline Vec kd_abs(Vec x) { return x.abs(); }
inline Vec kd_where_gt(Vec a, Vec b, Vec x, Vec y) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ)));
#else
  return Vec::blendv(y, x, a > b);
#endif
}
inline Vec kd_splat(float v, Vec) { return Vec(v); }

// min(1 / x, 1e30) for x >= 0: the 14-bit hardware estimate, capped, and one Newton step
// (e (2 - x e)), ~1 ulp, in a few instructions where a division blocks its unit for several
// cycles. The cap before the step keeps x = 0 (or denormal) finite.
inline Vec kd_inverse_capped(Vec x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 xv = x, cap = _mm512_set1_ps(1e30f);
  const __m512 e = _mm512_min_ps(_mm512_rcp14_ps(xv), cap);
  return Vec(_mm512_min_ps(_mm512_mul_ps(e, _mm512_fnmadd_ps(xv, e, _mm512_set1_ps(2.f))), cap));
#else
  return kd_min(Vec(1.f) / x, Vec(1e30f));
#endif
}

// exp(x) for x <= 0: the softmax exps after max subtraction. Cody-Waite range reduction
// x = n ln2 + r and a degree-5 polynomial for e^r (the Cephes expf scheme, ~1 ulp like Sleef's
// u10 variant) but inlined, which makes the statistics pass cheaper. Arguments whose exp is
// below the normal float range (x < -87.3, and -inf for masked entries) give exactly 0: no
// denormal probabilities, whose mixtures (0.5 * p) would round to 0 beside a nonzero p.
KD_ALWAYS_INLINE Vec exp_nonpositive(Vec x) {
  // max(lowest, x) keeps a NaN x (NaN in, NaN out). On AVX512 the clamp, the scaling and the
  // final select are single mask-register instructions: at::vec's maximum and comparisons widen
  // masks to vectors and back, a third of the instructions here otherwise.
  const Vec lowest(-87.33654f);
#if defined(CPU_CAPABILITY_AVX512)
  const Vec xc(_mm512_max_ps(lowest, x));
#else
  const Vec xc = at::vec::maximum(x, lowest);
#endif
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
  // e_r * 2^n in one instruction, exact; 0 below the normal range
  return Vec(_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, lowest, _CMP_NLT_UQ), e_r, n));
#else
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec biased = at::vec::convert_to_int_of_same_size(n) + IVec(127);
  const Vec scaled = e_r * at::vec::cast<float>(biased * IVec(1 << 23));
  return Vec::blendv(scaled, Vec(0.f), x < lowest);
#endif
}

// Lane-wise max in one instruction, without at::vec::maximum's NaN propagation (a NaN lane may be
// dropped): for loops that find NaN another way (stats_block: the exps of a NaN are NaN).
KD_ALWAYS_INLINE Vec max_unordered(Vec a, Vec b) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_max_ps(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_max_ps(a, b));
#else
  return at::vec::maximum(a, b);
#endif
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
