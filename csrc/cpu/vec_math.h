// SIMD overloads of the elementary functions used by csrc/include/kdkernels/divergence.h.
// Included before that header so that its templates see them when instantiated with
// at::vec::Vectorized<float>.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
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

// c_n x^n + ... + c_1 x + c_0 by Horner's rule in fused multiply-adds, the coefficients given from
// the highest degree down.
template <class... Lower>
KD_ALWAYS_INLINE Vec horner(Vec x, float highest, Lower... lower) {
  Vec acc(highest);
  ((acc = at::vec::fmadd(acc, x, Vec(static_cast<float>(lower)))), ...);
  return acc;
}

inline Vec kd_exp(Vec x) { return x.exp(); }
// log(x) inlined (at::vec's log is an out-of-line call per vector), within 1.2 ulp. log(0) = -inf,
// log(inf) = inf, NaN or a negative x give NaN. Denormal x are treated as 0 (-inf): no kernel
// produces them as an argument (exp_nonpositive flushes them).
// AVX512: x = 2^e m with m in [0.75, 1.5) (getexp / getmant), m split by its top four mantissa
// bits into 16 intervals, each with a float c close to 1 / (its centre) and -log(c) as two floats
// from tables (one permute each): log x = e ln2 - log(c) + log1p(m c - 1), where m c - 1 (one
// FMA, so exact to its own rounding) is at most 1/16 in size and its log1p a short polynomial.
// The two intervals around 1 have c = 1, so log x near 1 is log1p of the exact m - 1.
// AVX2: the same in tables of eight (below). Elsewhere: m in [sqrt(1/2), sqrt(2)) and log1p(m - 1)
// by the Cephes logf polynomial (~1 ulp).
KD_ALWAYS_INLINE Vec log_inline(Vec x) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 xv = x;
  const __m512 m = _mm512_getmant_ps(xv, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan);  // NaN for x < 0
  const __m512 e = _mm512_sub_ps(_mm512_getexp_ps(xv), _mm512_getexp_ps(m));
  // top four mantissa bits: 0-7 for m in [1, 1.5) (intervals of 1/16), 8-15 for [0.75, 1) (of 1/32)
  const __m512i interval = _mm512_srli_epi32(_mm512_castps_si512(m), 19);
  const __m512 c = _mm512_permutexvar_ps(
      interval, _mm512_setr_ps(1.0f, 0.9142857193946838f, 0.8648648858070374f, 0.8205128312110901f,
                               0.7804877758026123f, 0.7441860437393188f, 0.7111111283302307f, 0.6808510422706604f,
                               1.3061224222183228f, 1.2549020051956177f, 1.2075471878051758f, 1.163636326789856f,
                               1.1228070259094238f, 1.0847457647323608f, 1.049180269241333f, 1.0f));
  const __m512 minus_log_c = _mm512_permutexvar_ps(
      interval, _mm512_setr_ps(0.0f, 0.08961215615272522f, 0.14518198370933533f, 0.19782572984695435f,
                               0.24783620238304138f, 0.2954642176628113f, 0.34092655777931213f, 0.3844117224216461f,
                               -0.2670627534389496f, -0.22705748677253723f, -0.18859118223190308f,
                               -0.15154986083507538f, -0.11583182215690613f, -0.08134564012289047f,
                               -0.04800916463136673f, 0.0f));
  // -log(c) - minus_log_c: a second float, so that -log(c) adds without its rounding
  const __m512 minus_log_c_lo = _mm512_permutexvar_ps(
      interval, _mm512_setr_ps(0.0f, -3.050973473861518e-09f, 1.9207759827111204e-09f, 4.4444958824385594e-10f,
                               -1.2255564341145941e-09f, -1.0436851383133217e-09f, 4.976894452113356e-09f,
                               8.15365375217425e-09f, -1.1320999249164743e-08f, 7.46933959128171e-10f,
                               -2.476808091955718e-09f, -5.627157406706829e-09f, -8.187961419992007e-10f,
                               -1.1937071331402649e-09f, 1.324362175481042e-09f, 0.0f));
  const __m512 r = _mm512_fmsub_ps(m, c, _mm512_set1_ps(1.f));
  // log1p(r) = r + r^2 (-1/2 + r/3 - r^2/4 + r^3/5 - r^4/6), |r| <= 1/16: the rest is below 1e-8 r
  const __m512 poly = horner(Vec(r), -1.f / 6.f, 0.2f, -0.25f, 1.f / 3.f, -0.5f);
  const __m512 log1p_r = _mm512_fmadd_ps(_mm512_mul_ps(r, r), poly, _mm512_add_ps(r, minus_log_c_lo));
  // e ln2 in one rounding: float(ln2)'s error, 2e-9 |e|, stays below 0.1 ulp of a result that is
  // at least 0.28 |e| in size
  const __m512 result = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147182464599609375f), _mm512_add_ps(minus_log_c, log1p_r));
  // 0 <= x < the smallest normal: -inf (getexp / getmant do not give it)
  const __mmask16 tiny = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(xv, _mm512_setzero_ps(), _CMP_GE_OQ), xv,
                                                 _mm512_set1_ps(std::numeric_limits<float>::min()), _CMP_LT_OQ);
  return Vec(_mm512_mask_mov_ps(result, tiny, _mm512_set1_ps(-kInf)));
