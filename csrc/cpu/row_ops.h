// Building blocks of the CPU row kernels (kd_loss_cpu.cpp, cakd_cpu.cpp): SIMD loads and
// reductions over a row, bf16/fp16 <-> fp32 row conversion, and the parallel loop over rows that
// handles ignored rows, label checks and the low-precision gradient.
#pragma once

#include "vec_math.h"

#include <kdkernels/divergence.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace kdkernels {

constexpr int64_t kW = Vec::size();
constexpr int64_t kBlock = 2048;  // elements per online-softmax block (8 KB of fp32: stays in L1)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// For a loop that computes from cache over a block while DRAM would idle: prefetches the entry one
// block ahead of x, so the next block's max loop (and at a row's last block, the thread's next row:
// its rows are consecutive) reads from cache. kLocality 2 fetches into L2, 3 into L1. Past the
// tensor's end this is harmless: a prefetch never faults.
template <int kLocality = 2, typename T>
KD_ALWAYS_INLINE void prefetch_block_ahead(const T* x) {
  __builtin_prefetch(x + kBlock, 0, kLocality);
}

// Loads n <= kW floats; missing lanes read as -inf, which every formula treats as masked.
KD_ALWAYS_INLINE Vec load_masked(const float* ptr, int64_t n) {
  if (n == kW) return Vec::loadu(ptr);
  return Vec::set(Vec(kNegInf), Vec::loadu(ptr, n), n);
}

// Calls body(i, n) for the vectors [i, i + n) of [begin, end): the full ones with n = kW, a constant
// the inlined body sees (no tail checks in its loads and stores), then the partial last one.
template <class Body>
KD_ALWAYS_INLINE void for_each_vec(int64_t begin, int64_t end, Body&& body) {
  int64_t i = begin;
  for (; i + kW <= end; i += kW) body(i, kW);
  if (i < end) body(i, end - i);
}

struct NoState {};  // for_each_vec's state for a loop that carries none

template <class Body, class State>
__attribute__((noinline)) State partial_vector(Body body, int64_t i, int64_t n, State state) {
  body(i, n, state);
  return state;
}

// for_each_vec for a hot loop whose body captures by value ([=]) and carries its running state
// (sums, maxima) in `state`, body(i, n, state): the loop works on a copy of the state that no
// pointer reaches, so it stays in registers across the loop's stores (a vector store may alias
// anything a pointer reaches: accumulators or pointers captured by reference are stored and
// reloaded around each one). The partial last vector runs out of line: inlined beside the loop,
// GCC merges the two bodies into one with a runtime length (a branch at every load and store).
template <class State, class Body>
KD_ALWAYS_INLINE void for_each_vec(int64_t begin, int64_t end, State& state, const Body& body) {
  State local = state;
  int64_t i = begin;
  for (; i + kW <= end; i += kW) body(i, kW, local);
  if (i < end) local = partial_vector(body, i, end - i, local);
  state = local;
}

inline float hsum(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += lanes[i];
  return s;
}

// A row sum of float vectors kept in double: up to kFold vectors add in float (cheap), then the
// partial sum is widened into double lanes, so the float rounding does not grow with the row (a
// plain float sum over a row is less accurate than eager PyTorch's cascade sums, visibly so for
// the KL at large T, where T^2 amplifies it). add() folds by itself; a loop that keeps its own
// float partial of at most kFold vectors hands it to add_partial(). A hot loop that adds one
// vector per step folds less often (a larger kFold) to keep the widening out of its way.
template <int64_t kFoldVectors = 8>
struct DoubleSum {
  static constexpr int64_t kFold = kFoldVectors;
  using VecD = at::vec::Vectorized<double>;
  VecD lo{0.0}, hi{0.0};
  Vec partial{0.f};
  int64_t count = 0;

  void add(const Vec& v) {
    partial = partial + v;
    if (++count == kFold) flush();
  }

