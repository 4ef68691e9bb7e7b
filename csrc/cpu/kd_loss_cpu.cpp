// Fused KD loss on CPU: one row per task, at::vec SIMD inside a row, at::parallel_for across rows.
//
// Per row (DESIGN.md §3):
//   1. statistics, the only pass that reads DRAM: block-wise online max / sum-of-exp of the
//      student (at 1/T, and at T = 1 for the CE blend) and the teacher; the exps are kept in
//      per-thread scratch (L2) so no later pass needs exp; forward KL also gets its value here;
//   2. the divergence value and its row constant C (divergences with kRowSum only), from L2;
//   3. the gradient dL/dz, written once in the input dtype and scaled by grad_scale.
// Rows whose labels equal ignore_index give loss 0 and gradient 0. Non-finite teacher/student
// entries other than -inf (masking) and out-of-range labels are reported as ValueError.
#include "vec_math.h"

#include <kdkernels/divergence.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_alloc.h"

namespace kdkernels {
namespace {

constexpr int64_t kW = Vec::size();
constexpr int64_t kBlock = 2048;  // elements per online-softmax block (8 KB of fp32: stays in L1)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Loads n <= kW floats; missing lanes read as -inf, which every formula treats as masked.
inline Vec load_masked(const float* ptr, int64_t n) {
  if (n == kW) return Vec::loadu(ptr);
  return Vec::set(Vec(kNegInf), Vec::loadu(ptr, n), n);
}

inline float hsum(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += lanes[i];
  return s;
}

// Max that propagates NaN (so a NaN anywhere in the row is seen).
inline float hmax(const Vec& v) {
  alignas(64) float lanes[kW];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kW; ++i) m = (std::isnan(lanes[i]) || lanes[i] > m) ? lanes[i] : m;
  return m;
}

inline float block_max(const float* x, int64_t n) {
  Vec m(kNegInf);
  for (int64_t i = 0; i < n; i += kW) m = at::vec::maximum(m, load_masked(x + i, std::min(kW, n - i)));
  return hmax(m);
}

// Per-thread buffers reused across rows.
struct RowScratch {
  std::vector<float> exp_s, exp_t;            // [V] exp((x - running max) / T)
  std::vector<float> block_max_s, block_max_t;  // [blocks] running max each block was shifted by
  std::vector<float> factor_s, factor_t;        // [blocks] turns the stored exps into probabilities
  std::vector<float> s_buf, t_buf, g_buf;       // [V] widened bf16/fp16 rows and fp32 gradient
};

// Online softmax statistics of one row at scale 1/T (and at scale 1 for the CE blend), filled
// block by block: each block's max is found in L1, the running sums are rescaled when the max
// grows, and exp((x - running max) / T) is stored so later passes need no exp.
struct OnlineSoftmax {
  float max = kNegInf;
  double sum_t = 0.0;  // sum exp((x - max) / T)
  double sum_1 = 0.0;  // sum exp(x - max)
  bool bad = false;    // NaN or +inf seen

  // Moves the running max to the block's max if larger; returns false for a bad block.
  bool advance(const float* x, int64_t n, float inv_t) {
    const float bmax = block_max(x, n);
    if (std::isnan(bmax) || bmax == std::numeric_limits<float>::infinity()) {
      bad = true;
      return false;
    }
    if (bmax > max) {
      const double shrink = std::exp(static_cast<double>(max - bmax) * inv_t);
      sum_t *= shrink;
      sum_1 *= std::exp(static_cast<double>(max - bmax));
      max = bmax;
    }
    return true;
  }

  // Stores e = exp((x - max) / T) for the block into `out` and adds it to the sums.
  void accumulate(const float* x, int64_t n, float inv_t, bool want_unit, float* out) {
    if (max == kNegInf) {  // everything so far masked
      std::fill(out, out + n, 0.f);
      return;
    }
    const Vec vmax(max), vinv(inv_t);
    Vec acc(0.f), acc_1(0.f);
    for (int64_t i = 0; i < n; i += kW) {
      const int64_t m = std::min(kW, n - i);
      const Vec xv = load_masked(x + i, m);
      const Vec e = exp_nonpositive((xv - vmax) * vinv);
      e.store(out + i, m);
      acc = acc + e;
      if (want_unit) acc_1 = acc_1 + exp_nonpositive(xv - vmax);
    }
    sum_t += hsum(acc);
    if (want_unit) sum_1 += hsum(acc_1);
  }