#elif defined(CPU_CAPABILITY_AVX2)
  // The same scheme in 8-entry tables (one 8-lane permute each). x = 2^e m with m in
  // [0.71875, 1.4375) from the bits: b = bits(x) - bits(0.71875), e = b >> 23, and b's next three
  // bits (bits 20-22, which the permute reads by itself) index eight intervals of 2^20 bit
  // patterns: four of 1/16 below 1, [0.96875, 1.0625) around 1 with c = 1, three of 1/8 above.
  // |m c - 1| <= 1/16 in each, so the AVX512 polynomial applies unchanged.
  const __m256 xv = x;
  const __m256i b = _mm256_sub_epi32(_mm256_castps_si256(xv), _mm256_set1_epi32(0x3F380000));
  const __m256i e_bits = _mm256_srai_epi32(b, 23);
  const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_castps_si256(xv), _mm256_slli_epi32(e_bits, 23)));
  const __m256i interval = _mm256_srli_epi32(b, 20);
  const __m256 c = _mm256_permutevar8x32_ps(
      _mm256_setr_ps(1.3333333730697632f, 1.2307692766189575f, 1.1428571939468384f, 1.0666667222976685f, 1.0f,
                     0.8888888955116272f, 0.800000011920929f, 0.7272727489471436f),
      interval);
  const __m256 minus_log_c = _mm256_permutevar8x32_ps(
      _mm256_setr_ps(-0.28768211603164673f, -0.2076393961906433f, -0.13353143632411957f, -0.06453857570886612f,
                     0.0f, 0.11778302490711212f, 0.2231435328722f, 0.31845369935035706f),
      interval);
  const __m256 minus_log_c_lo = _mm256_permutevar8x32_ps(
      _mm256_setr_ps(1.3777543550475002e-08f, -5.840503636278527e-09f, -1.0038856412819541e-09f,
                     2.4172321921867024e-09f, 0.0f, 3.2986906539633765e-09f, 3.540848725336332e-09f,
                     1.9658554784030002e-09f),
      interval);
  const __m256 r = _mm256_fmsub_ps(m, c, _mm256_set1_ps(1.f));
  const __m256 poly = horner(Vec(r), -1.f / 6.f, 0.2f, -0.25f, 1.f / 3.f, -0.5f);
  // -log(c) + r with its rounding error (Fast2Sum: |-log(c)| >= |r| wherever c != 1), which joins
  // the small rest, so the sum of the larger terms rounds once, at the end
  const __m256 hi = _mm256_add_ps(minus_log_c, r);
  const __m256 hi_err = _mm256_add_ps(_mm256_sub_ps(minus_log_c, hi), r);
  const __m256 rest = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(r, r), poly, minus_log_c_lo), hi_err);
  __m256 result = _mm256_fmadd_ps(_mm256_cvtepi32_ps(e_bits), _mm256_set1_ps(0.693147182464599609375f),
                                  _mm256_add_ps(hi, rest));
  // x below the smallest normal (0 and negatives included), +inf and NaN: rare, one test for all
  const __m256 special = _mm256_or_ps(_mm256_cmp_ps(xv, _mm256_set1_ps(std::numeric_limits<float>::min()), _CMP_NGE_UQ),
                                      _mm256_cmp_ps(xv, _mm256_set1_ps(kInf), _CMP_EQ_OQ));
  if (__builtin_expect(_mm256_movemask_ps(special) != 0, 0)) {
    result = _mm256_blendv_ps(result, _mm256_set1_ps(-kInf),
                              _mm256_cmp_ps(xv, _mm256_set1_ps(std::numeric_limits<float>::min()), _CMP_LT_OQ));
    result = _mm256_blendv_ps(result, xv, _mm256_cmp_ps(xv, _mm256_set1_ps(kInf), _CMP_EQ_OQ));
    result = _mm256_blendv_ps(result, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                              _mm256_cmp_ps(xv, _mm256_setzero_ps(), _CMP_NGE_UQ));
  }
  return Vec(result);
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
  const Vec z = f * f;
  const Vec poly = horner(f, 7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f,
                          1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f,
                          3.3333331174e-1f);
  Vec y = poly * f * z;
  y = at::vec::fmadd(ev, Vec(-2.12194440e-4f), y);
  y = at::vec::fmadd(z, Vec(-0.5f), y);
  const Vec result = at::vec::fmadd(ev, Vec(0.693359375f), f + y);
  Vec out = Vec::blendv(result, Vec(-kInf), x < Vec(std::numeric_limits<float>::min()));
  out = Vec::blendv(out, Vec(kInf), x == Vec(kInf));
  return Vec::blendv(out, Vec(std::numeric_limits<float>::quiet_NaN()), (x < Vec(0.f)) | (x != x));