  void add_partial(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 x = v;
    lo = lo + VecD(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
    hi = hi + VecD(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 x = v;
    lo = lo + VecD(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    hi = hi + VecD(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
#else
    alignas(64) float lanes[kW];
    alignas(64) double wide[kW];
    v.store(lanes);
    for (int64_t i = 0; i < kW; ++i) wide[i] = lanes[i];
    lo = lo + VecD::loadu(wide);
    hi = hi + VecD::loadu(wide + VecD::size());
#endif
  }

  double total() {
    flush();
    alignas(64) double lanes[2 * VecD::size()];
    lo.store(lanes);
    hi.store(lanes + VecD::size());
    double s = 0.0;
    for (int64_t i = 0; i < 2 * VecD::size(); ++i) s += lanes[i];
    return s;
  }

 private:
  void flush() {
    add_partial(partial);
    partial = Vec(0.f);
    count = 0;
  }
};

// ---- element access at fp32 over float, bf16 and fp16 rows -----------------------------------
// A kernel that reads its low-precision rows in place (kd_loss_cpu.cpp) widens each vector as it
// loads it and narrows each gradient vector as it stores it: no row-sized fp32 copies, so the
// passes over a row work from half the cache footprint. Rounding is round-to-nearest-even (NaN
// kept), the same as c10's conversions, so results equal a widen-then-narrow pass bit for bit.

// Loads n <= kW elements as floats; missing lanes read as -inf (masked).
template <typename T>
KD_ALWAYS_INLINE Vec load_row(const T* ptr, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return load_masked(ptr, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __mmask16 lanes = n == kW ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
    const __m256i raw = _mm256_maskz_loadu_epi16(lanes, ptr);
    __m512 x;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      x = _mm512_cvtph_ps(raw);
    }
    return n == kW ? Vec(x) : Vec(_mm512_mask_blend_ps(lanes, _mm512_set1_ps(kNegInf), x));
#elif defined(CPU_CAPABILITY_AVX2)
    // eight 16-bit elements; a partial vector through a zeroed copy (at::vec's partial loads of a
    // 16-lane Vectorized<T> go through such a copy at every vector, full ones included)
    __m128i raw;
    if (n == kW) {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr));
    } else {
      alignas(16) uint16_t lanes[kW] = {};
      std::memcpy(lanes, ptr, n * sizeof(T));
      raw = _mm_load_si128(reinterpret_cast<const __m128i*>(lanes));
    }
    __m256 x;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    } else {
      x = _mm256_cvtph_ps(raw);
    }
    return n == kW ? Vec(x) : Vec::set(Vec(kNegInf), Vec(x), n);
#else
    // at::vec's conversion of the first kW elements (its low half)
    const Vec x = std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(ptr, n)));
    return n == kW ? x : Vec::set(Vec(kNegInf), x, n);
#endif
  }
}

// Stores the first n <= kW lanes of v into ptr in its dtype; a full vector at an aligned address
// bypasses the caches when `stream` (call stream_fence() before handing the memory on).
template <typename T>
KD_ALWAYS_INLINE void store_row(const Vec& v, T* ptr, int64_t n, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kW && stream) {
      store_streaming(v, ptr);
    } else {
      v.store(ptr, n);
    }
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m256i packed;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m512 x = v;
      const __m512i bits = _mm512_castps_si512(x);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
      rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
      packed = _mm512_cvtepi32_epi16(rounded);
    } else {
      packed = _mm512_cvtps_ph(__m512(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (n != kW) {
      _mm256_mask_storeu_epi16(ptr, __mmask16((1u << n) - 1u), packed);
    } else if (stream && reinterpret_cast<uintptr_t>(ptr) % sizeof(packed) == 0) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(ptr), packed);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptr), packed);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    __m128i packed;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m256 x = v;
      const __m256i bits = _mm256_castps_si256(x);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
      rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0),
                                   _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
      // every lane is in [0, 0xFFFF]: the unsigned saturating pack keeps it
      packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    } else {
      packed = _mm256_cvtps_ph(__m256(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (n != kW) {
      alignas(16) uint16_t lanes[kW];
      _mm_store_si128(reinterpret_cast<__m128i*>(lanes), packed);
      std::memcpy(ptr, lanes, n * sizeof(T));
    } else if (stream && reinterpret_cast<uintptr_t>(ptr) % sizeof(packed) == 0) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(ptr), packed);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ptr), packed);
    }
#else
    (void)stream;
    at::vec::convert_from_float<T>(v, v).store(ptr, n);
#endif
  }
}

// g with `value` subtracted from lane `lane` (the CE term's -e_y on the label's entry, taken before
// the vector is stored so that entry is rounded once).
KD_ALWAYS_INLINE Vec minus_on_lane(const Vec& g, int64_t lane, float value) {
  alignas(64) float lanes[kW];
  g.store(lanes);
  lanes[lane] -= value;
  return Vec::loadu(lanes);
}

