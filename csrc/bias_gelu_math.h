// Per-element GELU math, exact-erf and tanh forms with their derivatives, shared by the CPU kernel
// (bias_gelu.cpp) and any CUDA kernel. No torch headers: callers pass plain accumulator values.
//
// float uses branch-free polynomial erf/tanh built on fast_math.h's exp so `#pragma omp simd` loops
// vectorise (glibc declares its vector erff/tanhf only under -ffast-math). Their absolute error (below
// 3e-7) is far inside float32's tolerance once added to 1 as GELU does. double calls the std functions:
// it is the oracle dtype.
#pragma once

#include <cmath>

#include "common.h"
#include "fast_math.h"

namespace hetrain {
namespace bias_gelu {

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kCubic = 0.044715;                      // the tanh form's cubic coefficient

// erf for float from e = exp(-x*x), which GELU's derivative needs anyway: Abramowitz & Stegun
// 7.1.26 (absolute error below 1.5e-7) on |x|, sign restored. double ignores e and calls erf.
HETRAIN_HD float erf_given_exp(float x, float e) {
  const float a = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float r = 1.0f - p * t * e;
  return x < 0.0f ? -r : r;
}
HETRAIN_HD double erf_given_exp(double x, double) { return erf(x); }

HETRAIN_HD float erf_fast(float x) { return erf_given_exp(x, exp_fast(-x * x)); }

// tanh(u) = 1 - 2 / (1 + e^(2u)): saturates to +-1 through the clamped exp, no branch.
HETRAIN_HD float tanh_fast(float u) { return 1.0f - 2.0f / (1.0f + exp_fast(2.0f * u)); }

HETRAIN_HD float erf_of(float x) { return erf_fast(x); }
HETRAIN_HD double erf_of(double x) { return erf(x); }
HETRAIN_HD float tanh_of(float x) { return tanh_fast(x); }
HETRAIN_HD double tanh_of(double x) { return tanh(x); }

// gelu(z) = z * Phi(z), Phi the standard normal CDF.
template <typename acc_t>
HETRAIN_HD acc_t gelu_erf(acc_t z) {
  return acc_t(0.5) * z * (acc_t(1) + erf_of(z * acc_t(kSqrtHalf)));
}

// d gelu / dz = Phi(z) + z * phi(z).
template <typename acc_t>
HETRAIN_HD acc_t gelu_erf_grad(acc_t z) {
  // exp(-(z / sqrt 2)^2), shared by erf and the density; flushed to 0 far out, where z * e must vanish
  const acc_t e = exp_flushed(acc_t(-0.5) * z * z);
  const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf_given_exp(z * acc_t(kSqrtHalf), e));
  return cdf + z * acc_t(kInvSqrt2Pi) * e;
}

// gelu(z) ~= z/2 * (1 + tanh(sqrt(2/pi) * (z + 0.044715 z^3))).
template <typename acc_t>
HETRAIN_HD acc_t gelu_tanh(acc_t z) {
  const acc_t t = tanh_of(acc_t(kSqrt2OverPi) * (z + acc_t(kCubic) * z * z * z));
  return acc_t(0.5) * z * (acc_t(1) + t);
}

// Its derivative: (1 + t)/2 + z/2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 z^2).
template <typename acc_t>
HETRAIN_HD acc_t gelu_tanh_grad(acc_t z) {
  const acc_t t = tanh_of(acc_t(kSqrt2OverPi) * (z + acc_t(kCubic) * z * z * z));
  const acc_t du = acc_t(kSqrt2OverPi) * (acc_t(1) + acc_t(3 * kCubic) * z * z);
  return acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * z * (acc_t(1) - t * t) * du;
}

}  // namespace bias_gelu
}  // namespace hetrain
