// layer_norm(dropout(x, p) + residual) over rows on the CPU, the post-LN sublayer output.
// The dropout mask is never stored: element i of the flattened (rows, features) input is kept when
// the counter hash of (seed, i) in dropout_math.h clears the threshold of p, so backward regenerates
// it. Forward saves only mean and rstd per row; backward rebuilds the pre-norm sum from x and
// residual, and reduces weight/bias gradients through per-task partial sums.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu_chunks.h"
#include "cpu_loops.h"
#include "dropout_math.h"
#include "layer_norm_math.h"

namespace hetrain {
namespace dropout_add_layer_norm {

// The argument checks of the schemas declared below, shared with the CUDA binding
// (csrc/cuda/dropout_add_layer_norm_binding.cpp).
void check_forward_args(const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, double eps) {
  check_rows("dropout_add_layer_norm_fwd", "x", x);
  check_like("dropout_add_layer_norm_fwd", "residual", residual, x);
  check_vector("dropout_add_layer_norm_fwd", "weight", weight, x);
  check_vector("dropout_add_layer_norm_fwd", "bias", bias, x);
  check_eps("dropout_add_layer_norm", eps);
}

void check_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
                         const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd) {
  check_rows("dropout_add_layer_norm_bwd", "x", x);
  check_like("dropout_add_layer_norm_bwd", "residual", residual, x);
  check_like("dropout_add_layer_norm backward", "dy", dy, x);
  check_vector("dropout_add_layer_norm_bwd", "weight", weight, x);
  check_row_stats("dropout_add_layer_norm backward", "mean", mean, x);
  check_row_stats("dropout_add_layer_norm backward", "rstd", rstd, x);
}

}  // namespace dropout_add_layer_norm

namespace {


int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)); }

// out[j] = kept or dropped for elements base .. base + N - 1 of the stream.
template <typename T>
void row_select(T* out, const dropout::Call& d, uint64_t base, int64_t N, T kept, T dropped) {
  const uint32_t klo = dropout::key_lo(d.seed), th = d.threshold;
  if (N > 0 && (base >> 32) == ((base + N - 1) >> 32)) {  // the row does not cross a 2^32 boundary
    const uint32_t khi = dropout::key_hi(d.seed, static_cast<uint32_t>(base >> 32));
    const uint32_t lo = static_cast<uint32_t>(base);
#pragma omp simd
    for (int64_t j = 0; j < N; ++j)
      out[j] = dropout::bits24(klo, khi, lo + static_cast<uint32_t>(j)) >= th ? kept : dropped;
  } else {
    for (int64_t j = 0; j < N; ++j) {
      const uint64_t i = base + j;
      const uint32_t khi = dropout::key_hi(d.seed, static_cast<uint32_t>(i >> 32));
      out[j] = dropout::bits24(klo, khi, static_cast<uint32_t>(i)) >= th ? kept : dropped;
    }
  }
}

// s[j] = x[j] * m[j] + residual[j] in the accumulator type, m the dropout multiplier (1 without dropout; a
// dropped x[j] adds exactly 0, see dropout::apply).
template <typename scalar_t, typename acc_t>
void pre_norm_row(acc_t* s, acc_t* m, const scalar_t* xr, const scalar_t* rr, const dropout::Call* d, int64_t r,
                  int64_t N) {
  if (d) {
    row_select<acc_t>(m, *d, d->offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(N), N, acc_t(d->scale),
                      acc_t(0));
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) s[j] = dropout::apply(acc_t(xr[j]), m[j]) + acc_t(rr[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) s[j] = acc_t(xr[j]) + acc_t(rr[j]);
  }
}