// Max that propagates NaN (so a NaN anywhere in the row is seen).
inline float hmax(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kW; ++i) m = (std::isnan(lanes[i]) || lanes[i] > m) ? lanes[i] : m;
  return m;
}

template <typename T>
inline float block_max(const T* x, int64_t n) {
  Vec m(kNegInf);
  for_each_vec(0, n, m, [=](int64_t i, int64_t len, Vec& acc) KD_ALWAYS_INLINE_LAMBDA {
    acc = at::vec::maximum(acc, load_row(x + i, len));
  });
  return hmax(m);
}

// True when any lane of a comparison result (all-ones or all-zeros lanes) is set.
inline bool any_lane(const Vec& mask) {
  constexpr int kAllZero = static_cast<int>((1ULL << kW) - 1);
  return mask.zero_mask() != kAllZero;
}

// Whether any lane has a > b (a NaN lane has not): one mask compare where the ISA has it.
KD_ALWAYS_INLINE bool any_gt(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0;
#else
  return any_lane(a > b);
#endif
}

// The lanes where a > b does not hold (NaN lanes included), from one compare: a mask register on
// AVX512 (each masked add / max one instruction), a vector of all-ones lanes elsewhere.
struct NotAbove {
#if defined(CPU_CAPABILITY_AVX512)
  __mmask16 lanes;
  KD_ALWAYS_INLINE NotAbove(const Vec& a, const Vec& b) : lanes(_mm512_cmp_ps_mask(a, b, _CMP_NGT_UQ)) {}
  KD_ALWAYS_INLINE bool all() const { return lanes == __mmask16(0xFFFF); }
  // acc + x, max(acc, x) on these lanes, acc on the others
  KD_ALWAYS_INLINE Vec add(const Vec& acc, const Vec& x) const { return Vec(_mm512_mask_add_ps(acc, lanes, acc, x)); }
  KD_ALWAYS_INLINE Vec max(const Vec& acc, const Vec& x) const { return Vec(_mm512_mask_max_ps(acc, lanes, acc, x)); }
#else
  Vec above;  // all-ones where a > b
  KD_ALWAYS_INLINE NotAbove(const Vec& a, const Vec& b) : above(a > b) {}
  KD_ALWAYS_INLINE bool all() const { return !any_lane(above); }
  KD_ALWAYS_INLINE Vec add(const Vec& acc, const Vec& x) const { return acc + Vec::blendv(x, Vec(0.f), above); }
  KD_ALWAYS_INLINE Vec max(const Vec& acc, const Vec& x) const {
    return max_unordered(acc, Vec::blendv(x, Vec(kNegInf), above));
  }
#endif
};

// Forward KL(p || q) from a statistics pass's block sums, without a log per element. With
// u = z / T, a = t / T, the final maxima ms, mt and sums Ss, St (lse_s, lse_t), and block b's
// shifts ms_b, mt_b (the running maxima its exps were taken at):
//   log p_i - log q_i = ((t_i - mt_b) - (z_i - ms_b)) / T + ((mt_b - mt) - (ms_b - ms)) / T + log Ss - log St
// and p_i = e_i f_b with e_i = exp((t_i - mt_b) / T), f_b = exp((mt_b - mt) / T) / St, so
//   KL = sum_b f_b (G_b + E_b ((mt_b - mt) - (ms_b - ms))) / T + (sum_b f_b E_b) (log Ss - log St)
// with E_b = sum e_i (mass), G_b = sum e_i ((t_i - mt_b) - (z_i - ms_b)) (gap) over the block.
// Every logit difference is taken at a running maximum, as log-softmax takes it, and the block
// constants are combined in double. The sums may cover a group of the row's classes (CAKD's W),
// and a shift need not be the largest logit it covers. +inf where the teacher has mass on a
// student -inf entry.
inline double forward_kl_from_blocks(const float* shift_t, const float* shift_s, const double* mass, const double* gap,
                                     int64_t blocks, const OnlineLse& lse_s, const OnlineLse& lse_t, float inv_t) {
  double value = 0.0, total_mass = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (!(mass[b] > 0.0)) continue;  // no teacher mass in the block (its shifts may be -inf)
    const double mt_b = shift_t[b], ms_b = shift_s[b];
    const double f_b = std::exp((mt_b - lse_t.max) * inv_t) / lse_t.sum;
    value += f_b * (gap[b] + mass[b] * ((mt_b - lse_t.max) - (ms_b - lse_s.max)));
    total_mass += f_b * mass[b];
  }
  return value * inv_t + total_mass * (std::log(lse_s.sum) - std::log(lse_t.sum));
}

