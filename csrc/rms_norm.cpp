// RMSNorm over the last dimension on the CPU: forward saves only rstd per row; backward reduces the
// weight gradient through per-chunk partial sums (no shared accumulator).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu_chunks.h"
#include "cpu_loops.h"
#include "rms_norm_math.h"

namespace hetrain {
namespace rms_norm {

// The argument checks of the schemas declared below, shared with the CUDA binding
// (csrc/cuda/rms_norm_binding.cpp).
void check_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  check_rows("rms_norm_fwd", "x", x);
  check_vector("rms_norm_fwd", "weight", weight, x);
  check_eps("rms_norm", eps);
}

void check_backward_args(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const at::Tensor& rstd) {
  check_rows("rms_norm_bwd", "x", x);
  check_like("rms_norm backward", "dy", dy, x);
  check_vector("rms_norm_bwd", "weight", weight, x);
  check_row_stats("rms_norm backward", "rstd", rstd, x);
}

}  // namespace rms_norm

namespace {


// Rows per parallel task: enough elements that the scheduling cost is noise.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)); }

template <typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* w, scalar_t* y, acc_type<scalar_t>* rstd, int64_t M,
                  int64_t N, double eps) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * N;
      scalar_t* yr = y + r * N;
      const acc_t sq = lane_sum<acc_t>(N, [&](int64_t j) {
        const acc_t v = acc_t(xr[j]);
        return v * v;
      });
      const acc_t rs = rms_norm::rstd<acc_t>(sq / acc_t(N), acc_t(eps));
      for (int64_t j = 0; j < N; ++j) {
        yr[j] = narrow<scalar_t>(rms_norm::forward<acc_t>(acc_t(xr[j]), rs, w ? acc_t(w[j]) : acc_t(1)));
      }
      rstd[r] = rs;
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* dy, const scalar_t* x, const scalar_t* w, const acc_type<scalar_t>* rstd,
                   scalar_t* dx, scalar_t* dw, int64_t M, int64_t N) {
  using acc_t = acc_type<scalar_t>;
  // One partial dw row per chunk of rows, summed at the end.
  const int64_t chunks = chunk_count(M, N);
  std::vector<acc_t> part_w(dw ? chunks * N : 0, acc_t(0));
  // Two streaming passes per row and no scratch: a pure reduction (vectorised in lanes), then dx and
  // the dw partials from the same reads of dy and x, xhat and g recomputed rather than stored.
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = M * c / chunks, r1 = M * (c + 1) / chunks;
      acc_t* pw = dw ? part_w.data() + c * N : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = x + r * N;
        const scalar_t* dyr = dy + r * N;
        scalar_t* dxr = dx + r * N;
        const acc_t rs = rstd[r];
        const acc_t sum_gx =
            w ? lane_sum<acc_t>(N, [&](int64_t j) { return acc_t(dyr[j]) * acc_t(w[j]) * acc_t(xr[j]); })
              : lane_sum<acc_t>(N, [&](int64_t j) { return acc_t(dyr[j]) * acc_t(xr[j]); });
        const acc_t mgx = sum_gx * rs / acc_t(N);
        if (pw) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const acc_t d = acc_t(dyr[j]), xhat = acc_t(xr[j]) * rs;
            dxr[j] = narrow<scalar_t>(rms_norm::input_grad<acc_t>(d * acc_t(w[j]), xhat, rs, mgx));
            pw[j] += d * xhat;
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const acc_t d = acc_t(dyr[j]), xhat = acc_t(xr[j]) * rs;
            dxr[j] = narrow<scalar_t>(rms_norm::input_grad<acc_t>(w ? d * acc_t(w[j]) : d, xhat, rs, mgx));
          }
        }
      }
    }
  });
  if (!dw) return;
  at::parallel_for(0, N, column_grain(chunks), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      acc_t sw = 0;
      for (int64_t c = 0; c < chunks; ++c) sw += part_w[c * N + j];
      dw[j] = scalar_t(sw);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                    double eps) {
  rms_norm::check_forward_args(x, weight, eps);
  const int64_t M = x.size(0), N = x.size(1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(xc);
  at::Tensor rstd = at::empty({M}, x.options().dtype(stats_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_fwd_cpu", [&] {
    forward_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr,
                           y.data_ptr<scalar_t>(), rstd.data_ptr<acc_type<scalar_t>>(), M, N, eps);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& weight,
                                                    const at::Tensor& rstd) {
  rms_norm::check_backward_args(dy, x, weight, rstd);
  const int64_t M = x.size(0), N = x.size(1);
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous(), rc = rstd.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor dw = at::empty({wc.defined() ? N : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_bwd_cpu", [&] {
    backward_rows<scalar_t>(dyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                            wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr,
                            rc.const_data_ptr<acc_type<scalar_t>>(), dx.data_ptr<scalar_t>(),
                            wc.defined() ? dw.data_ptr<scalar_t>() : nullptr, M, N);
  });
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hetrain_C, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace hetrain
