// Dropout on the CPU for a tensor of any shape: y = x / (1 - p) where kept, 0 where dropped.
// The mask is never stored: element i of the flattened (row-major) tensor is kept when the counter
// hash of (seed, i) in dropout_math.h clears the threshold of p, the same decision
// dropout_add_layer_norm makes. Dropout is diagonal, so its backward is the same map applied to the
// upstream gradient with the same seed: one kernel serves both directions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "checks.h"
#include "cpu_loops.h"
#include "dropout_math.h"

namespace hetrain {
namespace {


// Elements per parallel task: enough that the scheduling cost is noise.
constexpr int64_t kGrain = 32768;

// v where kept, +0 where dropped (also for an infinite or NaN v), as a bit mask rather than a select:
// GCC if-converts the mask into vector code on AVX2 and SSE, but keeps a branch for `keep ? v : 0`
// there (only AVX-512's masked moves vectorised that form, about 3x slower on AVX2 machines).
inline float keep_or_zero(bool keep, float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  u &= 0u - static_cast<uint32_t>(keep);
  memcpy(&v, &u, sizeof(v));
  return v;
}
inline double keep_or_zero(bool keep, double v) {
  uint64_t u;
  memcpy(&u, &v, sizeof(u));
  u &= 0ull - static_cast<uint64_t>(keep);
  memcpy(&v, &u, sizeof(v));
  return v;
}

// y[j] = x[j] * scale or 0 for stream elements begin .. begin + n - 1, which lie in one block of 2^32
// (so the high key is one value and the low index does not wrap).
template <typename scalar_t>
void dropout_span(const scalar_t* x, scalar_t* y, uint64_t begin, int64_t n, const dropout::Call& m) {
  using acc_t = acc_type<scalar_t>;
  const uint32_t klo = dropout::key_lo(m.seed), th = m.threshold;
  const uint32_t khi = dropout::key_hi(m.seed, static_cast<uint32_t>(begin >> 32));
  const uint32_t lo = static_cast<uint32_t>(begin);
  const acc_t scale = acc_t(m.scale);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = dropout::bits24(klo, khi, lo + static_cast<uint32_t>(j)) >= th;
    y[j] = narrow<scalar_t>(keep_or_zero(keep, widen(x[j]) * scale));
  }
}

template <typename scalar_t>
void dropout_all(const scalar_t* x, scalar_t* y, int64_t numel, const dropout::Call& m) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const uint64_t index = m.offset + static_cast<uint64_t>(i);  // element i's place in the stream
      const uint64_t to_boundary = (index | 0xFFFFFFFFull) + 1 - index;  // up to the next multiple of 2^32
      const int64_t stop = static_cast<int64_t>(std::min<uint64_t>(static_cast<uint64_t>(end), i + to_boundary));
      dropout_span<scalar_t>(x + i, y + i, index, stop - i, m);
      i = stop;
    }
  });
}

// Forward (x) and backward (dy) alike: a contiguous tensor of x's shape.
at::Tensor dropout_cpu(const at::Tensor& x, const at::Tensor& seed, double p) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "hetrain.dropout: x must be a floating tensor, got ",
              x.scalar_type());
  const dropout::Call mask = dropout_call("dropout", seed, p);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cpu", [&] {
    dropout_all<scalar_t>(xc.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), xc.numel(), mask);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) { m.def("dropout_fwd(Tensor x, Tensor seed, float p) -> Tensor"); }

TORCH_LIBRARY_IMPL(hetrain_C, CPU, m) { m.impl("dropout_fwd", &dropout_cpu); }

}  // namespace hetrain