#endif
}
inline Vec kd_log(Vec x) { return log_inline(x); }

// Lane-wise min (kMax false) or max, and kd_where_gt, in one mask-register instruction where the
// ISA has it (at::vec's minimum and maximum add NaN propagation and its comparisons widen masks
// into vectors: three extra instructions each, in the divergences' inner loops). Where a lane of
// `a` is NaN, the min or max gives b's lane (the portable fallback propagates the NaN).
template <bool kMax>
KD_ALWAYS_INLINE Vec min_or_max_unordered(Vec a, Vec b) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(kMax ? _mm512_max_ps(a, b) : _mm512_min_ps(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(kMax ? _mm256_max_ps(a, b) : _mm256_min_ps(a, b));
#else
  return kMax ? at::vec::maximum(a, b) : at::vec::minimum(a, b);
#endif
}
inline Vec kd_min(Vec a, Vec b) { return min_or_max_unordered<false>(a, b); }
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
#if defined(CPU_CAPABILITY_AVX2)
// value where prob > 0, else 0 (divergence.h's kd_if_pos): a compare and an AND, where the blend
// with 0 compiles to three instructions (GCC rebuilds the mask from its sign bits)
KD_ALWAYS_INLINE Vec kd_if_pos(Vec prob, Vec value) {
  return Vec(_mm256_and_ps(value, _mm256_cmp_ps(prob, _mm256_setzero_ps(), _CMP_GT_OQ)));
}
#endif

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
// denormal probabilities, whose mixtures (0.5 * p) would round to 0 beside a nonzero p. Positive
// x are exact too (CAKD's top-k pass takes some exps above their shift), and beyond the float
// range give +inf.
KD_ALWAYS_INLINE Vec exp_nonpositive(Vec x) {
  // max(lowest, x) keeps a NaN x (NaN in, NaN out). On AVX512 the clamp, the scaling and the
  // final select are single mask-register instructions: at::vec's maximum and comparisons widen
  // masks to vectors and back, a third of the instructions here otherwise.
  const Vec lowest(-87.33654f);
#if defined(CPU_CAPABILITY_AVX512)
  const Vec xc(_mm512_max_ps(lowest, x));
#else
  // capped above where 2^n is +inf (n = 128), not an exponent field that overflows
  const Vec xc = at::vec::minimum(at::vec::maximum(x, lowest), Vec(88.8f));
#endif
  const Vec n = (xc * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), xc);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  const Vec poly = horner(r, 1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                          1.6666665459e-1f, 5.0000001201e-1f);
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

// exp(d / T) for d = x - shift, the statistics passes' exps, in fewer instructions than
// exp_nonpositive(d * (1 / T)) and more accurately (within 0.7 ulp). AVX512: d / T = k ln2 + r
// with k a multiple of 1/16 (rounded by adding 1.5 * 2^19, whose ulp is 1/16, so that the sum's
// low four mantissa bits index a table of 2^(j/16)), r = (d - k (T ln2)) / T with T ln2 split in
// two floats, the first short enough that k times it is exact, and |r| <= ln2 / 32, where
// e^r - 1 = r + r^2/2 + r^3/6 leaves out less than 1e-8 relative. The 1/T goes into the
// polynomial's coefficients. The result is 2^floor(k) 2^(j/16) (1 + (e^r - 1)), 2^(j/16) from
// a table of two floats (its remainder added as the polynomial's constant term): 12 vector
// instructions, within 0.7 ulp of exp(d * inv_t). Like exp_nonpositive, results below the normal
// range are exactly 0 (-inf and masked lanes included) and NaN stays NaN. Above 0: with kCapped,
// d / T beyond the float range gives +inf (CAKD's one-pass road checks its sums for it); without
// it, d / T must stay below 2^17 for a defined result (the one-loop statistics pass discards the
// exps of a block whose max lies far above its shift).
// AVX2: the same scheme with k a multiple of 1/8 (one 8-entry permute per table), |r| <= ln2 / 16
// and a quartic (the rest below 2e-9 relative), 2^floor(k) built from k's exponent bits and
// multiplied in (no scalef): 16 instructions where exp_nonpositive(d * (1 / T)) takes about 27.
struct ExpScale {
  float inv_t;
#if defined(CPU_CAPABILITY_AVX512)
  __m512 to_k, t_ln2_hi, t_ln2_lo, c1, c2, c3, cap;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 to_k, t_ln2_hi, t_ln2_lo, c1, c2, c3, c4, cap;
#endif
  explicit ExpScale(float inv_temperature) : inv_t(inv_temperature) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const double inv = inv_temperature, t_ln2 = 0.693147180559945309417 / inv;
    int e = 0;
    const double mantissa = std::frexp(t_ln2, &e);
    const double hi = std::ldexp(std::nearbyint(std::ldexp(mantissa, 11)), e - 11);  // 11 bits
#if defined(CPU_CAPABILITY_AVX512)
    auto splat = [](double v) { return _mm512_set1_ps(static_cast<float>(v)); };
#else
    auto splat = [](double v) { return _mm256_set1_ps(static_cast<float>(v)); };
    c4 = splat(inv * inv * inv * inv / 24);
#endif
    to_k = splat(1.44269504088896340736 * inv);
    t_ln2_hi = splat(hi);
    t_ln2_lo = splat(t_ln2 - hi);
    c1 = splat(inv);
    c2 = splat(inv * inv / 2);
    c3 = splat(inv * inv * inv / 6);
    cap = splat(89.0 / inv);  // exp(89) is beyond the float range
#endif
  }
};