template <typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* res, const scalar_t* w, const scalar_t* b, scalar_t* y,
                  acc_type<scalar_t>* mean, acc_type<scalar_t>* rstd, const dropout::Call* d, int64_t M, int64_t N,
                  double eps) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(N), m(d ? N : 0);  // once per task, not per row
    for (int64_t r = begin; r < end; ++r) {
      pre_norm_row<scalar_t, acc_t>(s.data(), m.data(), x + r * N, res + r * N, d, r, N);
      const acc_t* sr = s.data();
      const acc_t mu = lane_sum<acc_t>(N, [&](int64_t j) { return sr[j]; }) / acc_t(N);
      const acc_t sq = lane_sum<acc_t>(N, [&](int64_t j) { return (sr[j] - mu) * (sr[j] - mu); });
      const acc_t rs = layer_norm::rstd<acc_t>(sq / acc_t(N), acc_t(eps));
      scalar_t* yr = y + r * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j)
        yr[j] = narrow<scalar_t>(layer_norm::forward<acc_t>(sr[j], mu, rs, w ? acc_t(w[j]) : acc_t(1),
                                                            b ? acc_t(b[j]) : acc_t(0)));
      mean[r] = mu;
      rstd[r] = rs;
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* dy, const scalar_t* x, const scalar_t* res, const scalar_t* w,
                   const acc_type<scalar_t>* mean, const acc_type<scalar_t>* rstd, const dropout::Call* d, scalar_t* dx,
                   scalar_t* dres, scalar_t* dw, scalar_t* db, int64_t M, int64_t N) {
  using acc_t = acc_type<scalar_t>;
  const int64_t chunks = chunk_count(M, N);
  const bool want_w = dw != nullptr, want_b = db != nullptr;
  std::vector<acc_t> part_w(want_w ? chunks * N : 0, acc_t(0)), part_b(want_b ? chunks * N : 0, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> xhat(N), g(N), m(d ? N : 0);
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* pw = want_w ? part_w.data() + c * N : nullptr;
      acc_t* pb = want_b ? part_b.data() + c * N : nullptr;
      for (int64_t r = M * c / chunks, r1 = M * (c + 1) / chunks; r < r1; ++r) {
        // xhat holds the pre-norm sum until it is normalised below.
        pre_norm_row<scalar_t, acc_t>(xhat.data(), m.data(), x + r * N, res + r * N, d, r, N);
        const scalar_t* dyr = dy + r * N;
        const acc_t mu = mean[r], rs = rstd[r];
        acc_t* xh = xhat.data();
        acc_t* gr = g.data();
        acc_t sum_g, sum_gx;
        lane_sum2<acc_t>(N, [&](int64_t j, acc_t& sg, acc_t& sgx) {
          const acc_t xj = (xh[j] - mu) * rs;
          const acc_t gj = w ? acc_t(dyr[j]) * acc_t(w[j]) : acc_t(dyr[j]);
          xh[j] = xj;
          gr[j] = gj;
          sg += gj;
          sgx += gj * xj;
        }, &sum_g, &sum_gx);
        const acc_t mg = sum_g / acc_t(N), mgx = sum_gx / acc_t(N);
        scalar_t* dxr = dx + r * N;
        scalar_t* drr = dres + r * N;
        if (d) {
          const acc_t* mr = m.data();
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const acc_t ds = layer_norm::input_grad<acc_t>(gr[j], xh[j], rs, mg, mgx);
            drr[j] = narrow<scalar_t>(ds);
            dxr[j] = narrow<scalar_t>(dropout::apply(ds, mr[j]));
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const acc_t ds = layer_norm::input_grad<acc_t>(gr[j], xh[j], rs, mg, mgx);
            drr[j] = narrow<scalar_t>(ds);
            dxr[j] = narrow<scalar_t>(ds);
          }
        }
        if (pw) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) pw[j] += acc_t(dyr[j]) * xh[j];
        }
        if (pb) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) pb[j] += acc_t(dyr[j]);
        }
      }
    }
  });
  at::parallel_for(0, N, column_grain(chunks), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      acc_t sw = 0, sb = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        if (want_w) sw += part_w[c * N + j];
        if (want_b) sb += part_b[c * N + j];
      }
      if (want_w) dw[j] = scalar_t(sw);
      if (want_b) db[j] = scalar_t(sb);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& seed, double p, double eps) {
  dropout_add_layer_norm::check_forward_args(x, residual, weight, bias, eps);
  const dropout::Call drop = dropout_call("dropout_add_layer_norm", seed, p);
  const int64_t M = x.size(0), N = x.size(1);
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(xc);
  at::Tensor mean = at::empty({M}, x.options().dtype(stats_dtype(x.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_add_layer_norm_fwd_cpu", [&] {
    forward_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(),
                           wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr,
                           bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                           mean.data_ptr<acc_type<scalar_t>>(), rstd.data_ptr<acc_type<scalar_t>>(),
                           p > 0 ? &drop : nullptr, M, N, eps);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& seed, double p, bool has_bias) {
  dropout_add_layer_norm::check_backward_args(dy, x, residual, weight, mean, rstd);
  const int64_t M = x.size(0), N = x.size(1);
  const dropout::Call drop = dropout_call("dropout_add_layer_norm", seed, p);
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous(), rc = residual.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor mc = mean.contiguous(), sc = rstd.contiguous();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor dres = at::empty_like(xc);
  at::Tensor dw = at::empty({wc.defined() ? N : 0}, x.options());
  at::Tensor db = at::empty({has_bias ? N : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_add_layer_norm_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    backward_rows<scalar_t>(dyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                            rc.const_data_ptr<scalar_t>(), wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr,
                            mc.const_data_ptr<acc_t>(), sc.const_data_ptr<acc_t>(), p > 0 ? &drop : nullptr,
                            dx.data_ptr<scalar_t>(), dres.data_ptr<scalar_t>(),
                            wc.defined() ? dw.data_ptr<scalar_t>() : nullptr,
                            has_bias ? db.data_ptr<scalar_t>() : nullptr, M, N);
  });
  return {dx, dres, dw, db};
}

// The kept positions of a (rows, cols) input under (seed, p): the kernels' own mask, for tests.
at::Tensor dropout_add_layer_norm_keep_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, double p) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "hetrain.dropout_add_layer_norm: rows and cols must be >= 0");
  const dropout::Call drop = dropout_call("dropout_add_layer_norm", seed, p);
  at::Tensor keep = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      row_select<bool>(out + r * cols, drop, drop.offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(cols),
                       cols, true, false);
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def(
      "dropout_add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, Tensor seed, float p,"
      " float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dropout_add_layer_norm_bwd(Tensor dy, Tensor x, Tensor residual, Tensor? weight, Tensor mean, Tensor rstd,"
      " Tensor seed, float p, bool has_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dropout_add_layer_norm_keep_mask(Tensor seed, int rows, int cols, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(hetrain_C, CPU, m) {
  m.impl("dropout_add_layer_norm_fwd", &dropout_add_layer_norm_fwd_cpu);
  m.impl("dropout_add_layer_norm_bwd", &dropout_add_layer_norm_bwd_cpu);
  m.impl("dropout_add_layer_norm_keep_mask", &dropout_add_layer_norm_keep_mask_cpu);
}

}  // namespace hetrain
