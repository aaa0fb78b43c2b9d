// Per-element LayerNorm math, shared by the CPU kernel (layer_norm.cpp) and any CUDA kernel, so the
// CPU tests exercise the same formulas. No torch headers: callers pass plain accumulator values.
#pragma once

#include <cmath>

#include "common.h"

namespace hetrain {
namespace layer_norm {

// 1 / sqrt(var + eps): the reciprocal standard deviation saved for backward. NaN when var + eps is not finite
// (a row whose variance overflows the accumulator): 1 / sqrt(inf) = 0 would give y = b and dx = 0 and hide a
// diverging row from the NaN checks, where torch's layer_norm gives NaN for that row.
template <typename acc_t>
HETRAIN_HD acc_t rstd(acc_t var, acc_t eps) {
  const acc_t v = var + eps;
#if defined(__CUDA_ARCH__)
  const bool finite = isfinite(v);
#else
  const bool finite = std::isfinite(v);
#endif
  return finite ? acc_t(1) / sqrt(v) : acc_t(NAN);
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