template <bool kCapped = false>
KD_ALWAYS_INLINE Vec exp_scaled(Vec d, const ExpScale& scale) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 dv = d;
  if constexpr (kCapped) dv = _mm512_min_ps(scale.cap, dv);  // keeps a NaN d (the second operand)
  const __m512 magic = _mm512_set1_ps(786432.f);  // 1.5 * 2^19
  const __m512 kb = _mm512_fmadd_ps(dv, scale.to_k, magic);
  const __m512 k = _mm512_sub_ps(kb, magic);
  __m512 r = _mm512_fnmadd_ps(k, scale.t_ln2_hi, dv);
  r = _mm512_fnmadd_ps(k, scale.t_ln2_lo, r);
  // 2^(j/16), j = 0..15, as a float hi and its relative remainder lo = 2^(j/16) / hi - 1 (one
  // rounded float would give each sixteenth its own bias, which a sum of many exps keeps),
  // indexed by kb's low four bits (k's sixteenths)
  const __m512i j = _mm512_castps_si512(kb);
  const __m512 pow2_hi = _mm512_permutexvar_ps(
      j, _mm512_setr_ps(1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f, 1.1892070770263672f,
                        1.2418577671051025f, 1.2968395948410034f, 1.3542555570602417f, 1.4142135381698608f,
                        1.4768261909484863f, 1.5422108173370361f, 1.610490322113037f, 1.6817928552627563f,
                        1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f));
  const __m512 pow2_rel_lo = _mm512_permutexvar_ps(
      j, _mm512_setr_ps(0.0f, 4.6285471455576044e-08f, -1.199215748926008e-08f, 4.7297824323777604e-08f,
                        3.1934181521364735e-08f, 3.621057231839586e-08f, -3.0990719324108795e-08f,
                        -7.475213337215791e-09f, 1.7114270889351246e-08f, -3.047683350132502e-08f,
                        5.233334210430485e-09f, 6.10759176566944e-09f, -1.4719605090363075e-08f,
                        -5.258795177098818e-09f, -6.128259677495862e-09f, 5.140609271592211e-09f));
  // lo + (e^r - 1), the remainder as the cubic's constant term: hi (1 + lo) e^r = hi (1 + lo +
  // (e^r - 1)) up to lo (e^r - 1), below 1e-9 relative; then one rounding at the end
  const __m512 tail =
      _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(scale.c3, r, scale.c2), r, scale.c1), r, pow2_rel_lo);
  const __m512 mantissa = _mm512_fmadd_ps(pow2_hi, tail, pow2_hi);
  // k > -126 keeps the result normal (2^(j/16) e^r >= 2^(1/16) e^(-ln2/32) > 1 there); NaN kept
  return Vec(_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(k, _mm512_set1_ps(-126.f), _CMP_NLE_UQ), mantissa, k));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 dv = d;
  if constexpr (kCapped) dv = _mm256_min_ps(scale.cap, dv);  // keeps a NaN d (the second operand)
  // 1.5 * 2^20 (whose ulp is 1/8) plus 127: kb's bits are those of 1.5 * 2^20 plus 8 (k + 127),
  // so bits >> 3 end in floor(k) + 127 (1.5 * 2^20's part ends in nine zero bits) and the low three
  // bits are k's eighths
  const __m256 magic = _mm256_set1_ps(1572991.f);
  const __m256 kb = _mm256_fmadd_ps(dv, scale.to_k, magic);
  const __m256 k = _mm256_sub_ps(kb, magic);
  __m256 r = _mm256_fnmadd_ps(k, scale.t_ln2_hi, dv);
  r = _mm256_fnmadd_ps(k, scale.t_ln2_lo, r);
  // 2^(j/8), j = 0..7 (kb's low three bits), as hi and its relative remainder lo
  const __m256i kbits = _mm256_castps_si256(kb);
  const __m256 pow2_hi = _mm256_permutevar8x32_ps(
      _mm256_setr_ps(1.0f, 1.0905077457427979f, 1.1892070770263672f, 1.2968395948410034f, 1.4142135381698608f,
                     1.5422108173370361f, 1.6817928552627563f, 1.8340080976486206f),
      kbits);
  const __m256 pow2_rel_lo = _mm256_permutevar8x32_ps(
      _mm256_setr_ps(0.0f, -1.199215748926008e-08f, 3.1934181521364735e-08f, -3.0990719324108795e-08f,
                     1.7114270889351246e-08f, 5.233334210430485e-09f, -1.4719605090363075e-08f,
                     -6.128259677495862e-09f),
      kbits);
  const __m256 tail = _mm256_fmadd_ps(
      _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_fmadd_ps(scale.c4, r, scale.c3), r, scale.c2), r, scale.c1), r,
      pow2_rel_lo);
  const __m256 mantissa = _mm256_fmadd_ps(pow2_hi, tail, pow2_hi);
  // (bits >> 3) << 23 is the float 2^floor(k) for floor(k) in [-126, 127], +inf at 128 (the
  // capped overflow); a product keeps a NaN mantissa NaN
  const __m256 result =
      _mm256_mul_ps(mantissa, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(kbits, 3), 23)));
  // k > -126 keeps the result normal; 0 below (masked -inf lanes included), NaN kept
  return Vec(_mm256_and_ps(result, _mm256_cmp_ps(k, _mm256_set1_ps(-126.f), _CMP_NLE_UQ)));
