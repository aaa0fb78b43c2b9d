// One element of an AdamW step (decoupled weight decay, bias-corrected moments), shared by the CPU
// kernel (sparse_adamw.cpp) and any CUDA kernel. No torch headers: callers pass plain values.
#pragma once

#include <cmath>

#include "common.h"

namespace hetrain {
namespace adamw {

// The per-step scalars, computed once on the host in double as torch.optim.AdamW does. 1 - beta is its own
// field: taken in float32 from a float32-rounded beta it is off by up to 3e-8 / (1 - beta) relative (1e-3
// at beta2 = 0.99999), where torch rounds the double difference once.
struct Coefficients {
  double decay;            // 1 - lr * weight_decay
  double one_minus_beta1;  // 1 - beta1
  double beta2;
  double one_minus_beta2;  // 1 - beta2
  double step_size;        // lr / (1 - beta1^step)
  double bc2_sqrt;         // sqrt(1 - beta2^step)
  double eps;
};

inline Coefficients coefficients(int64_t step, double lr, double beta1, double beta2, double eps,
                                 double weight_decay) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return {1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, lr / bc1, std::sqrt(bc2), eps};
}

// sqrt in the argument's own precision on host and device (a bare sqrt(float) is the double one on the host).
HETRAIN_HD float root(float x) { return sqrtf(x); }
HETRAIN_HD double root(double x) { return sqrt(x); }

// p, m, v updated in place for gradient g, in the order torch.optim.AdamW applies them.
template <typename acc_t>
HETRAIN_HD void update(acc_t& p, acc_t& m, acc_t& v, acc_t g, acc_t decay, acc_t one_minus_beta1, acc_t beta2,
                       acc_t one_minus_beta2, acc_t step_size, acc_t bc2_sqrt, acc_t eps) {
  p *= decay;
  m += (g - m) * one_minus_beta1;
  v = v * beta2 + one_minus_beta2 * g * g;
  p -= step_size * m / (root(v) / bc2_sqrt + eps);
}

}  // namespace adamw
}  // namespace hetrain
