// Fused KD loss on CUDA: one thread block per row, the math of csrc/include/kdkernels/divergence.h.
//
// Per row, each thread owning chunks of kChunk columns (16-byte loads):
//   1. statistics: per-thread online max / sum-of-exp of the student at 1/T (and at T = 1 for the
//      CE blend when T != 1) and of the teacher, then block reductions -> lse(u), lse(z), lse(a);
//      the maxima propagate NaN, which flags rows with NaN / +inf;
//   2. row constant C = sum q x / sum q (and skew KL's second one) and the divergence
//      (divergences with kRowSum only);
//   3. gradient dL/dz in the student dtype, times *grad_scale (read on the device, no host sync);
//      forward KL sums its value here.
// Each pass walks the row in the opposite order of the pass before, so that it starts on the
// columns read last, which are still in L2. The gradient may be written over the student logits
// (in place): each thread writes only the columns it has just read, and the one value read across
// threads, the label's logit, is read before a barrier that precedes every write.
// No torch header: plain `nvcc -c` compiles this file.
#include "kd_loss_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace kdkernels {
namespace cuda {
namespace {

constexpr int kChunk = 8;  // columns per thread per step: one 16-byte load of bf16 / fp16, two of fp32
constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr int kMaxReduced = 4;     // values reduced together at most
constexpr float kNegBig = -3.0e38f;  // finite start of running maxima: a fully masked row keeps it

// ---- storage types: raw bits <-> fp32 ----------------------------------------------------------
struct Float32 {
  using Raw = float;
  __device__ __forceinline__ static float to_float(Raw x) { return x; }
  __device__ __forceinline__ static Raw from_float(float x) { return x; }
};
struct BFloat16 {
  using Raw = unsigned short;
  __device__ __forceinline__ static float to_float(Raw bits) {
    return __uint_as_float(static_cast<unsigned int>(bits) << 16);
  }
  __device__ __forceinline__ static Raw from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};
struct Float16 {
  using Raw = unsigned short;
  __device__ __forceinline__ static float to_float(Raw bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ __forceinline__ static Raw from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

template <class Type>
union Pack16 {  // 16 bytes seen as one vector access or as elements
  static constexpr int kCount = 16 / sizeof(typename Type::Raw);
  uint4 vector;
  typename Type::Raw elements[kCount];

  __device__ __forceinline__ static Pack16 load(const typename Type::Raw* src) {
    Pack16 pack;
    pack.vector = *reinterpret_cast<const uint4*>(src);
    return pack;
  }
  __device__ __forceinline__ static Pack16 narrow(const float* values) {
    Pack16 pack;
#pragma unroll
    for (int k = 0; k < kCount; ++k) pack.elements[k] = Type::from_float(values[k]);
    return pack;
  }
  __device__ __forceinline__ void widen(float* out) const {
#pragma unroll
    for (int k = 0; k < kCount; ++k) out[k] = Type::to_float(elements[k]);
  }
  __device__ __forceinline__ void store(typename Type::Raw* dst) const { *reinterpret_cast<uint4*>(dst) = vector; }
};

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

// Visits columns [col, col + kChunk) of a row: by 16-byte packs, packed(v) for pack v, where the
// row allows it (`vector_ok`: aligned, and the chunk lies inside the row), else one column at a
// time, scalar(k) for each column col + k inside the row.
template <class Type, class Packed, class Scalar>
__device__ __forceinline__ void visit_chunk(int64_t col, int64_t vocab, bool vector_ok, Packed packed,
                                            Scalar scalar) {
  if (vector_ok && col + kChunk <= vocab) {
#pragma unroll
    for (int v = 0; v < kChunk / Pack16<Type>::kCount; ++v) packed(v);
  } else {
#pragma unroll
    for (int k = 0; k < kChunk; ++k)
      if (col + k < vocab) scalar(k);
  }
}

// Columns [col, col + kChunk) of a row as fp32; columns past the row read as -inf (masked).
template <class Type>
__device__ __forceinline__ void load_chunk(const typename Type::Raw* __restrict__ row, int64_t col,
                                           int64_t vocab, bool vector_ok, float (&out)[kChunk]) {
  constexpr int kPerPack = Pack16<Type>::kCount;
#pragma unroll
  for (int k = 0; k < kChunk; ++k) out[k] = -INFINITY;
  visit_chunk<Type>(
      col, vocab, vector_ok, [&](int v) { Pack16<Type>::load(row + col + v * kPerPack).widen(out + v * kPerPack); },
      [&](int k) { out[k] = Type::to_float(row[col + k]); });
}

// The columns of `values` that lie inside the row, in the row's type.
template <class Type>
__device__ __forceinline__ void store_chunk(typename Type::Raw* __restrict__ row, int64_t col, int64_t vocab,
                                            bool vector_ok, const float (&values)[kChunk]) {
  constexpr int kPerPack = Pack16<Type>::kCount;
  visit_chunk<Type>(
      col, vocab, vector_ok, [&](int v) { Pack16<Type>::narrow(values + v * kPerPack).store(row + col + v * kPerPack); },
      [&](int k) { row[col + k] = Type::from_float(values[k]); });
}

// ---- block reductions ---------------------------------------------------------------------------
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  __device__ __forceinline__ static float identity() { return 0.f; }
};
// NaN-propagating maximum: a NaN anywhere in a row makes its maximum NaN, which flags the row.
__device__ __forceinline__ float max_with_nan(float a, float b) { return (a > b || a != a) ? a : b; }
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return max_with_nan(a, b); }
  __device__ __forceinline__ static float identity() { return -INFINITY; }
};

template <class Op>
__device__ __forceinline__ float warp_all_reduce(float v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reduces values[0..N) over the block; every thread receives the results. All threads of the block
// must call it: every warp reduces the per-warp partials itself, so no broadcast step is needed.
template <int N, class Op>
__device__ __forceinline__ void block_all_reduce(float (&values)[N], float (&scratch)[kMaxReduced][kMaxWarps],
                                                 Op op) {
  static_assert(N <= kMaxReduced, "scratch too small");
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < N; ++i) values[i] = warp_all_reduce(values[i], op);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i][warp] = values[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float partial = lane < n_warps ? scratch[i][lane] : Op::identity();
    values[i] = warp_all_reduce(partial, op);
  }
  __syncthreads();  // scratch is free again
}