#else
  return exp_nonpositive(d * Vec(scale.inv_t));
#endif
}

// Lane-wise max in one instruction, without at::vec::maximum's NaN propagation (a NaN lane may be
// dropped): for loops that find NaN another way (stats_block: the exps of a NaN are NaN).
KD_ALWAYS_INLINE Vec max_unordered(Vec a, Vec b) { return min_or_max_unordered<true>(a, b); }

// Stores a full vector to `dst` bypassing the caches when the address allows it. The gradient is
// written once and not read again by the kernel, so streaming stores save the read-for-ownership
// of every destination line (a quarter of the kernel's memory traffic). Call stream_fence()
// before the written memory is handed to another thread.
template <typename VecT>
KD_ALWAYS_INLINE void store_streaming(const VecT& v, void* dst) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // a native register's bytes (a float vector, or a 16-bit one of twice the lanes) to an aligned address
  if (sizeof(VecT) == sizeof(Vec) && reinterpret_cast<uintptr_t>(dst) % sizeof(Vec) == 0) {
    const Vec bits = at::vec::cast<float>(v);
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_ps(static_cast<float*>(dst), bits);
#else
    _mm256_stream_ps(static_cast<float*>(dst), bits);
#endif
    return;
  }
#endif
  v.store(dst);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace kdkernels
