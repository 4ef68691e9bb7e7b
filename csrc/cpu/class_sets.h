// The strongly correlated class set S of a CAKD row (csrc/cpu/cakd_cpu.cpp), chosen from the
// teacher's logits without sorting the vocabulary. Top-k with k <= 64 is one teacher pass that
// keeps the classes above the current k-th logit in a small buffer (one SIMD compare skips almost
// every vector); the mass rule first tries the teacher's 64 best classes the same way; larger k,
// and the mass rule on flat teachers, bisect a logit threshold with SIMD counting passes over the
// row (in L2 by then). Among equal teacher logits the lower class index ranks first, so S is
// deterministic. NaN never enters a selection (its row is reported by the statistics pass).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kdkernels {

// A class and its teacher logit in teacher rank order: larger logit first, and the lower class
// index first among equal logits.
struct Ranked {
  float logit;
  int64_t index;
};

// Up to this many classes, top-k selection keeps a small buffer (RunningTopK); beyond, it bisects
// a logit threshold with SIMD counting passes over the row (in L2 by then).
constexpr int64_t kBufferedSelection = 64;

// The k classes that come first in teacher rank order among those offered so far, for a row
// offered in index order, k <= kBufferedSelection. Since classes arrive in index order, a newcomer
// ranks before the current k-th best only with a strictly larger logit: one SIMD compare against
// kth() screens a whole vector, and offer() takes the lanes above it. The buffer holds the best k
// plus newcomers; a full buffer is trimmed back to the best k (nth_element), which raises kth().
class RunningTopK {
 public:
  // Starts from the row's first k classes (k < V); buffer: per-thread scratch.
  RunningTopK(const float* teacher, int64_t k, std::vector<Ranked>& buffer);
  float kth() const { return kth_; }
  // Offers the classes [i, i + n) whose logits exceed kth() (the first k are already in).
  void offer(const float* teacher, int64_t i, int64_t n) { offer_lanes(teacher + i, i, n); }
  // The same from their logits alone: lanes[j - i] is class j's.
  void offer_lanes(const float* lanes, int64_t i, int64_t n);
  // Appends the k classes to `out`.
  void finish(std::vector<int64_t>& out);

 private:
  float trim();
  std::vector<Ranked>& buffer_;
  int64_t k_;
  size_t capacity_;
  float kth_;
};

// Appends to `out` S of the top-k rule: the k classes that come first in teacher rank order (all
// of them when k >= V). teacher, student: [V] rows (the student only prefetched for the pass that
// follows); buffer: per-thread scratch.
void select_top_k(const float* teacher, const float* student, int64_t V, int64_t k, std::vector<Ranked>& buffer,
                  std::vector<int64_t>& out);

// Appends to `out` S of the mass rule: the fewest classes, in teacher rank order, whose teacher
// probabilities at temperature T = 1 / inv_t sum to >= mass (the crossing class included).
// buffer, probs: per-thread scratch. Rows without a teacher distribution (all -inf, NaN, +inf)
// may leave `out` holding any classes: their losses do not use S.
void select_mass(const float* teacher, const float* student, int64_t V, float inv_t, float mass,
                 std::vector<Ranked>& buffer, std::vector<float>& probs, std::vector<int64_t>& out);

}  // namespace kdkernels
