// gelu(x + bias) over rows on the CPU. Forward writes only the activation; backward recomputes
// from x and bias (never the saved output) and reduces the bias gradient through per-task partial
// sums (no shared accumulator). The approximation is a template argument: no per-element branch.
#include <ATen/Parallel.h>
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "bias_gelu_math.h"
#include "checks.h"
#include "cpu_chunks.h"
#include "cpu_loops.h"

namespace hetrain {
namespace bias_gelu {

// The argument checks the CPU kernels and the CUDA binding (csrc/cuda/bias_gelu_binding.cpp) share.
bool is_tanh(const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "hetrain.bias_gelu: approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

void check_bias(const char* op, const at::Tensor& x, const at::Tensor& bias) {
  check_rows(op, "x", x);
  check_vector(op, "bias", std::optional<at::Tensor>(bias), x);
}

}  // namespace bias_gelu

namespace {

using bias_gelu::check_bias;
using bias_gelu::is_tanh;


// Rows per parallel task: enough elements that the scheduling cost is noise.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)); }

template <typename acc_t, bool TANH>
inline acc_t gelu(acc_t z) {
  if constexpr (TANH) return bias_gelu::gelu_tanh<acc_t>(z);
  else return bias_gelu::gelu_erf<acc_t>(z);
}

template <typename acc_t, bool TANH>
inline acc_t gelu_grad(acc_t z) {
  if constexpr (TANH) return bias_gelu::gelu_tanh_grad<acc_t>(z);
  else return bias_gelu::gelu_erf_grad<acc_t>(z);
}

// The GELU loops run on accumulator-type arrays only, so they vectorise whatever the storage type:
// 16-bit rows are converted in chunks of kChunk through these loops of their own (c10's scalar
// BFloat16/Half conversions do not vectorise: the rounding has a NaN branch).
constexpr int64_t kChunk = 512;

void to_acc(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
void to_acc(const double* src, double* dst, int64_t n) { std::copy(src, src + n, dst); }
void from_acc(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
void from_acc(const double* src, double* dst, int64_t n) { std::copy(src, src + n, dst); }

void to_acc(const at::BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = widen(src[j]);
}

void from_acc(const float* src, at::BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = narrow<at::BFloat16>(src[j]);
}

void to_acc(const at::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
#ifdef __F16C__
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
#endif
  for (; j < n; ++j) dst[j] = float(src[j]);
}

void from_acc(const float* src, at::Half* dst, int64_t n) {
  int64_t j = 0;
#ifdef __F16C__
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; j < n; ++j) dst[j] = at::Half(src[j]);
}

template <typename acc_t, bool TANH>
void gelu_span(const acc_t* x, const acc_t* b, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = gelu<acc_t, TANH>(x[j] + b[j]);
}

// dx = dy * gelu'(x + b), and the bias-gradient partial row pb += dx.
template <typename acc_t, bool TANH>
void gelu_grad_span(const acc_t* dy, const acc_t* x, const acc_t* b, acc_t* dx, acc_t* pb, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t g = dy[j] * gelu_grad<acc_t, TANH>(x[j] + b[j]);
    dx[j] = g;
    pb[j] += g;
  }
}

template <typename scalar_t>
constexpr bool stores_acc = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

template <typename scalar_t>
std::vector<acc_type<scalar_t>> bias_in_acc(const scalar_t* b, int64_t N) {
  std::vector<acc_type<scalar_t>> out(N);
  to_acc(b, out.data(), N);
  return out;
}

template <typename scalar_t, bool TANH>
void forward_rows(const scalar_t* x, const scalar_t* b, scalar_t* y, int64_t M, int64_t N) {
  using acc_t = acc_type<scalar_t>;
  const std::vector<acc_t> bias = bias_in_acc(b, N);
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    acc_t xb[kChunk], yb[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (stores_acc<scalar_t>) {
        gelu_span<acc_t, TANH>(x + r * N, bias.data(), y + r * N, N);
      } else {
        for (int64_t j0 = 0; j0 < N; j0 += kChunk) {
          const int64_t n = std::min(kChunk, N - j0);
          to_acc(x + r * N + j0, xb, n);
          gelu_span<acc_t, TANH>(xb, bias.data() + j0, yb, n);
          from_acc(yb, y + r * N + j0, n);
        }
      }
    }
  });
}

template <typename scalar_t, bool TANH>
void backward_rows(const scalar_t* dy, const scalar_t* x, const scalar_t* b, scalar_t* dx, scalar_t* db, int64_t M,
                   int64_t N) {
  using acc_t = acc_type<scalar_t>;
  const std::vector<acc_t> bias = bias_in_acc(b, N);
  // One partial bias-gradient row per chunk of rows, summed at the end.
  const int64_t chunks = chunk_count(M, N);
  std::vector<acc_t> part(chunks * N, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    acc_t dyb[kChunk], xb[kChunk], dxb[kChunk];
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* pb = part.data() + c * N;
      for (int64_t r = M * c / chunks, r1 = M * (c + 1) / chunks; r < r1; ++r) {
        if constexpr (stores_acc<scalar_t>) {
          gelu_grad_span<acc_t, TANH>(dy + r * N, x + r * N, bias.data(), dx + r * N, pb, N);
        } else {
          for (int64_t j0 = 0; j0 < N; j0 += kChunk) {
            const int64_t n = std::min(kChunk, N - j0);
            to_acc(dy + r * N + j0, dyb, n);
            to_acc(x + r * N + j0, xb, n);
            gelu_grad_span<acc_t, TANH>(dyb, xb, bias.data() + j0, dxb, pb + j0, n);
            from_acc(dxb, dx + r * N + j0, n);
          }
        }
      }
    }
  });
  std::vector<acc_t> total(N);
  at::parallel_for(0, N, column_grain(chunks), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      acc_t s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += part[c * N + j];
      total[j] = s;
    }
  });
  from_acc(total.data(), db, N);
}

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& bias, std::string approximate) {
  check_bias("bias_gelu_fwd", x, bias);
  const bool tanh = is_tanh(approximate);
  const at::Tensor xc = x.contiguous(), bc = bias.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t M = x.size(0), N = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_fwd_cpu", [&] {
    auto run = tanh ? forward_rows<scalar_t, true> : forward_rows<scalar_t, false>;
    run(xc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), M, N);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& bias, std::string approximate) {
  check_bias("bias_gelu_bwd", x, bias);
  check_like("bias_gelu backward", "dy", dy, x);
  const bool tanh = is_tanh(approximate);
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous(), bc = bias.contiguous();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor db = at::empty_like(bc);
  const int64_t M = x.size(0), N = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_bwd_cpu", [&] {
    auto run = tanh ? backward_rows<scalar_t, true> : backward_rows<scalar_t, false>;
    run(dyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
        dx.data_ptr<scalar_t>(), db.data_ptr<scalar_t>(), M, N);
  });
  return {dx, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def("bias_gelu_fwd(Tensor x, Tensor bias, str approximate) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor bias, str approximate) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hetrain_C, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}

}  // namespace hetrain
