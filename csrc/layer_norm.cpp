// LayerNorm over the last dimension on the CPU: forward saves only mean and rstd per row; backward
// reduces weight/bias gradients through per-thread partial sums (no shared accumulator).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu_chunks.h"
#include "cpu_loops.h"
#include "layer_norm_math.h"

namespace hetrain {
namespace layer_norm {

// The argument checks of the schemas declared below, shared with the CUDA binding
// (csrc/cuda/layer_norm_binding.cpp).
void check_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, double eps) {
  check_rows("layer_norm_fwd", "x", x);
  check_vector("layer_norm_fwd", "weight", weight, x);
  check_vector("layer_norm_fwd", "bias", bias, x);
  check_eps("layer_norm", eps);
}

void check_backward_args(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const at::Tensor& mean, const at::Tensor& rstd) {
  check_rows("layer_norm_bwd", "x", x);
  check_like("layer_norm backward", "dy", dy, x);
  check_vector("layer_norm_bwd", "weight", weight, x);
  check_row_stats("layer_norm backward", "mean", mean, x);
  check_row_stats("layer_norm backward", "rstd", rstd, x);
}

}  // namespace layer_norm

namespace {


// Rows per parallel task: enough elements that the scheduling cost is noise.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)); }

template <typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t* y,
                  acc_type<scalar_t>* mean, acc_type<scalar_t>* rstd, int64_t M, int64_t N, double eps) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * N;
      scalar_t* yr = y + r * N;
      const acc_t mu = lane_sum<acc_t>(N, [&](int64_t j) { return acc_t(xr[j]); }) / acc_t(N);
      const acc_t sq = lane_sum<acc_t>(N, [&](int64_t j) {
        const acc_t d = acc_t(xr[j]) - mu;
        return d * d;
      });
      const acc_t rs = layer_norm::rstd<acc_t>(sq / acc_t(N), acc_t(eps));
      if (w && b) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j)
          yr[j] = narrow<scalar_t>(layer_norm::forward<acc_t>(acc_t(xr[j]), mu, rs, acc_t(w[j]), acc_t(b[j])));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j)
          yr[j] = narrow<scalar_t>(layer_norm::forward<acc_t>(acc_t(xr[j]), mu, rs, w ? acc_t(w[j]) : acc_t(1),
                                                              b ? acc_t(b[j]) : acc_t(0)));
      }
      mean[r] = mu;
      rstd[r] = rs;
    }
  });
}

// Rows whose second pass is one loop: each reads and writes the dw/db partials once for kBlock rows.
constexpr int64_t kBlock = 4;

// Two passes, both vectorised: each row's sums, then dx of R rows and their dw/db partials in one loop,
// recomputing xhat instead of storing it (a row is in L1, a store is not free). Accumulating R rows per
// load and store of the partials keeps the loop from being bound by them; the partials still add the
// rows in order, so the result does not depend on R.
template <typename scalar_t, bool HAS_W, int64_t R>
void backward_block(const scalar_t* dy, const scalar_t* x, const scalar_t* w, const acc_type<scalar_t>* mean,
                    const acc_type<scalar_t>* rstd, scalar_t* dx, acc_type<scalar_t>* pw, acc_type<scalar_t>* pb,
                    int64_t r0, int64_t N) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* xr[R];
  const scalar_t* dyr[R];
  scalar_t* dxr[R];
  acc_t mu[R], rs[R], mg[R], mgx[R];
  for (int64_t k = 0; k < R; ++k) {
    xr[k] = x + (r0 + k) * N;
    dyr[k] = dy + (r0 + k) * N;
    dxr[k] = dx + (r0 + k) * N;
    mu[k] = mean[r0 + k];
    rs[k] = rstd[r0 + k];
    const scalar_t* xk = xr[k];
    const scalar_t* dyk = dyr[k];
    const acc_t m = mu[k], s = rs[k];
    acc_t sum_g, sum_gx;
    lane_sum2<acc_t>(N, [&](int64_t j, acc_t& sg, acc_t& sgx) {
      const acc_t g = HAS_W ? acc_t(dyk[j]) * acc_t(w[j]) : acc_t(dyk[j]);
      sg += g;
      sgx += g * ((acc_t(xk[j]) - m) * s);
    }, &sum_g, &sum_gx);
    mg[k] = sum_g / acc_t(N);
    mgx[k] = sum_gx / acc_t(N);
  }
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    const acc_t wj = HAS_W ? acc_t(w[j]) : acc_t(1);
    acc_t sw = pw[j], sb = pb[j];
    for (int64_t k = 0; k < R; ++k) {
      const acc_t d = acc_t(dyr[k][j]);
      const acc_t xh = (acc_t(xr[k][j]) - mu[k]) * rs[k];
      dxr[k][j] = narrow<scalar_t>(layer_norm::input_grad<acc_t>(HAS_W ? d * wj : d, xh, rs[k], mg[k], mgx[k]));
      sw += d * xh;
      sb += d;
    }
    pw[j] = sw;
    pb[j] = sb;
  }
}