  bool empty() const { return max == kNegInf; }
  // log-softmax is formed as (x - max) / T - log(sum): the shifted logit is exact and the
  // normaliser stays small, which keeps precision when all logits are large.
  float log_sum_t() const { return static_cast<float>(std::log(sum_t)); }
  float log_sum_1() const { return static_cast<float>(std::log(sum_1)); }

  // factor[b] * exp_stored = probability, for every block.
  void probability_factors(const std::vector<float>& block_max, float inv_t,
                           std::vector<float>& factor) const {
    factor.resize(block_max.size());
    for (size_t b = 0; b < block_max.size(); ++b)
      factor[b] = block_max[b] == kNegInf
                      ? 0.f
                      : static_cast<float>(std::exp(static_cast<double>(block_max[b] - max) * inv_t) / sum_t);
  }
};

// Divergences that carry a second row constant for precision (see SkewKL).
template <class Div, class = void>
constexpr bool kSecondRowSum = false;
template <class Div>
constexpr bool kSecondRowSum<Div, std::void_t<decltype(Div::kSecondRowSum)>> = Div::kSecondRowSum;

enum RowError : int { kRowOk = 0, kBadTeacher = 1, kBadStudent = 2, kBadLabel = 4 };

struct RowArgs {
  const float* student;  // [V] raw student logits z
  const float* teacher;  // [V] raw teacher logits
  float* grad;           // [V] dL/dz out, or nullptr
  int64_t vocab;
  int64_t label;         // ignore_index when no label
  float grad_scale;
  bool stream_grad;      // args.grad is the output tensor (not per-thread scratch): bypass caches
};

// Returns the row loss; writes the gradient when args.grad != nullptr.
template <class Div>
float kd_row(const RowArgs& args, const KDParams& prm, RowScratch& scratch, int* error) {
  const int64_t V = args.vocab;
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  const float inv_t = prm.inv_temperature;
  const bool use_ce = prm.ce_weight != 0.f && args.label != prm.ignore_index;
  const bool ce_separate = use_ce && inv_t != 1.f;

  // Pass 1 (reads DRAM): statistics, and the exps kept in scratch.
  scratch.exp_s.resize(V);
  scratch.exp_t.resize(V);
  scratch.block_max_s.resize(blocks);
  scratch.block_max_t.resize(blocks);
  OnlineSoftmax st, tt;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, n = std::min(kBlock, V - off);
    if (st.advance(args.student + off, n, inv_t))
      st.accumulate(args.student + off, n, inv_t, ce_separate, scratch.exp_s.data() + off);
    if (tt.advance(args.teacher + off, n, inv_t))
      tt.accumulate(args.teacher + off, n, inv_t, false, scratch.exp_t.data() + off);
    scratch.block_max_s[b] = st.max;
    scratch.block_max_t[b] = tt.max;
  }
  if (tt.bad) *error |= kBadTeacher;
  if (st.bad) *error |= kBadStudent;
  if (st.bad || tt.bad || st.empty() || tt.empty()) {
    if (args.grad) std::fill(args.grad, args.grad + V, 0.f);
    return 0.f;
  }
  st.probability_factors(scratch.block_max_s, inv_t, scratch.factor_s);
  tt.probability_factors(scratch.block_max_t, inv_t, scratch.factor_t);