// What a row kernel reports (or-ed over the rows; run_rows turns them into one ValueError):
// NaN / +inf logits, a label outside [0, V), and a student that is -inf where the loss needs a
// finite value (the whole row, the label's entry, or an entry the teacher gives probability to
// under a KL from the teacher), which would make the row's loss +inf or undefined; and under
// reverse KL a teacher that is -inf where the student has probability (the loss would be +inf).
enum RowError : int {
  kRowOk = 0,
  kBadTeacher = 1,
  kBadStudent = 2,
  kBadLabel = 4,
  kStudentMassOnNegInf = 8,
  kTeacherNegInfUnderStudent = 16
};

inline bool bad_logit(float x) { return std::isnan(x) || x == std::numeric_limits<float>::infinity(); }

// Raises `lse`'s max to the block's max logit; false (`lse` untouched) when the block holds NaN or
// +inf. `unit`, when given, follows the same max at scale 1 (the CE term's log-sum-exp at T != 1).
template <typename T>
inline bool raise_to_block_max(const T* x, int64_t n, float inv_t, OnlineLse& lse, OnlineLse* unit = nullptr) {
  const float bmax = block_max(x, n);
  if (bad_logit(bmax)) return false;
  lse.raise_max(bmax, inv_t);
  if (unit) unit->raise_max(bmax, 1.f);
  return true;
}

// Adds exp((x - lse.max) / T) over a block to lse.sum (and exp(x - max) to unit->sum when `unit`
// is given), storing the exps at scale 1/T into `exps` with kStoreExps (and those at scale 1 into
// `unit_exps` when given), so later passes need no exp. The max must already cover the block
// (raise_to_block_max). False when a sum is NaN: the block held a NaN the maxima dropped.
template <bool kStoreExps, typename T>
inline bool add_block_exps(const T* x, int64_t n, float inv_t, OnlineLse& lse, OnlineLse* unit, float* exps,
                           float* unit_exps = nullptr) {
  if (lse.empty()) {  // everything so far masked
    if constexpr (kStoreExps) std::fill(exps, exps + n, 0.f);
    if (unit_exps) std::fill(unit_exps, unit_exps + n, 0.f);
    return true;
  }
  const Vec vmax(lse.max);
  const ExpScale at_t(inv_t), at_1(1.f);
  struct Sums {
    Vec at_t{0.f}, unit{0.f};
  };
  Sums sums;
  // the loop in registers (for_each_vec with a state), one instantiation with the unit exps and
  // one without
  auto add_exps = [&](auto with_unit) {
    constexpr bool kUnit = decltype(with_unit)::value;
    for_each_vec(0, n, sums, [=](int64_t i, int64_t m, Sums& acc) KD_ALWAYS_INLINE_LAMBDA {
      prefetch_block_ahead(x + i);
      const Vec d = load_row(x + i, m) - vmax;
      const Vec e = exp_scaled(d, at_t);
      if constexpr (kStoreExps) e.store(exps + i, m);
      acc.at_t = acc.at_t + e;
      if constexpr (kUnit) {
        const Vec e_unit = exp_scaled(d, at_1);
        if (unit_exps) e_unit.store(unit_exps + i, m);
        acc.unit = acc.unit + e_unit;
      }
    });
  };
  if (unit) {
    add_exps(std::true_type{});
  } else {
    add_exps(std::false_type{});
  }
  const float sum = hsum(sums.at_t), sum_unit = unit ? hsum(sums.unit) : 0.f;
  if (std::isnan(sum) || std::isnan(sum_unit)) return false;
  lse.sum += sum;
  if (unit) unit->sum += sum_unit;
  return true;
}

// The rows of the logits that a thread reads after the current ones (nullptr after its last),
// for kernels whose last pass over a row computes from cache while DRAM idles: prefetching
// the next rows there overlaps their reads with that work. In the logits' own dtypes, also when
// the kernel gets widened rows (the raw rows are what the widening reads next).
struct NextRows {
  const char* student = nullptr;
  const char* teacher = nullptr;
  int64_t student_bytes = 4, teacher_bytes = 4;  // bytes per entry

  // Prefetches into L2 the part of the next rows that matches element i of the current row's
  // vector [i, i + kW).
  KD_ALWAYS_INLINE void prefetch(int64_t i) const {
    if (student == nullptr) return;
    __builtin_prefetch(student + i * student_bytes, 0, 2);
    __builtin_prefetch(teacher + i * teacher_bytes, 0, 2);
  }
};

