// exp for float that `#pragma omp simd` loops can vectorise, shared by the kernels whose loops need it
// (GELU's erf/tanh, softmax cross-entropy). glibc declares its vector expf only under -ffast-math, and
// the scalar call costs several times the memory traffic of a row op. double calls std::exp: it is the
// oracle dtype. No torch headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace hetrain {

// e^x for float: x = k ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7 (relative error
// below 1e-7), 2^k written straight into the exponent bits. x is clamped to [-87, 88] first, so the result
// saturates (at e^-87, about 1.6e-38, below) instead of under- or overflowing. Branch-free.
HETRAIN_HD float exp_fast(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // keeps 2^k a normal float
  const float round = 12582912.0f;                     // 1.5 * 2^23: adding it rounds to an integer
  const float k = (x * 1.44269504088896341f + round) - round;
  float r = x - k * 0.693145751953125f;  // ln2 in two parts so the reduction is exact
  r = r - k * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

HETRAIN_HD float exp_of(float x) { return exp_fast(x); }
HETRAIN_HD double exp_of(double x) { return exp(x); }

// e^x, exactly 0 below e^-87 where exp_fast saturates: for terms that must vanish (a softmax's smallest
// probabilities, a density far in its tail) rather than stay at float's smallest normal times a large factor.
HETRAIN_HD float exp_flushed(float x) { return x < -87.0f ? 0.0f : exp_fast(x); }
HETRAIN_HD double exp_flushed(double x) { return exp(x); }

}  // namespace hetrain