  // Visits every vector of the row (from L2) with the tempered student logit z, the teacher
  // and student log-probabilities and probabilities.
  const Vec v_inv_t(inv_t), v_max_s(st.max), v_max_t(tt.max);
  const Vec v_log_sum_s(st.log_sum_t()), v_log_sum_t(tt.log_sum_t());
  auto for_each_vector = [&](auto&& body) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t off = b * kBlock, bend = std::min(V, off + kBlock);
      const Vec fq(scratch.factor_s[b]), fp(scratch.factor_t[b]);
      for (int64_t i = off; i < bend; i += kW) {
        const int64_t n = std::min(kW, bend - i);
        const Vec z = load_masked(args.student + i, n);
        const Vec q = Vec::loadu(scratch.exp_s.data() + i, n) * fq;
        const Vec p = Vec::loadu(scratch.exp_t.data() + i, n) * fp;
        body(i, n, z, p, q);
      }
    }
  };
  auto logs = [&](int64_t i, int64_t n, const Vec& z, Vec& logp, Vec& logq) {
    logq = (z - v_max_s) * v_inv_t - v_log_sum_s;
    logp = (load_masked(args.teacher + i, n) - v_max_t) * v_inv_t - v_log_sum_t;
  };

  // Sums vector partials in fp32 and folds them into double once per block, for accuracy.
  struct RowSum {
    Vec partial = Vec(0.f);
    double total = 0.0;
    int64_t count = 0;
    void add(const Vec& v) {
      partial = partial + v;
      if (++count == kBlock / kW) flush();
    }
    void flush() {
      total += hsum(partial);
      partial = Vec(0.f);
      count = 0;
    }
    double value() {
      flush();
      return total;
    }
  };

  // Pass 2: the divergence value and its row constant C (kRowSum divergences).
  RowSum divergence, row_c_sum, row_c2_sum;
  float row_c = 0.f, row_c2 = 0.f;
  if constexpr (Div::kRowSum) {
    for_each_vector([&](int64_t i, int64_t n, const Vec& z, const Vec& p, const Vec& q) {
      Vec logp, logq, loss, c;
      logs(i, n, z, logp, logq);
      Div::terms(logp, logq, p, q, prm.mix, loss, c);
      divergence.add(loss);
      row_c_sum.add(c);
      if constexpr (kSecondRowSum<Div>) row_c2_sum.add(Div::second_term(p, q, prm.mix));
    });
    row_c = static_cast<float>(row_c_sum.value());
    row_c2 = static_cast<float>(row_c2_sum.value());
  }

  // Pass 3: the gradient dL/dz = kd_coef * dD/du + ce_weight * (softmax(z) - e_y), times the
  // reduction factor; divergences without a row constant add up their value here.
  const float scale = args.grad_scale;
  const bool write_grad = args.grad != nullptr;
  if (write_grad || !Div::kRowSum) {
    const Vec v_kd(prm.kd_coef * scale), v_ce(prm.ce_weight * scale);
    const Vec v_log_sum_1(ce_separate ? st.log_sum_1() : 0.f);
    for_each_vector([&](int64_t i, int64_t n, const Vec& z, const Vec& p, const Vec& q) {
      Vec logp, logq;
      if constexpr (!Div::kRowSum) {
        Vec loss, c;
        logs(i, n, z, logp, logq);
        Div::terms(logp, logq, p, q, prm.mix, loss, c);
        divergence.add(loss);
      }
      if (!write_grad) return;
      if constexpr (Div::kRowSum) logs(i, n, z, logp, logq);
      Vec g;
      if constexpr (kSecondRowSum<Div>) {
        g = v_kd * Div::grad2(logp, logq, p, q, prm.mix, row_c, row_c2);
      } else {
        g = v_kd * Div::grad(logp, logq, p, q, prm.mix, row_c);
      }
      if (use_ce) g = g + v_ce * (ce_separate ? exp_nonpositive(z - v_max_s - v_log_sum_1) : q);
      if (n == kW && args.stream_grad) {
        store_streaming(g, args.grad + i);
      } else {
        g.store(args.grad + i, n);
      }
    });
    if (write_grad && use_ce) {
      stream_fence();
      args.grad[args.label] -= prm.ce_weight * scale;
    }
  }

  double loss = prm.kd_scale * divergence.value();
  if (use_ce) {  // CE = lse(z) - z_y = (max - z_y) + log sum exp(z - max)
    const double log_sum = std::log(ce_separate ? st.sum_1 : st.sum_t);
    loss += prm.ce_weight * (static_cast<double>(st.max - args.student[args.label]) + log_sum);
  }
  return static_cast<float>(loss);
}

using RowFn = float (*)(const RowArgs&, const KDParams&, RowScratch&, int*);

RowFn row_kernel_for(Divergence div) {
  RowFn fn = nullptr;
  dispatch_divergence(div, [&](auto tag) { fn = &kd_row<decltype(tag)>; });
  return fn;
}

// bf16/fp16 <-> fp32 row conversion, vectorised (the generic at::vec::convert is a scalar loop).
template <typename scalar_t>
void widen(const scalar_t* src, float* dst, int64_t n) {
  using LowVec = at::vec::Vectorized<scalar_t>;
  int64_t i = 0;
  for (; i + LowVec::size() <= n; i += LowVec::size()) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(LowVec::loadu(src + i));
    lo.store(dst + i);
    hi.store(dst + i + kW);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename scalar_t>
void narrow(const float* src, scalar_t* dst, int64_t n) {
  using LowVec = at::vec::Vectorized<scalar_t>;
  int64_t i = 0;
  for (; i + LowVec::size() <= n; i += LowVec::size())
    store_streaming(at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i), Vec::loadu(src + i + kW)),
                    dst + i);
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// Returns a pointer to the row as fp32: the row itself for float input, else `buf` filled by
// one conversion pass (bf16/fp16 are widened once, all math is fp32).
template <typename scalar_t>
const float* row_as_float(const scalar_t* row, int64_t V, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    buf.resize(V);
    widen(row, buf.data(), V);
    return buf.data();
  }
}