// ---- the row kernel ---------------------------------------------------------------------------------
template <class Type>
__device__ void fill_row(typename Type::Raw* row, int64_t vocab, bool vector_ok, float value) {
  float values[kChunk];
#pragma unroll
  for (int k = 0; k < kChunk; ++k) values[k] = value;
  for (int64_t col = static_cast<int64_t>(threadIdx.x) * kChunk; col < vocab; col += blockDim.x * kChunk)
    store_chunk<Type>(row, col, vocab, vector_ok, values);
}

template <class Div, class SType, class TType>
__global__ void __launch_bounds__(kMaxThreads) kd_loss_fwd_kernel(const KDRowsProblem problem,
                                                                  const KDParams params) {
  using SRaw = typename SType::Raw;
  using TRaw = typename TType::Raw;
  __shared__ float scratch[kMaxReduced][kMaxWarps];

  const int64_t row = blockIdx.x;
  const int64_t vocab = problem.vocab;
  // student and grad may be one buffer (in place): neither is __restrict__, so the compiler
  // neither treats the student row as read-only memory nor moves its loads past the stores.
  const SRaw* student = static_cast<const SRaw*>(problem.student) + row * problem.student_row_stride;
  const TRaw* __restrict__ teacher = static_cast<const TRaw*>(problem.teacher) + row * problem.teacher_row_stride;
  SRaw* grad = problem.grad ? static_cast<SRaw*>(problem.grad) + row * vocab : nullptr;
  const bool load_vector_ok = aligned16(student) && aligned16(teacher);
  const bool store_vector_ok = grad != nullptr && aligned16(grad);
  const int64_t n_chunks = (vocab + kChunk - 1) / kChunk;
  const int64_t n_steps = (n_chunks + blockDim.x - 1) / blockDim.x;
  const float inv_t = params.inv_temperature;

  int64_t label = params.ignore_index;
  bool bad_label = false;
  if (problem.labels != nullptr) {
    label = problem.labels[row];
    if (label == params.ignore_index) {  // ignored row: loss 0, gradient 0, nothing read
      if (threadIdx.x == 0) problem.row_loss[row] = 0.f;
      if (grad) fill_row<SType>(grad, vocab, store_vector_ok, 0.f);
      return;
    }
    bad_label = label < 0 || label >= vocab;
  }
  const bool use_ce = problem.labels != nullptr && params.ce_weight != 0.f;
  const bool ce_separate = use_ce && !params.ce_reuses_q;

  // ---- 1. statistics ----
  float max_z = kNegBig, max_t = kNegBig;  // of the raw logits; max of u = z / T is max_z / T
  float sum_u = 0.f, sum_z = 0.f, sum_a = 0.f;
  for (int64_t chunk = threadIdx.x; chunk < n_chunks; chunk += blockDim.x) {
    float z[kChunk], t[kChunk];
    load_chunk<SType>(student, chunk * kChunk, vocab, load_vector_ok, z);
    load_chunk<TType>(teacher, chunk * kChunk, vocab, load_vector_ok, t);
    float chunk_max_z = kNegBig, chunk_max_t = kNegBig;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      chunk_max_z = max_with_nan(chunk_max_z, z[k]);
      chunk_max_t = max_with_nan(chunk_max_t, t[k]);
    }
    // "not <=" rather than ">": a NaN maximum replaces the running one (and stays).
    if (!(chunk_max_z <= max_z)) {
      sum_u *= kd_exp((max_z - chunk_max_z) * inv_t);
      sum_z *= kd_exp(max_z - chunk_max_z);
      max_z = chunk_max_z;
    }
    if (!(chunk_max_t <= max_t)) {
      sum_a *= kd_exp((max_t - chunk_max_t) * inv_t);
      max_t = chunk_max_t;
    }
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      sum_u += kd_exp((z[k] - max_z) * inv_t);
      if (ce_separate) sum_z += kd_exp(z[k] - max_z);
      sum_a += kd_exp((t[k] - max_t) * inv_t);
    }
  }
  float maxima[2] = {max_z, max_t};
  block_all_reduce(maxima, scratch, MaxOp{});
  // This thread's sums, moved to the row maxima, then summed over the block.
  float sums[3] = {sum_u * kd_exp((max_z - maxima[0]) * inv_t), sum_z * kd_exp(max_z - maxima[0]),
                   sum_a * kd_exp((max_t - maxima[1]) * inv_t)};
  block_all_reduce(sums, scratch, SumOp{});

  // NaN or +inf in either row (the maxima propagate NaN), or a label outside [0, vocab).
  const bool poisoned = !(maxima[0] < INFINITY) || !(maxima[1] < INFINITY) || bad_label;
  const bool has_student = maxima[0] > kNegBig, has_teacher = maxima[1] > kNegBig;
  // A student row entirely -inf has no distribution: its loss is undefined (reported as NaN, like
  // bad values) unless the teacher row is masked too and there is no CE term: a fully masked row,
  // loss 0 and gradient 0.
  if (!has_student || poisoned) {
    const float value = (poisoned || use_ce || has_teacher) ? NAN : 0.f;
    if (threadIdx.x == 0) problem.row_loss[row] = value;
    if (grad) fill_row<SType>(grad, vocab, store_vector_ok, value);
    return;
  }
  // log-softmax as (x - max) / T - log(sum): the shifted logit is exact and the normaliser
  // small, which keeps precision when the logits are large.
  const float row_max_z = maxima[0], row_max_t = maxima[1];
  const float log_sum_u = kd_log(sums[0]);
  const float log_sum_a = kd_log(sums[2]);
  const float log_sum_z = ce_separate ? kd_log(sums[1]) : log_sum_u;
  // CE = lse(z) - z_y = (max - z_y) + log sum exp(z - max); a label on a student -inf entry
  // makes it +inf, reported as NaN. The label's logit is read before any thread writes the
  // gradient, which may overwrite the student row (in place: grad == student); the barrier orders
  // every thread's read before the first write.
  const float z_label = use_ce ? SType::to_float(student[label]) : 0.f;
  __syncthreads();
  auto ce_loss = [&]() {
    return z_label == -INFINITY ? NAN : params.ce_weight * ((row_max_z - z_label) + log_sum_z);
  };

  if (!has_teacher) {  // a teacher row entirely -inf: no teacher distribution, no KD term; CE alone
    const float ce_grad_coef = params.ce_weight * *problem.grad_scale;
    for (int64_t chunk = threadIdx.x; grad != nullptr && chunk < n_chunks; chunk += blockDim.x) {
      const int64_t col = chunk * kChunk;
      float z[kChunk], g[kChunk];
      load_chunk<SType>(student, col, vocab, load_vector_ok, z);
#pragma unroll
      for (int k = 0; k < kChunk; ++k)
        g[k] = use_ce ? ce_grad_coef * (kd_exp(z[k] - row_max_z - log_sum_z) - (col + k == label ? 1.f : 0.f)) : 0.f;
      store_chunk<SType>(grad, col, vocab, store_vector_ok, g);
    }
    if (threadIdx.x == 0) problem.row_loss[row] = use_ce ? ce_loss() : 0.f;
    return;
  }

  // Column chunk of this thread at `step` of a pass, walking the row forwards or backwards.
  auto chunk_at = [&](int64_t step, bool backwards) {
    return (backwards ? n_steps - 1 - step : step) * blockDim.x + threadIdx.x;
  };
  auto log_probs = [&](const float (&z)[kChunk], const float (&t)[kChunk], int k, float& logp, float& logq) {
    logq = (z[k] - row_max_z) * inv_t - log_sum_u;
    logp = (t[k] - row_max_t) * inv_t - log_sum_a;
  };

  // ---- 2. row constant and divergence ----
  float divergence = 0.f;
  float row_c = 0.f, row_c2 = 0.f;
  if constexpr (Div::kRowSum) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // sum loss, sum c, sum c2, sum q
    for (int64_t step = 0; step < n_steps; ++step) {
      const int64_t chunk = chunk_at(step, /*backwards=*/true);
      if (chunk >= n_chunks) continue;
      float z[kChunk], t[kChunk];
      load_chunk<SType>(student, chunk * kChunk, vocab, load_vector_ok, z);
      load_chunk<TType>(teacher, chunk * kChunk, vocab, load_vector_ok, t);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        float logp, logq, loss, c;
        log_probs(z, t, k, logp, logq);
        const float p = kd_exp(logp), q = kd_exp(logq);
        Div::terms(logp, logq, p, q, params.mix, loss, c);
        acc[0] += loss;
        acc[1] += c;
        if constexpr (kSecondRowSum<Div>) acc[2] += Div::second_term(p, q, params.mix);
        acc[3] += q;
      }
    }
    block_all_reduce(acc, scratch, SumOp{});
    divergence = acc[0];
    // C = sum q x / sum q: equal to sum q x (sum q = 1), but rounding in sum q no longer leaks
    // into the gradient q (x - C), which then sums to 0 as the exact one does.
    row_c = acc[1] / acc[3];
    row_c2 = acc[2] / acc[3];
  }

  // ---- 3. gradient (and forward KL's value) ----
  if (grad != nullptr || !Div::kRowSum) {
    const float grad_scale = *problem.grad_scale;
    const float kd_grad_coef = params.kd_coef * grad_scale;
    const float ce_grad_coef = params.ce_weight * grad_scale;
    float fkl = 0.f;
    for (int64_t step = 0; step < n_steps; ++step) {
      const int64_t chunk = chunk_at(step, /*backwards=*/!Div::kRowSum);
      if (chunk >= n_chunks) continue;
      const int64_t col = chunk * kChunk;
      float z[kChunk], t[kChunk], g[kChunk];
      load_chunk<SType>(student, col, vocab, load_vector_ok, z);
      load_chunk<TType>(teacher, col, vocab, load_vector_ok, t);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        float logp, logq;
        log_probs(z, t, k, logp, logq);
        const float p = kd_exp(logp), q = kd_exp(logq);
        if constexpr (!Div::kRowSum) {
          float loss, c;
          Div::terms(logp, logq, p, q, params.mix, loss, c);
          fkl += loss;
        }
        if (grad == nullptr) continue;
        float gk = kd_grad_coef * divergence_grad<Div>(logp, logq, p, q, params.mix, row_c, row_c2);
        if (use_ce) {  // ce_weight (softmax(z) - onehot(y))
          const float softmax_z = ce_separate ? kd_exp(z[k] - row_max_z - log_sum_z) : q;
          gk += ce_grad_coef * (softmax_z - (col + k == label ? 1.f : 0.f));
        }
        g[k] = gk;
      }
      if (grad != nullptr) store_chunk<SType>(grad, col, vocab, store_vector_ok, g);
    }
    if constexpr (!Div::kRowSum) {
      float total[1] = {fkl};
      block_all_reduce(total, scratch, SumOp{});
      divergence = total[0];
    }
  }

  if (threadIdx.x == 0) {
    // forward KL is +inf only where the teacher has mass on a student -inf entry, reverse KL only
    // where the student has mass on a teacher -inf entry: reported as NaN
    if constexpr (std::is_same_v<Div, ForwardKL> || std::is_same_v<Div, ReverseKL>) {
      if (!(divergence < INFINITY)) divergence = NAN;
    }
    float loss = params.kd_scale * divergence;
    if (use_ce) loss += ce_loss();
    problem.row_loss[row] = loss;
  }
}