// One row as a row kernel sees it: in the logits' own dtypes (S, T) for kernels that read rows in
// place, as float for those that take widened rows (RowArgs).
template <typename S = float, typename T = float>
struct RowArgsT {
  const S* student;  // [V] raw student logits z
  const T* teacher;  // [V] raw teacher logits
  S* grad;           // [V] dL/dz out, or nullptr
  int64_t vocab;
  int64_t label;     // ignore_index when no label
  float grad_scale;
  bool stream_grad;  // args.grad is the output tensor (not per-thread scratch): bypass caches
  NextRows next;     // the rows read after these
};
using RowArgs = RowArgsT<>;

// bf16/fp16 <-> fp32 row conversion, vectorised (the generic at::vec::convert is a scalar loop).
// Narrowing writes with streaming stores: the narrowed rows are gradients, not read again here.
template <typename Src, typename Dst>
void convert_row(const Src* src, Dst* dst, int64_t n) {
  constexpr bool kWiden = std::is_same_v<Dst, float>;
  using Low = std::conditional_t<kWiden, Src, Dst>;
  constexpr int64_t kLowW = at::vec::Vectorized<Low>::size();  // 2 * kW
  int64_t i = 0;
  for (; i + kLowW <= n; i += kLowW) {
    if constexpr (kWiden) {
      auto [lo, hi] = at::vec::convert_to_float<Low>(at::vec::Vectorized<Low>::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + kW);
    } else {
      store_streaming(at::vec::convert_from_float<Low>(Vec::loadu(src + i), Vec::loadu(src + i + kW)), dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<Dst>(src[i]);
}

// Returns a pointer to the row as fp32: the row itself for float input, else `buf` filled by
// one conversion pass (bf16/fp16 are widened once, all math is fp32).
template <typename scalar_t>
const float* row_as_float(const scalar_t* row, int64_t V, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    buf.resize(V);
    convert_row(row, buf.data(), V);
    return buf.data();
  }
}

template <typename Fn>
void dispatch_float_types(at::ScalarType type, const char* name, Fn&& fn) {
  switch (type) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", type);
  }
}

// The error for kStudentMassOnNegInf; kdkernels/_reports.py words the GPU kernels' report alike.
constexpr const char* kStudentNegInfMessage =
    "student_logits is -inf where the loss needs a finite value (a whole row, the label's entry, or an "
    "entry where the teacher has probability), so the loss would be +inf or undefined";

// The error for kTeacherNegInfUnderStudent.
constexpr const char* kTeacherNegInfMessage =
    "teacher_logits is -inf where the student has probability, so the reverse KL would be +inf; mask "
    "an entry on both sides (student_logits -inf there too)";

// Runs a row kernel over every row of [N, V] student / teacher logits with at::parallel_for.
// Rows whose label is ignore_index get loss 0 and gradient 0 without calling the kernel;
// out-of-range labels are reported (kBadLabel) and their rows ignored. With kNativeRows the
// kernel gets RowArgsT<student_t, teacher_t>, the rows and the gradient in their own dtypes (it
// converts vector by vector); otherwise RowArgs, bf16/fp16 rows widened once into fp32 scratch
// and the fp32 gradient narrowed once. `make_row_fn()` runs once per thread and returns the row
// kernel `float (const RowArgs&, int64_t row, int* errors)` (per-thread scratch lives in it).
template <bool kNativeRows, typename student_t, typename teacher_t, typename MakeRowFn>
void for_each_row(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
                  int64_t ignore_index, float grad_scale, float* row_loss, at::Tensor* grad,
                  std::atomic<int>* errors, MakeRowFn&& make_row_fn) {
  const int64_t N = student.size(0), V = student.size(1);
  const student_t* s_base = student.const_data_ptr<student_t>();
  const teacher_t* t_base = teacher.const_data_ptr<teacher_t>();
  student_t* g_base = grad ? grad->mutable_data_ptr<student_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  constexpr bool kWidened = !kNativeRows && !std::is_same_v<student_t, float>;

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    auto row_fn = make_row_fn();
    std::vector<float> s_buf, t_buf, g_buf;
    int local_errors = kRowOk;
    for (int64_t r = begin; r < end; ++r) {
      int64_t label = labels ? labels[r] : ignore_index;
      student_t* g_row = g_base ? g_base + r * V : nullptr;
      if (labels && label != ignore_index && (label < 0 || label >= V)) {
        local_errors |= kBadLabel;
        label = ignore_index;
      }
      if (labels && label == ignore_index) {  // ignored row: no loss, no gradient
        row_loss[r] = 0.f;
        if (g_row) std::fill(g_row, g_row + V, student_t(0));
        continue;
      }
      NextRows next;
      if (r + 1 < end) {
        next = {reinterpret_cast<const char*>(s_base + (r + 1) * V), reinterpret_cast<const char*>(t_base + (r + 1) * V),
                sizeof(student_t), sizeof(teacher_t)};
      }
      if constexpr (kNativeRows) {
        const RowArgsT<student_t, teacher_t> args{s_base + r * V, t_base + r * V, g_row, V, label, grad_scale, true,
                                                  next};
        row_loss[r] = row_fn(args, r, &local_errors);
      } else {
        RowArgs args;
        args.vocab = V;
        args.grad_scale = grad_scale;
        args.label = label;
        args.student = row_as_float(s_base + r * V, V, s_buf);
        args.teacher = row_as_float(t_base + r * V, V, t_buf);
        args.stream_grad = !kWidened;
        args.next = next;
        if constexpr (kWidened) {
          if (g_row) g_buf.resize(V);
          args.grad = g_row ? g_buf.data() : nullptr;
        } else {
          args.grad = g_row;
        }
        row_loss[r] = row_fn(args, r, &local_errors);
        if constexpr (kWidened) {
          if (g_row) convert_row(g_buf.data(), g_row, V);
        }
      }
    }
    stream_fence();
    if (local_errors) errors->fetch_or(local_errors);
  });
}