template <typename student_t, typename teacher_t>
void kd_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
             float grad_scale, const KDParams& prm, float* row_loss, at::Tensor* grad,
             std::atomic<int>* errors) {
  const int64_t N = student.size(0), V = student.size(1);
  const student_t* s_base = student.const_data_ptr<student_t>();
  const teacher_t* t_base = teacher.const_data_ptr<teacher_t>();
  student_t* g_base = grad ? grad->mutable_data_ptr<student_t>() : nullptr;
  const RowFn row_fn = row_kernel_for(prm.divergence);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    int local_errors = kRowOk;
    for (int64_t r = begin; r < end; ++r) {
      RowArgs args;
      args.vocab = V;
      args.grad_scale = grad_scale;
      args.label = labels ? labels[r] : prm.ignore_index;
      student_t* g_row = g_base ? g_base + r * V : nullptr;
      if (labels && args.label != prm.ignore_index && (args.label < 0 || args.label >= V)) {
        local_errors |= kBadLabel;
        args.label = prm.ignore_index;
      }
      if (labels && args.label == prm.ignore_index) {  // ignored row: no loss, no gradient
        row_loss[r] = 0.f;
        if (g_row) std::fill(g_row, g_row + V, student_t(0));
        continue;
      }
      args.student = row_as_float(s_base + r * V, V, scratch.s_buf);
      args.teacher = row_as_float(t_base + r * V, V, scratch.t_buf);
      args.stream_grad = std::is_same_v<student_t, float>;
      if constexpr (std::is_same_v<student_t, float>) {
        args.grad = g_row;
      } else {
        if (g_row) scratch.g_buf.resize(V);
        args.grad = g_row ? scratch.g_buf.data() : nullptr;
      }
      row_loss[r] = row_fn(args, prm, scratch, &local_errors);
      if constexpr (!std::is_same_v<student_t, float>) {
        if (g_row) narrow(scratch.g_buf.data(), g_row, V);
      }
    }
    stream_fence();
    if (local_errors) errors->fetch_or(local_errors);
  });
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const at::Tensor& grad_scale, int64_t divergence,
    double temperature, double beta, double kd_weight, double ce_weight, bool scale_by_t2,
    int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(student_logits.dim() == 2 && teacher_logits.sizes() == student_logits.sizes(),
                    "student_logits and teacher_logits must be [N, V] of equal shape");
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= static_cast<int64_t>(Divergence::kTVD),
                    "unknown divergence id ", divergence);
  const at::Tensor student = student_logits.contiguous();
  const at::Tensor teacher = teacher_logits.contiguous();
  const int64_t N = student.size(0), V = student.size(1);
  at::Tensor label_tensor;
  const int64_t* label_ptr = nullptr;
  if (labels.has_value()) {
    label_tensor = labels->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(label_tensor.numel() == N, "labels must have one entry per row");
    label_ptr = label_tensor.const_data_ptr<int64_t>();
  }
  const KDParams prm = make_kd_params(divergence, static_cast<float>(temperature),
                                      static_cast<float>(beta), static_cast<float>(kd_weight),
                                      static_cast<float>(ce_weight), scale_by_t2, ignore_index);
  const float scale = grad_scale.item<float>();

  at::Tensor row_loss = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? empty_huge_pages({N, V}, student.options())
                                 : at::empty({0}, student.options());
  std::atomic<int> errors{kRowOk};
  dispatch_float_types(student.scalar_type(), "student_logits", [&](auto s_tag) {
    dispatch_float_types(teacher.scalar_type(), "teacher_logits", [&](auto t_tag) {
      kd_rows<decltype(s_tag), decltype(t_tag)>(student, teacher, label_ptr, scale, prm,
                                                row_loss.mutable_data_ptr<float>(),
                                                compute_grad ? &grad : nullptr, &errors);
    });
  });
  const int err = errors.load();
  TORCH_CHECK_VALUE(!(err & kBadTeacher), "teacher_logits contains NaN or +inf");
  TORCH_CHECK_VALUE(!(err & kBadStudent), "student_logits contains NaN or +inf");
  TORCH_CHECK_VALUE(!(err & kBadLabel), "labels must lie in [0, ", V, ") or equal ignore_index (",
                    ignore_index, ")");
  return {row_loss, grad};
}

}  // namespace kdkernels