template <typename scalar_t, bool HAS_W>
void backward_chunk(const scalar_t* dy, const scalar_t* x, const scalar_t* w, const acc_type<scalar_t>* mean,
                    const acc_type<scalar_t>* rstd, scalar_t* dx, acc_type<scalar_t>* pw, acc_type<scalar_t>* pb,
                    int64_t r0, int64_t r1, int64_t N) {
  int64_t r = r0;
  for (; r + kBlock <= r1; r += kBlock)
    backward_block<scalar_t, HAS_W, kBlock>(dy, x, w, mean, rstd, dx, pw, pb, r, N);
  for (; r < r1; ++r) backward_block<scalar_t, HAS_W, 1>(dy, x, w, mean, rstd, dx, pw, pb, r, N);
}

template <typename scalar_t>
void backward_rows(const scalar_t* dy, const scalar_t* x, const scalar_t* w, const acc_type<scalar_t>* mean,
                   const acc_type<scalar_t>* rstd, scalar_t* dx, scalar_t* dw, scalar_t* db, int64_t M,
                   int64_t N) {
  using acc_t = acc_type<scalar_t>;
  // One partial dw/db row per chunk of rows, summed at the end: no shared accumulator.
  const int64_t chunks = chunk_count(M, N);
  std::vector<acc_t> part_w(chunks * N, acc_t(0)), part_b(chunks * N, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = M * c / chunks, r1 = M * (c + 1) / chunks;
      auto* chunk = w ? &backward_chunk<scalar_t, true> : &backward_chunk<scalar_t, false>;
      chunk(dy, x, w, mean, rstd, dx, part_w.data() + c * N, part_b.data() + c * N, r0, r1, N);
    }
  });
  at::parallel_for(0, N, column_grain(chunks), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      acc_t sw = 0, sb = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        sw += part_w[c * N + j];
        sb += part_b[c * N + j];
      }
      if (dw) dw[j] = scalar_t(sw);
      if (db) db[j] = scalar_t(sb);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps) {
  layer_norm::check_forward_args(x, weight, bias, eps);
  const int64_t M = x.size(0), N = x.size(1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(xc);
  at::Tensor mean = at::empty({M}, x.options().dtype(stats_dtype(x.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    forward_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr,
                           bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                           mean.data_ptr<acc_type<scalar_t>>(), rstd.data_ptr<acc_type<scalar_t>>(), M, N, eps);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const at::Tensor& mean, const at::Tensor& rstd,
                                                                  bool has_bias) {
  layer_norm::check_backward_args(dy, x, weight, mean, rstd);
  const int64_t M = x.size(0), N = x.size(1);
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor dw = at::empty({wc.defined() ? N : 0}, x.options());
  at::Tensor db = at::empty({has_bias ? N : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    backward_rows<scalar_t>(dyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                            wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr, mc.const_data_ptr<acc_t>(),
                            rc.const_data_ptr<acc_t>(), dx.data_ptr<scalar_t>(),
                            wc.defined() ? dw.data_ptr<scalar_t>() : nullptr,
                            has_bias ? db.data_ptr<scalar_t>() : nullptr, M, N);
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hetrain_C, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace hetrain