// An op's inputs as the row kernels read them: contiguous [N, V] logits, int64 labels.
struct RowInputs {
  at::Tensor student, teacher, labels;
  const int64_t* label_ptr = nullptr;  // nullptr when the op got no labels
  int64_t rows = 0, vocab = 0;
};

inline RowInputs row_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                            const std::optional<at::Tensor>& labels) {
  TORCH_CHECK_VALUE(student_logits.dim() == 2 && teacher_logits.sizes() == student_logits.sizes(),
                    "student_logits and teacher_logits must be [N, V] of equal shape");
  RowInputs in;
  in.student = student_logits.contiguous();
  in.teacher = teacher_logits.contiguous();
  in.rows = in.student.size(0);
  in.vocab = in.student.size(1);
  if (labels.has_value()) {
    in.labels = labels->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(in.labels.numel() == in.rows, "labels must have one entry per row");
    in.label_ptr = in.labels.const_data_ptr<int64_t>();
  }
  return in;
}

// for_each_row over the inputs' dtypes, then the ValueError for what the rows reported.
// kNativeRows: see for_each_row (rows of equal dtypes; mixed ones are widened).
template <bool kNativeRows = false, typename MakeRowFn>
void run_rows(const RowInputs& in, int64_t ignore_index, float grad_scale, float* row_loss, at::Tensor* grad,
              MakeRowFn&& make_row_fn) {
  std::atomic<int> errors{kRowOk};
  dispatch_float_types(in.student.scalar_type(), "student_logits", [&](auto s_tag) {
    dispatch_float_types(in.teacher.scalar_type(), "teacher_logits", [&](auto t_tag) {
      using student_t = decltype(s_tag);
      using teacher_t = decltype(t_tag);
      // mixed dtypes take the widened rows: one native instantiation per dtype is enough
      constexpr bool kNative = kNativeRows && std::is_same_v<student_t, teacher_t>;
      for_each_row<kNative, student_t, teacher_t>(in.student, in.teacher, in.label_ptr, ignore_index,
                                                     grad_scale, row_loss, grad, &errors, make_row_fn);
    });
  });
  const int err = errors.load();
  TORCH_CHECK_VALUE(!(err & kBadTeacher), "teacher_logits contains NaN or +inf");
  TORCH_CHECK_VALUE(!(err & kBadStudent), "student_logits contains NaN or +inf");
  TORCH_CHECK_VALUE(!(err & kBadLabel), "labels must lie in [0, ", in.vocab, ") or equal ignore_index (",
                    ignore_index, ")");
  TORCH_CHECK_VALUE(!(err & kStudentMassOnNegInf), kStudentNegInfMessage);
  TORCH_CHECK_VALUE(!(err & kTeacherNegInfUnderStudent), kTeacherNegInfMessage);
}

}  // namespace kdkernels