// ---- launch ---------------------------------------------------------------------------------------
// Threads per row: enough for two chunks per thread, a multiple of a warp, at most kMaxThreads.
int threads_for(int64_t vocab) {
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  int threads = 2 * kWarpSize;
  while (threads < kMaxThreads && threads * 2 <= chunks) threads *= 2;
  return threads;
}

template <class Fn>
bool dispatch_type(LogitsType type, Fn&& fn) {
  switch (type) {
    case LogitsType::kFloat32: fn(Float32{}); return true;
    case LogitsType::kBFloat16: fn(BFloat16{}); return true;
    case LogitsType::kFloat16: fn(Float16{}); return true;
  }
  return false;
}

}  // namespace

cudaError_t launch_kd_loss_fwd(const KDRowsProblem& problem, const KDParams& params, cudaStream_t stream) {
  if (problem.rows < 0 || problem.vocab < 1 || problem.rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (problem.rows == 0) return cudaSuccess;
  if (!is_divergence_id(static_cast<int64_t>(params.divergence))) return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;
  KDRowsProblem problem_arg = problem;
  KDParams params_arg = params;
  void* args[] = {&problem_arg, &params_arg};
  const dim3 grid(static_cast<unsigned int>(problem.rows));
  const dim3 block(threads_for(problem.vocab));
  dispatch_divergence(params.divergence, [&](auto div) {
    dispatch_type(problem.student_type, [&](auto s) {
      dispatch_type(problem.teacher_type, [&](auto t) {
        const void* kernel = reinterpret_cast<const void*>(
            &kd_loss_fwd_kernel<decltype(div), decltype(s), decltype(t)>);
        status = cudaLaunchKernel(kernel, grid, block, args, 0, stream);
      });
    });
  });
  return status;
}

}  // namespace cuda
}  // namespace kdkernels
