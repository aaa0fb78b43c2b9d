// Per-row softmax cross-entropy math, shared by the CPU kernel (linear_cross_entropy.cpp) and any CUDA
// kernel, so the CPU tests exercise the same formulas. No torch headers: callers pass plain values.
#pragma once

#include <cmath>

#include "common.h"
#include "fast_math.h"

namespace hetrain {
namespace linear_cross_entropy {

// Loss of one row with label smoothing eps: (1 - eps) * (lse - z_t) + eps * mean_j (lse - z_j), with
// lse = m + log(s), m the row's largest logit and s = sum_j exp(z_j - m), written with keep = 1 - eps and
// spread = eps / V as log(s) + keep * (m - z_t) + spread * sum_j (m - z_j). Every term is a distance below m,
// never a logit itself: lse - z_t rounded a small loss at the logits' magnitude (0.125 for 0.145 at logits near
// 2^20, 0 at 2^24) and sum_j z_j overflowed (logits near 3e37). A term whose weight is 0 is left out, so a
// vocabulary masked with -inf logits gives a finite loss without smoothing (0 * inf would be NaN).
template <typename acc_t>
HETRAIN_HD acc_t row_loss(acc_t log_s, acc_t m_minus_target, acc_t sum_m_minus_z, acc_t keep, acc_t spread) {
  return log_s + (keep != acc_t(0) ? keep * m_minus_target : acc_t(0)) +
         (spread != acc_t(0) ? spread * sum_m_minus_z : acc_t(0));
}

// d(loss)/d(z_j) * scale = (softmax_j - spread - keep * [j == target]) * scale, from p_j = softmax_j.
template <typename acc_t>
HETRAIN_HD acc_t logit_grad(acc_t p, bool is_target, acc_t keep, acc_t spread, acc_t scale) {
  return (p - spread - (is_target ? keep : acc_t(0))) * scale;
}

}  // namespace linear_cross_entropy
}  // namespace hetrain
