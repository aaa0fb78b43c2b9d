// Input checks shared by the torch bindings: every bad input becomes a Python error naming the problem.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "dropout_math.h"

namespace hetrain {

// x must be a 2-D (rows, features) floating tensor.
inline void check_rows(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "hetrain.", op, ": ", name, " must be 2-D (rows, features), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "hetrain.", op, ": ", name,
              " must be a floating tensor, got ", x.scalar_type());
}

// An optional per-feature vector must match x's last dimension, dtype and device.
inline void check_vector(const char* op, const char* name, const std::optional<at::Tensor>& v, const at::Tensor& x) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == x.size(-1), "hetrain.", op, ": ", name, " must have shape (",
              x.size(-1), ",), got ", v->sizes());
  TORCH_CHECK(v->scalar_type() == x.scalar_type(), "hetrain.", op, ": ", name, " dtype ", v->scalar_type(),
              " differs from the input's ", x.scalar_type());
  TORCH_CHECK(v->device() == x.device(), "hetrain.", op, ": ", name, " is on ", v->device(),
              " but the input is on ", x.device());
}

// eps must be a finite number >= 0 (a NaN fails every comparison, so it is named as such too).
inline void check_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "hetrain.", op, ": eps must be a finite number >= 0, got ", eps);
}

// A tensor that travels with x (a residual, a backward's dy) must have x's shape, dtype and device.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(), "hetrain.",
              op, ": ", name, " must match x (", x.sizes(), " ", x.scalar_type(), " on ", x.device(), "), got ",
              t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

// Statistics and accumulation dtype of the row-wise kernels: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A per-row statistic a forward saved for backward (mean, rstd): (rows,) in x's stats_dtype, on x's device.
inline void check_row_stats(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const at::ScalarType dtype = stats_dtype(x.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.scalar_type() == dtype && t.device() == x.device(),
              "hetrain.", op, ": ", name, " must have shape (", x.size(0), ",) and dtype ", dtype, " on ", x.device(),
              ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

// A dropout stream: its seed and the counter offset of the tensor's first element (a micro-batch's
// first element in its whole batch), read from an int64 CPU tensor (seed) or (seed, offset).
struct DropoutStream {
  uint64_t seed;
  uint64_t offset;
};

inline DropoutStream read_stream(const char* op, const at::Tensor& seed) {
  TORCH_CHECK((seed.numel() == 1 || seed.numel() == 2) && seed.dim() == 1 && seed.scalar_type() == at::kLong &&
                  seed.device().is_cpu(),
              "hetrain.", op, ": seed must be int64 (seed,) or (seed, offset) on the CPU, got ", seed.sizes(), " ",
              seed.scalar_type(), " on ", seed.device());
  const at::Tensor values = seed.contiguous();
  const int64_t* v = values.const_data_ptr<int64_t>();
  const int64_t offset = seed.numel() == 2 ? v[1] : 0;
  TORCH_CHECK(offset >= 0, "hetrain.", op, ": the counter offset seed[1] must be >= 0, got ", offset);
  return {static_cast<uint64_t>(v[0]), static_cast<uint64_t>(offset)};
}

// The dropout call of a stream and p (dropout_math.h), p checked.
inline dropout::Call call_of(const char* op, uint64_t seed, uint64_t offset, double p) {
  TORCH_CHECK(p >= 0 && p <= 1, "hetrain.", op, ": p must be in [0, 1], got ", p);
  return {seed, offset, dropout::drop_threshold(p), p < 1 ? 1.0 / (1.0 - p) : 0.0};
}

// The dropout call of a seed tensor and p, both checked.
inline dropout::Call dropout_call(const char* op, const at::Tensor& seed, double p) {
  const DropoutStream s = read_stream(op, seed);
  return call_of(op, s.seed, s.offset, p);
}

// The dropout call of a CUDA kernel on x. A seed on the CPU is read here, with no device sync. A seed on x's
// device is the int64 (seed, offset) of a call captured in a CUDA graph, which the graph's own draw rewrites on
// every replay: the kernel reads it there (dropout::resolved).
inline dropout::Call device_dropout_call(const char* op, const at::Tensor& seed, double p, const at::Tensor& x) {
  if (seed.device().is_cpu()) return dropout_call(op, seed, p);
  TORCH_CHECK(seed.device() == x.device() && seed.dim() == 1 && seed.numel() == 2 &&
                  seed.scalar_type() == at::kLong && seed.is_contiguous(),
              "hetrain.", op, ": a seed on a device must be int64 (seed, offset) on x's device ", x.device(),
              ", got ", seed.sizes(), " ", seed.scalar_type(), " on ", seed.device());
  dropout::Call call = call_of(op, 0, 0, p);
  call.stream = seed.const_data_ptr<int64_t>();
  return call;
}

}  // namespace hetrain
