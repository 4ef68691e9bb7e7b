// The strongly correlated class set S of a CAKD row (csrc/cpu/cakd_cpu.cpp), chosen from the
// teacher's logits without sorting the vocabulary. Top-k with k <= 64 is one teacher pass that
// keeps the classes above the current k-th logit in a small buffer (one SIMD compare skips almost
// every vector); the mass rule first tries the teacher's 64 best classes the same way; larger k,
// and the mass rule on flat teachers, bisect a logit threshold with SIMD counting passes over the
// row (in L2 by then). Among equal teacher logits the lower class index ranks first, so S is
// deterministic. NaN never enters a selection (its row is reported by the statistics pass).
#pragma once

#include <cstdint>
#include <vector>

namespace kdkernels {

// A class and its teacher logit in teacher rank order: larger logit first, and the lower class
// index first among equal logits.
struct Ranked {
  float logit;
  int64_t index;
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
