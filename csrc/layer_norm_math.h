// Per-element LayerNorm math, shared by the CPU kernel (layer_norm.cpp) and any CUDA kernel, so the
// CPU tests exercise the same formulas. No torch headers: callers pass plain accumulator values.
#pragma once

#include <cmath>

#include "common.h"

namespace hetrain {
namespace layer_norm {

// 1 / sqrt(var + eps): the reciprocal standard deviation saved for backward.
template <typename acc_t>
HETRAIN_HD acc_t rstd(acc_t var, acc_t eps) {
  return acc_t(1) / sqrt(var + eps);
}

// y = (x - mean) * rstd * w + b
template <typename acc_t>
HETRAIN_HD acc_t forward(acc_t x, acc_t mean, acc_t rstd, acc_t w, acc_t b) {
  return (x - mean) * rstd * w + b;
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), with g = dy * w and xhat the normalised input.
template <typename acc_t>
HETRAIN_HD acc_t input_grad(acc_t g, acc_t xhat, acc_t rstd, acc_t mean_g, acc_t mean_gxhat) {
  return rstd * (g - mean_g - xhat * mean_gxhat);
}

}  // namespace layer_norm
}  // namespace hetrain
