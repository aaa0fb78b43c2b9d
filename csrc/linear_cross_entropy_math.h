// Per-row softmax cross-entropy math, shared by the CPU kernel (linear_cross_entropy.cpp) and any CUDA
// kernel, so the CPU tests exercise the same formulas. No torch headers: callers pass plain values.
#pragma once

#include <cmath>

#include "common.h"
#include "fast_math.h"

namespace hetrain {
namespace linear_cross_entropy {

// Loss of one row with label smoothing eps: (1 - eps) * (lse - z_t) + eps * mean_j (lse - z_j),
// written with keep = 1 - eps and spread = eps / V as lse - keep * z_t - spread * sum_j z_j. A term whose
// weight is 0 is left out, so a vocabulary masked with -inf logits gives a finite loss without smoothing
// (0 * -inf would be NaN).
template <typename acc_t>
HETRAIN_HD acc_t row_loss(acc_t lse, acc_t z_target, acc_t z_sum, acc_t keep, acc_t spread) {
  return lse - (keep != acc_t(0) ? keep * z_target : acc_t(0)) - (spread != acc_t(0) ? spread * z_sum : acc_t(0));
}

// d(loss)/d(z_j) * scale = (softmax_j - spread - keep * [j == target]) * scale, from p_j = softmax_j.
template <typename acc_t>
HETRAIN_HD acc_t logit_grad(acc_t p, bool is_target, acc_t keep, acc_t spread, acc_t scale) {
  return (p - spread - (is_target ? keep : acc_t(0))) * scale;
}

}  // namespace linear_cross_entropy
}  // namespace hetrain
