// SIMD overloads of the elementary functions used by csrc/include/kdkernels/divergence.h.
// Included before that header so that its templates see them when instantiated with
// at::vec::Vectorized<float>.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace kdkernels {

using Vec = at::vec::Vectorized<float>;

inline Vec kd_exp(Vec x) { return x.exp(); }
inline Vec kd_log(Vec x) { return x.log(); }
inline Vec kd_log1p(Vec x) { return x.log1p(); }
inline Vec kd_abs(Vec x) { return x.abs(); }
inline Vec kd_max(Vec a, Vec b) { return at::vec::maximum(a, b); }
inline Vec kd_min(Vec a, Vec b) { return at::vec::minimum(a, b); }
inline Vec kd_where_gt(Vec a, Vec b, Vec x, Vec y) { return Vec::blendv(y, x, a > b); }
inline Vec kd_splat(float v, Vec) { return Vec(v); }

}  // namespace kdkernels
