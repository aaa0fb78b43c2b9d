// Per-element RMSNorm math, shared by the CPU kernel (rms_norm.cpp) and any CUDA kernel, so the
// CPU tests exercise the same formulas. No torch headers: callers pass plain accumulator values.
#pragma once

#include <cmath>

#include "common.h"

namespace hetrain {
namespace rms_norm {

// 1 / sqrt(mean(x^2) + eps): the only statistic saved for backward.
template <typename acc_t>
HETRAIN_HD acc_t rstd(acc_t mean_sq, acc_t eps) {
  return acc_t(1) / sqrt(mean_sq + eps);
}

// y = x * rstd * w
template <typename acc_t>
HETRAIN_HD acc_t forward(acc_t x, acc_t rstd, acc_t w) {
  return x * rstd * w;
}

// dx = rstd * (g - xhat * mean(g * xhat)), with g = dy * w and xhat = x * rstd.
template <typename acc_t>
HETRAIN_HD acc_t input_grad(acc_t g, acc_t xhat, acc_t rstd, acc_t mean_gxhat) {
  return rstd * (g - xhat * mean_gxhat);
}

}  // namespace rms_norm
}  // namespace hetrain
