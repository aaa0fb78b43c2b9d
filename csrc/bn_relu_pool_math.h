// Per-element BatchNorm -> ReLU -> MaxPool2d math, shared by the CPU kernel (bn_relu_pool.cpp) and the
// CUDA kernel (cuda/bn_relu_pool_kernel.cu), so the CPU tests exercise the same formulas. No torch
// headers: callers pass plain accumulator values (float, or double for double inputs).
//
// The normalisation is applied as one fused multiply-add per element, z = fma(x, scale, shift) with
// per-channel scale = invstd * w and shift = b - mean * scale (the form torch's CPU BatchNorm uses too).
// fma is explicit so that forward and backward compute bit-identical z on every compiler and device:
// backward recomputes z to find the ReLU mask, and a contracted/uncontracted mismatch near zero would
// flip it.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace hetrain {
namespace bn_relu_pool {

template <typename acc_t>
HETRAIN_HD acc_t fused_multiply_add(acc_t a, acc_t b, acc_t c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// The BatchNorm output before ReLU (the rounding to the storage type is the caller's).
template <typename acc_t>
HETRAIN_HD acc_t pre_relu(acc_t x, acc_t scale, acc_t shift) {
  return fused_multiply_add(x, scale, shift);
}

// max(v, 0) that keeps NaN, as torch.relu does.
template <typename acc_t>
HETRAIN_HD acc_t relu(acc_t v) {
  return v <= acc_t(0) ? acc_t(0) : v;
}

// Whether candidate v replaces the window's best so far: the first maximum wins, a NaN always does
// (torch's max_pool2d rule, so the in-window argmax matches torch's on ties).
template <typename acc_t>
HETRAIN_HD bool takes_max(acc_t v, acc_t best) {
  return v > best || v != v;
}

// Whether the ReLU lets the gradient through: torch's threshold_backward(grad, relu_out, 0) rule.
template <typename acc_t>
HETRAIN_HD bool relu_passes(acc_t z) {
  return !(z <= acc_t(0));
}

// Per-channel affine form of y = (x - mean) * invstd * w + b.
template <typename acc_t>
HETRAIN_HD acc_t channel_scale(acc_t invstd, acc_t w) {
  return invstd * w;
}
template <typename acc_t>
HETRAIN_HD acc_t channel_shift(acc_t mean, acc_t scale, acc_t b) {
  return b - mean * scale;
}

// 1 / sqrt(var + eps)
template <typename acc_t>
HETRAIN_HD acc_t invstd(acc_t var, acc_t eps) {
  return acc_t(1) / sqrt(var + eps);
}

// Mean and biased variance from sums of (x - pivot) and (x - pivot)^2 over count values; the pivot
// (one value of the channel) keeps the one-pass formula accurate when |mean| >> std.
template <typename acc_t>
HETRAIN_HD void moments(acc_t sum, acc_t sum_sq, acc_t pivot, int64_t count, acc_t* mean, acc_t* var) {
  const acc_t m = sum / acc_t(count);
  const acc_t v = sum_sq / acc_t(count) - m * m;
  *mean = pivot + m;
  *var = v < acc_t(0) ? acc_t(0) : v;  // rounding can make v slightly negative; a NaN stays NaN, as in torch
}

// running <- (1 - momentum) * running + momentum * batch (torch's update; var is the unbiased one).
template <typename acc_t>
HETRAIN_HD acc_t running_update(acc_t running, acc_t batch, acc_t momentum) {
  return (acc_t(1) - momentum) * running + momentum * batch;
}

// Coefficients of the input gradient dx = k_g * g + k_0 + k_x * (x - mean), g being dL/dz (the pooled
// gradient routed through the argmax and the ReLU mask). With batch statistics (training):
//   dx = w * invstd * (g - sum(g) / n - xhat * sum(g * xhat) / n),   xhat = (x - mean) * invstd;
// with fixed statistics (eval, or no BatchNorm) only the first term is left.
template <typename acc_t>
struct GradCoefs {
  acc_t k_g, k_0, k_x;
};

template <typename acc_t>
HETRAIN_HD GradCoefs<acc_t> grad_coefs(acc_t w, acc_t invstd, acc_t sum_g, acc_t sum_gxhat, int64_t count,
                                        bool batch_stats) {
  GradCoefs<acc_t> k;
  k.k_g = w * invstd;
  if (batch_stats && count > 0) {
    k.k_0 = -k.k_g * sum_g / acc_t(count);
    k.k_x = -k.k_g * invstd * sum_gxhat / acc_t(count);
  } else {
    k.k_0 = acc_t(0);
    k.k_x = acc_t(0);
  }
  return k;
}

// Without the k_x term (fixed statistics) an inf or NaN input gets the finite gradient torch gives it, not 0 * inf.
template <typename acc_t>
HETRAIN_HD acc_t input_grad(const GradCoefs<acc_t>& k, acc_t g, acc_t x_minus_mean) {
  const acc_t fixed = k.k_g * g + k.k_0;
  return k.k_x == acc_t(0) ? fixed : fused_multiply_add(k.k_x, x_minus_mean, fixed);
}

// Pooling geometry along one axis (padding counts as -inf, never chosen). Templated on the index type so
// a GPU kernel can keep its divisions in 32 bits.
template <typename index_t>
HETRAIN_HD index_t pooled_size(index_t in, index_t kernel, index_t stride, index_t pad) {
  return (in + 2 * pad - kernel) / stride + 1;
}

// First input index of output o's window (may be negative: padding).
template <typename index_t>
HETRAIN_HD index_t window_start(index_t o, index_t stride, index_t pad) {
  return o * stride - pad;
}

// The outputs whose windows hold input index i: [first, last] (empty when first > last).
template <typename index_t>
HETRAIN_HD index_t first_window(index_t i, index_t kernel, index_t stride, index_t pad) {
  const index_t num = i + pad - kernel + 1;
  return num <= 0 ? 0 : (num + stride - 1) / stride;
}
template <typename index_t>
HETRAIN_HD index_t last_window(index_t i, index_t stride, index_t pad, index_t out) {
  const index_t o = (i + pad) / stride;
  return o < out - 1 ? o : out - 1;
}

}  // namespace bn_relu_pool
}  // namespace hetrain
