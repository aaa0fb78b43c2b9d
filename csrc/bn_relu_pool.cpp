// BatchNorm2d -> ReLU -> MaxPool2d as one epilogue of a convolution, on the CPU.
//
// Forward reads the convolution output twice: once for the per-channel statistics (training only),
// once to normalise, apply ReLU and max-pool in one go. It writes the pooled output and the argmax as
// a uint8 index inside each window; the normalised tensor is never stored. Backward recomputes the
// pre-ReLU value from x and the per-channel statistics to know the ReLU mask.
//
// Both NCHW and channels_last (NHWC) inputs are served in their own layout. NHWC is the fast path:
// every inner loop runs over contiguous channels and vectorises. NCHW works plane by plane with a
// scalar loop over each pooling window (correct, slower).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "bn_relu_pool_math.h"
#include "cpu_chunks.h"
#include "cpu_loops.h"

namespace hetrain {
namespace bn_relu_pool {

// --- input checks, shared with the CUDA binding (cuda/bn_relu_pool_binding.cpp declares them) ----------

at::ScalarType stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool is_channels_last(const at::Tensor& x) {
  // Channels_last when x is laid out so and not also plain contiguous (as when C == 1 or H == W == 1).
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

namespace {

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "hetrain.", op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "hetrain.", op, ": x must be a floating tensor, got ",
              x.scalar_type());
}

void check_pool(const char* op, const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                at::IntArrayRef padding) {
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, "hetrain.", op,
              ": kernel, stride and padding must each hold 2 values, got ", kernel, ", ", stride, ", ", padding);
  TORCH_CHECK(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1, "hetrain.", op,
              ": kernel and stride must be >= 1, got kernel ", kernel, " stride ", stride);
  // Each side bounded before the product, and padding compared without doubling it: neither may wrap.
  TORCH_CHECK(kernel[0] <= 256 && kernel[1] <= 256 && kernel[0] * kernel[1] <= 256, "hetrain.", op,
              ": the pooling window ", kernel, " has more than 256 positions; the in-window argmax is stored as uint8");
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0 && padding[0] <= kernel[0] / 2 && padding[1] <= kernel[1] / 2,
              "hetrain.", op, ": padding must be >= 0 and at most half the kernel, got padding ", padding,
              " kernel ", kernel);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "hetrain.", op, ": x has no pixels (shape ", x.sizes(),
              "); a window over padding alone has no maximum to pool");
  const int64_t hp = x.size(2) + 2 * padding[0], wp = x.size(3) + 2 * padding[1];
  TORCH_CHECK(hp >= kernel[0] && wp >= kernel[1], "hetrain.", op, ": the pooling kernel ", kernel,
              " is larger than the padded input (", hp, "x", wp, ")");
}

// A per-channel vector: shape (C,), the statistics dtype, x's device.
void check_channels(const char* op, const char* name, const std::optional<at::Tensor>& v, const at::Tensor& x) {
  if (!v.has_value()) return;
  const auto sdt = stats_dtype(x.scalar_type());
  TORCH_CHECK(v->dim() == 1 && v->size(0) == x.size(1), "hetrain.", op, ": ", name, " must have shape (",
              x.size(1), ",) to match x's channels, got ", v->sizes());
  TORCH_CHECK(v->scalar_type() == sdt, "hetrain.", op, ": ", name, " must be ", sdt, " for ", x.scalar_type(),
              " inputs, got ", v->scalar_type());
  TORCH_CHECK(v->device() == x.device(), "hetrain.", op, ": ", name, " is on ", v->device(), " but x is on ",
              x.device());
}

}  // namespace

void check_forward_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding) {
  check_x(op, x);
  TORCH_CHECK(mean.has_value() == invstd.has_value(), "hetrain.", op, ": give both mean and invstd or neither");
  TORCH_CHECK(mean.has_value() || (!weight.has_value() && !bias.has_value()), "hetrain.", op,
              ": weight and bias need mean and invstd (no BatchNorm, no affine)");
  check_channels(op, "mean", mean, x);
  check_channels(op, "invstd", invstd, x);
  check_channels(op, "weight", weight, x);
  check_channels(op, "bias", bias, x);
  check_pool(op, x, kernel, stride, padding);
}

void check_stats_args(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var, double eps) {
  check_x("bn_stats", x);
  check_channels("bn_stats", "running_mean", running_mean, x);
  check_channels("bn_stats", "running_var", running_var, x);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "hetrain.bn_stats: give both running_mean and ",
              "running_var or neither");
  TORCH_CHECK(!running_mean.has_value() || (running_mean->is_contiguous() && running_var->is_contiguous()),
              "hetrain.bn_stats: running_mean and running_var must be contiguous (they are updated in place)");
  TORCH_CHECK(eps >= 0, "hetrain.bn_stats: eps must be >= 0, got ", eps);
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) != 1, "hetrain.bn_stats: expected more than 1 value per channel "
              "when training, got input of shape ", x.sizes());
}

void check_backward_args(const at::Tensor& dy, const at::Tensor& argmax, const at::Tensor& x,
                         const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& invstd,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         bool batch_stats, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_forward_args("bn_relu_pool_bwd", x, mean, invstd, weight, bias, kernel, stride, padding);
  TORCH_CHECK(!batch_stats || mean.has_value(), "hetrain.bn_relu_pool_bwd: batch_stats needs mean and invstd");
  const std::vector<int64_t> out{x.size(0), x.size(1), pooled_size(x.size(2), kernel[0], stride[0], padding[0]),
                                 pooled_size(x.size(3), kernel[1], stride[1], padding[1])};
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(out) && dy.scalar_type() == x.scalar_type(),
              "hetrain.bn_relu_pool backward: dy must have shape ", at::IntArrayRef(out), " and dtype ",
              x.scalar_type(), ", got ", dy.sizes(), " ", dy.scalar_type());
  TORCH_CHECK(argmax.sizes() == dy.sizes() && argmax.scalar_type() == at::kByte,
              "hetrain.bn_relu_pool backward: argmax must be uint8 of shape ", dy.sizes(), ", got ", argmax.sizes(),
              " ", argmax.scalar_type());
  TORCH_CHECK(dy.device() == x.device() && argmax.device() == x.device(),
              "hetrain.bn_relu_pool backward: dy and argmax must be on x's device ", x.device());
}

}  // namespace bn_relu_pool

namespace {

namespace brp = bn_relu_pool;
using brp::stats_dtype;


// An integer as wide as acc_t: window indices held in it vectorise next to the acc_t values (a uint8
// lane beside a float lane does not).
template <typename acc_t>
using lane_int = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;

struct Geometry {
  int64_t N, C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw;
};

Geometry geometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding) {
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0,
             kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]};
  g.OH = brp::pooled_size(g.H, g.kh, g.sh, g.ph);
  g.OW = brp::pooled_size(g.W, g.kw, g.sw, g.pw);
  return g;
}

// The value as the output dtype stores it: ties and the ReLU mask are decided on what torch would see.
template <typename scalar_t, typename acc_t>
inline acc_t rounded(acc_t v) {
  return acc_t(scalar_t(v));
}

at::MemoryFormat layout(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

at::Tensor contiguous_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// Per-channel parameters in accumulation type; without BatchNorm, mean 0, invstd 1 (z = x).
template <typename acc_t>
struct Channels {
  std::vector<acc_t> mean, invstd, weight, scale, shift;

  Channels(int64_t C, const acc_t* m, const acc_t* is, const acc_t* w, const acc_t* b)
      : mean(C), invstd(C), weight(C), scale(C), shift(C) {
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = m ? m[c] : acc_t(0);
      invstd[c] = is ? is[c] : acc_t(1);
      weight[c] = w ? w[c] : acc_t(1);
      scale[c] = brp::channel_scale(invstd[c], weight[c]);
      shift[c] = brp::channel_shift(mean[c], scale[c], b ? b[c] : acc_t(0));
    }
  }
};

// Elements per parallel task: enough that the scheduling cost is noise.
int64_t grain(int64_t per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(per_item, 1)); }

// --- statistics --------------------------------------------------------------------------------

// sum(x - pivot_c) and sum((x - pivot_c)^2) per channel in double, pivot_c = x[0, c, 0, 0].
template <typename scalar_t>
void channel_sums(const scalar_t* x, const Geometry& g, bool cl, double* pivot, double* sum, double* sum_sq) {
  const int64_t C = g.C, HW = g.H * g.W;
  std::fill(sum, sum + C, 0.0);
  std::fill(sum_sq, sum_sq + C, 0.0);
  std::fill(pivot, pivot + C, 0.0);
  if (g.N * HW == 0) return;
  for (int64_t c = 0; c < C; ++c) pivot[c] = double(x[cl ? c : c * HW]);
  if (!cl) {
    // One partial pair per (n, c) plane, summed over n afterwards.
    std::vector<double> part(2 * g.N * C);
    at::parallel_for(0, g.N * C, grain(HW), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* xp = x + p * HW;
        const double pv = pivot[p % C];
        lane_sum2<double>(HW, [&](int64_t j, double& s, double& q) {
          const double d = double(xp[j]) - pv;
          s += d;
          q += d * d;
        }, &part[2 * p], &part[2 * p + 1]);
      }
    });
    for (int64_t p = 0; p < g.N * C; ++p) {
      sum[p % C] += part[2 * p];
      sum_sq[p % C] += part[2 * p + 1];
    }
    return;
  }
  // NHWC: each chunk of positions keeps a row of C partial sums in double, vectorised over channels. Blocks of
  // positions summed in float32 lost ~1e4x torch's accuracy when x[0, c, 0, 0] was an outlier: every x - pivot is
  // then large, and the variance a small difference of their large sums.
  const int64_t P = g.N * HW, chunks = chunk_count(P, C);
  std::vector<double> part(2 * chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double* s = part.data() + 2 * k * C;
      double* q = s + C;
      const int64_t end = P * (k + 1) / chunks;
      int64_t p = P * k / chunks;
      // Four positions per load and store of the partials, which otherwise bound the loop.
      for (; p + 4 <= end; p += 4) {
        const scalar_t* xp = x + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double d0 = double(widen(xp[c])) - pivot[c], d1 = double(widen(xp[C + c])) - pivot[c];
          const double d2 = double(widen(xp[2 * C + c])) - pivot[c], d3 = double(widen(xp[3 * C + c])) - pivot[c];
          s[c] += (d0 + d1) + (d2 + d3);
          q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
      }
      for (; p < end; ++p) {
        const scalar_t* xp = x + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double d = double(widen(xp[c])) - pivot[c];
          s[c] += d;
          q[c] += d * d;
        }
      }
    }
  });
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      sum[c] += part[2 * k * C + c];
      sum_sq[c] += part[2 * k * C + C + c];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var, double momentum,
                                                double eps) {
  brp::check_stats_args(x, running_mean, running_var, eps);
  const int64_t N = x.size(0), C = x.size(1), count = N * x.size(2) * x.size(3);
  const bool cl = brp::is_channels_last(x);
  const at::Tensor xc = x.contiguous(layout(cl));
  const Geometry g{N, C, x.size(2), x.size(3), 0, 0, 1, 1, 1, 1, 0, 0};
  at::Tensor mean = at::empty({C}, x.options().dtype(stats_dtype(x.scalar_type())));
  at::Tensor invstd = at::empty_like(mean);
  std::vector<double> pivot(C), sum(C), sum_sq(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    channel_sums<scalar_t>(xc.const_data_ptr<scalar_t>(), g, cl, pivot.data(), sum.data(), sum_sq.data());
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* is = invstd.data_ptr<acc_t>();
    acc_t* rm = running_mean ? running_mean->data_ptr<acc_t>() : nullptr;
    acc_t* rv = running_var ? running_var->data_ptr<acc_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      if (count == 0) {  // empty batch: nothing to normalise, running statistics left alone (as torch)
        m[c] = acc_t(0);
        is[c] = brp::invstd<acc_t>(acc_t(0), acc_t(eps));
        continue;
      }
      double mu = 0, var = 0;
      brp::moments<double>(sum[c], sum_sq[c], pivot[c], count, &mu, &var);
      m[c] = acc_t(mu);
      is[c] = acc_t(brp::invstd<double>(var, eps));
      if (rm) {
        rm[c] = acc_t(brp::running_update<double>(double(rm[c]), mu, momentum));
        rv[c] = acc_t(brp::running_update<double>(double(rv[c]), var * double(count) / double(count - 1), momentum));
      }
    }
  });
  return {mean, invstd};
}

// --- forward -----------------------------------------------------------------------------------

// Plane by plane; each output row is vectorised across its outputs, one window offset at a time (a
// scalar loop over each window branches on random data and mispredicts).
template <typename scalar_t>
void forward_nchw(const scalar_t* x, const Channels<acc_type<scalar_t>>& ch, scalar_t* y, uint8_t* arg,
                  const Geometry& g) {
  using acc_t = acc_type<scalar_t>;
  using int_t = lane_int<acc_t>;
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  at::parallel_for(0, g.N * g.C, grain(HW), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> best_row(g.OW);
    std::vector<int_t> idx_row(g.OW);
    acc_t* best = best_row.data();
    int_t* idx = idx_row.data();
    const int_t W = g.W, OW = g.OW, sw = g.sw, pw = g.pw, kw = g.kw;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % g.C;
      const acc_t sc = ch.scale[c], sf = ch.shift[c];
      const scalar_t* xp = x + p * HW;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t hs = brp::window_start(oh, g.sh, g.ph);
        const int64_t h0 = std::max<int64_t>(hs, 0), h1 = std::min<int64_t>(hs + g.kh, g.H);
        const auto row0 = static_cast<int_t>((h0 - hs) * g.kw);
#pragma omp simd
        for (int_t ow = 0; ow < OW; ++ow) {
          const int_t ws = ow * sw - pw;
          best[ow] = -std::numeric_limits<acc_t>::infinity();
          idx[ow] = row0 + (ws < 0 ? -ws : 0);  // the window's first element inside the input
        }
        for (int64_t h = h0; h < h1; ++h) {
          const scalar_t* xr = xp + h * g.W;
          for (int_t kw_i = 0; kw_i < kw; ++kw_i) {
            const auto k = static_cast<int_t>((h - hs) * g.kw + kw_i);
#pragma omp simd
            for (int_t ow = 0; ow < OW; ++ow) {
              const int_t w = ow * sw - pw + kw_i;
              const bool inside = w >= 0 && w < W;
              const acc_t z = rounded<scalar_t>(brp::pre_relu<acc_t>(acc_t(xr[inside ? w : 0]), sc, sf));
              const bool take = inside && brp::takes_max(z, best[ow]);
              best[ow] = take ? z : best[ow];
              idx[ow] = take ? k : idx[ow];
            }
          }
        }
        scalar_t* yr = y + p * OHW + oh * g.OW;
        uint8_t* ar = arg + p * OHW + oh * g.OW;
#pragma omp simd
        for (int_t ow = 0; ow < OW; ++ow) {
          yr[ow] = narrow<scalar_t>(brp::relu(best[ow]));
          ar[ow] = static_cast<uint8_t>(idx[ow]);
        }
      }
    }
  });
}

template <typename scalar_t>
void forward_nhwc(const scalar_t* x, const Channels<acc_type<scalar_t>>& ch, scalar_t* y, uint8_t* arg,
                  const Geometry& g) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = g.C;
  const acc_t* scale = ch.scale.data();
  const acc_t* shift = ch.shift.data();
  at::parallel_for(0, g.N * g.OH, grain(g.OW * g.kh * g.kw * C), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> best_row(C);
    std::vector<lane_int<acc_t>> idx_row(C);
    acc_t* best = best_row.data();
    lane_int<acc_t>* idx = idx_row.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.OH, oh = r % g.OH;
      const int64_t hs = brp::window_start(oh, g.sh, g.ph);
      const int64_t h0 = std::max<int64_t>(hs, 0), h1 = std::min<int64_t>(hs + g.kh, g.H);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t ws = brp::window_start(ow, g.sw, g.pw);
        const int64_t w0 = std::max<int64_t>(ws, 0), w1 = std::min<int64_t>(ws + g.kw, g.W);
        const int64_t o = (r * g.OW + ow) * C;
        std::fill(best, best + C, -std::numeric_limits<acc_t>::infinity());
        std::fill(idx, idx + C, static_cast<lane_int<acc_t>>((h0 - hs) * g.kw + (w0 - ws)));
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            const scalar_t* xp = x + ((n * g.H + h) * g.W + w) * C;
            const auto k = static_cast<lane_int<acc_t>>((h - hs) * g.kw + (w - ws));
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const acc_t z = rounded<scalar_t>(brp::pre_relu<acc_t>(acc_t(xp[c]), scale[c], shift[c]));
              const bool take = brp::takes_max(z, best[c]);
              best[c] = take ? z : best[c];
              idx[c] = take ? k : idx[c];
            }
          }
        }
        scalar_t* yp = y + o;
        uint8_t* ap = arg + o;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          yp[c] = narrow<scalar_t>(brp::relu(best[c]));
          ap[c] = static_cast<uint8_t>(idx[c]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bn_relu_pool_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mean,
                                                        const std::optional<at::Tensor>& invstd,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias, at::IntArrayRef kernel,
                                                        at::IntArrayRef stride, at::IntArrayRef padding) {
  brp::check_forward_args("bn_relu_pool_fwd", x, mean, invstd, weight, bias, kernel, stride, padding);
  const Geometry g = geometry(x, kernel, stride, padding);
  const bool cl = brp::is_channels_last(x);
  const at::Tensor xc = x.contiguous(layout(cl));
  const at::Tensor mc = contiguous_or_empty(mean), ic = contiguous_or_empty(invstd);
  const at::Tensor wc = contiguous_or_empty(weight), bc = contiguous_or_empty(bias);
  at::Tensor y = at::empty({g.N, g.C, g.OH, g.OW}, x.options().memory_format(layout(cl)));
  at::Tensor arg = at::empty({g.N, g.C, g.OH, g.OW}, x.options().dtype(at::kByte).memory_format(layout(cl)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_pool_fwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Channels<acc_t> ch(g.C, ptr_or_null<acc_t>(mc), ptr_or_null<acc_t>(ic), ptr_or_null<acc_t>(wc),
                             ptr_or_null<acc_t>(bc));
    if (cl) {
      forward_nhwc<scalar_t>(xc.const_data_ptr<scalar_t>(), ch, y.data_ptr<scalar_t>(), arg.data_ptr<uint8_t>(), g);
    } else {
      forward_nchw<scalar_t>(xc.const_data_ptr<scalar_t>(), ch, y.data_ptr<scalar_t>(), arg.data_ptr<uint8_t>(), g);
    }
  });
  return {y, arg};
}

// --- backward ----------------------------------------------------------------------------------

// sum(g) and sum(g * xhat) per channel, g = dy routed to each window's argmax through the ReLU mask.
template <typename scalar_t>
void grad_sums_nchw(const scalar_t* dy, const uint8_t* arg, const scalar_t* x, const Channels<acc_type<scalar_t>>& ch,
                    const Geometry& g, double* sum_g, double* sum_gx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  std::vector<double> part(2 * g.N * g.C);
  at::parallel_for(0, g.N * g.C, grain(OHW), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % g.C;
      const acc_t sc = ch.scale[c], sf = ch.shift[c], mu = ch.mean[c], is = ch.invstd[c];
      const scalar_t* xp = x + p * HW;
      acc_t s = 0, sx = 0;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t o = p * OHW + oh * g.OW + ow;
          const int64_t h = brp::window_start(oh, g.sh, g.ph) + arg[o] / g.kw;
          const int64_t w = brp::window_start(ow, g.sw, g.pw) + arg[o] % g.kw;
          const acc_t xv = acc_t(xp[h * g.W + w]);
          const acc_t z = rounded<scalar_t>(brp::pre_relu<acc_t>(xv, sc, sf));
          const acc_t gv = brp::relu_passes(z) ? acc_t(dy[o]) : acc_t(0);
          s += gv;
          sx += gv * ((xv - mu) * is);
        }
      }
      part[2 * p] = s;
      part[2 * p + 1] = sx;
    }
  });
  for (int64_t p = 0; p < g.N * g.C; ++p) {
    sum_g[p % g.C] += part[2 * p];
    sum_gx[p % g.C] += part[2 * p + 1];
  }
}

template <typename scalar_t>
void grad_sums_nhwc(const scalar_t* dy, const uint8_t* arg, const scalar_t* x, const Channels<acc_type<scalar_t>>& ch,
                    const Geometry& g, double* sum_g, double* sum_gx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = g.C, rows = g.N * g.OH, chunks = chunk_count(rows, g.OW * g.kh * g.kw * C);
  const acc_t* scale = ch.scale.data();
  const acc_t* shift = ch.shift.data();
  const acc_t* mean = ch.mean.data();
  const acc_t* invstd = ch.invstd.data();
  std::vector<double> part(2 * chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    // Sums over one output row in acc_t, then added to the chunk's double partials.
    std::vector<acc_t> row(3 * C);
    std::vector<lane_int<acc_t>> arg_row(C);
    acc_t* rs = row.data();
    acc_t* rsx = rs + C;
    acc_t* xs = rsx + C;  // the value at each channel's argmax
    lane_int<acc_t>* a = arg_row.data();
    for (int64_t k = k0; k < k1; ++k) {
      double* ps = part.data() + 2 * k * C;
      double* psx = ps + C;
      for (int64_t r = rows * k / chunks; r < rows * (k + 1) / chunks; ++r) {
        const int64_t n = r / g.OH, oh = r % g.OH;
        const int64_t hs = brp::window_start(oh, g.sh, g.ph);
        const int64_t h0 = std::max<int64_t>(hs, 0), h1 = std::min<int64_t>(hs + g.kh, g.H);
        std::fill(rs, rs + 2 * C, acc_t(0));
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t ws = brp::window_start(ow, g.sw, g.pw);
          const int64_t w0 = std::max<int64_t>(ws, 0), w1 = std::min<int64_t>(ws + g.kw, g.W);
          const int64_t o = (r * g.OW + ow) * C;
          const uint8_t* ap = arg + o;
          const scalar_t* dyp = dy + o;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) a[c] = ap[c];
          // Pick each channel's argmax value out of the window, then one gradient term per output.
          for (int64_t h = h0; h < h1; ++h) {
            for (int64_t w = w0; w < w1; ++w) {
              const scalar_t* xp = x + ((n * g.H + h) * g.W + w) * C;
              const auto kk = static_cast<lane_int<acc_t>>((h - hs) * g.kw + (w - ws));
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) xs[c] = a[c] == kk ? acc_t(xp[c]) : xs[c];
            }
          }
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xv = xs[c];
            const acc_t z = rounded<scalar_t>(brp::pre_relu<acc_t>(xv, scale[c], shift[c]));
            const acc_t gv = brp::relu_passes(z) ? acc_t(dyp[c]) : acc_t(0);
            rs[c] += gv;
            rsx[c] += gv * ((xv - mean[c]) * invstd[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          ps[c] += double(rs[c]);
          psx[c] += double(rsx[c]);
        }
      }
    }
  });
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += part[2 * k * C + c];
      sum_gx[c] += part[2 * k * C + C + c];
    }
  }
}

template <typename acc_t>
struct Coefs {
  std::vector<acc_t> k_g, k_0, k_x;
};

template <typename scalar_t>
void input_grad_nchw(const scalar_t* dy, const uint8_t* arg, const scalar_t* x, const Channels<acc_type<scalar_t>>& ch,
                     const Coefs<acc_type<scalar_t>>& k, const Geometry& g, scalar_t* dx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  at::parallel_for(0, g.N * g.C, grain(HW), [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> gbuf(HW);  // the plane's dL/dz before the ReLU mask
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % g.C;
      std::fill(gbuf.begin(), gbuf.end(), acc_t(0));
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t o = p * OHW + oh * g.OW + ow;
          const int64_t h = brp::window_start(oh, g.sh, g.ph) + arg[o] / g.kw;
          const int64_t w = brp::window_start(ow, g.sw, g.pw) + arg[o] % g.kw;
          gbuf[h * g.W + w] += acc_t(dy[o]);
        }
      }
      const brp::GradCoefs<acc_t> kc{k.k_g[c], k.k_0[c], k.k_x[c]};
      const acc_t sc = ch.scale[c], sf = ch.shift[c], mu = ch.mean[c];
      const scalar_t* xp = x + p * HW;
      scalar_t* dxp = dx + p * HW;
      const acc_t* gb = gbuf.data();
#pragma omp simd
      for (int64_t j = 0; j < HW; ++j) {
        const acc_t xv = acc_t(xp[j]);
        const acc_t z = rounded<scalar_t>(brp::pre_relu<acc_t>(xv, sc, sf));
        dxp[j] = narrow<scalar_t>(brp::input_grad<acc_t>(kc, brp::relu_passes(z) ? gb[j] : acc_t(0), xv - mu));
      }
    }
  });
}

// Row by row of the input: gather each element's dL/dz from the windows that hold it, then dx.
template <typename scalar_t>
void input_grad_nhwc(const scalar_t* dy, const uint8_t* arg, const scalar_t* x, const Channels<acc_type<scalar_t>>& ch,
                     const Coefs<acc_type<scalar_t>>& k, const Geometry& g, scalar_t* dx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = g.C, WC = g.W * C;
  const acc_t* scale = ch.scale.data();
  const acc_t* shift = ch.shift.data();
  const acc_t* mean = ch.mean.data();
  const acc_t* kg = k.k_g.data();
  const acc_t* k0 = k.k_0.data();
  const acc_t* kx = k.k_x.data();
  at::parallel_for(0, g.N * g.H, grain(WC), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> gbuf(WC);
    std::vector<lane_int<acc_t>> arg_row(C);
    acc_t* gb = gbuf.data();
    lane_int<acc_t>* a = arg_row.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.H, h = r % g.H;
      std::fill(gbuf.begin(), gbuf.end(), acc_t(0));
      const int64_t oh_last = brp::last_window(h, g.sh, g.ph, g.OH);
      for (int64_t oh = brp::first_window(h, g.kh, g.sh, g.ph); oh <= oh_last; ++oh) {
        const int64_t kh_i = h - brp::window_start(oh, g.sh, g.ph);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t ws = brp::window_start(ow, g.sw, g.pw);
          const int64_t o = ((n * g.OH + oh) * g.OW + ow) * C;
          const uint8_t* ap = arg + o;
          const scalar_t* dyp = dy + o;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) a[c] = ap[c];
          for (int64_t kw_i = std::max<int64_t>(0, -ws); kw_i < g.kw && ws + kw_i < g.W; ++kw_i) {
            const auto kk = static_cast<lane_int<acc_t>>(kh_i * g.kw + kw_i);
            acc_t* gw = gb + (ws + kw_i) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) gw[c] += a[c] == kk ? acc_t(dyp[c]) : acc_t(0);
          }
        }
      }
      const scalar_t* xr = x + r * WC;
      scalar_t* dxr = dx + r * WC;
      for (int64_t w = 0; w < g.W; ++w) {
        const scalar_t* xp = xr + w * C;
        scalar_t* dxp = dxr + w * C;
        const acc_t* gw = gb + w * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = acc_t(xp[c]);
          const acc_t z = rounded<scalar_t>(brp::pre_relu<acc_t>(xv, scale[c], shift[c]));
          const acc_t gv = brp::relu_passes(z) ? gw[c] : acc_t(0);
          dxp[c] = narrow<scalar_t>(brp::input_grad<acc_t>({kg[c], k0[c], kx[c]}, gv, xv - mean[c]));
        }
      }
    }
  });
}

// Every argmax must name a position of its window inside the input: another (a caller's own tensor rather
// than the forward's) would send the kernels' reads and writes out of bounds. Values past the window are
// found in one vectorised pass; a window's padded positions can only be named at the borders, checked alone.
void check_argmax(const uint8_t* arg, int64_t numel, const Geometry& g, bool channels_last) {
  uint8_t largest = 0;
  // A plain conditional GCC vectorises (5 us for 400 KB here); `omp simd reduction(max)` over uint8 ran scalar (212).
  for (int64_t i = 0; i < numel; ++i) largest = arg[i] > largest ? arg[i] : largest;
  bool inside = numel == 0 || largest < g.kh * g.kw;
  for (int64_t oh = 0; inside && oh < g.OH; ++oh) {
    const int64_t hs = brp::window_start(oh, g.sh, g.ph);
    for (int64_t ow = 0; inside && ow < g.OW; ++ow) {
      const int64_t ws = brp::window_start(ow, g.sw, g.pw);
      if (hs >= 0 && hs + g.kh <= g.H && ws >= 0 && ws + g.kw <= g.W) continue;  // no padding in this window
      std::array<bool, 256> in_input{};  // which of this window's positions lie inside x
      for (int64_t k = 0; k < g.kh * g.kw; ++k) {
        const int64_t h = hs + k / g.kw, w = ws + k % g.kw;
        in_input[k] = h >= 0 && h < g.H && w >= 0 && w < g.W;
      }
      for (int64_t p = 0; p < g.N * g.C; ++p) {
        const int64_t o = channels_last ? ((p / g.C * g.OH + oh) * g.OW + ow) * g.C + p % g.C
                                        : (p * g.OH + oh) * g.OW + ow;
        inside = inside && in_input[arg[o]];  // arg < kh * kw: checked above
      }
    }
  }
  TORCH_CHECK(inside, "hetrain.bn_relu_pool backward: argmax names a position outside its pooling window or the "
              "input; pass the argmax bn_relu_pool_fwd returned for this x, kernel, stride and padding");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& argmax, const at::Tensor& x, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool batch_stats, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding) {
  brp::check_backward_args(dy, argmax, x, mean, invstd, weight, bias, batch_stats, kernel, stride, padding);
  const Geometry g = geometry(x, kernel, stride, padding);
  const bool cl = brp::is_channels_last(x);
  const at::Tensor xc = x.contiguous(layout(cl)), dyc = dy.contiguous(layout(cl)), ac = argmax.contiguous(layout(cl));
  check_argmax(ac.const_data_ptr<uint8_t>(), ac.numel(), g, cl);
  const at::Tensor mc = contiguous_or_empty(mean), ic = contiguous_or_empty(invstd);
  const at::Tensor wc = contiguous_or_empty(weight), bc = contiguous_or_empty(bias);
  at::Tensor dx = at::empty_like(xc, xc.options().memory_format(layout(cl)));
  const auto pdt = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor dw = at::empty({weight ? g.C : 0}, pdt);
  at::Tensor db = at::empty({bias ? g.C : 0}, pdt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_pool_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Channels<acc_t> ch(g.C, ptr_or_null<acc_t>(mc), ptr_or_null<acc_t>(ic), ptr_or_null<acc_t>(wc),
                             ptr_or_null<acc_t>(bc));
    const scalar_t* dyp = dyc.const_data_ptr<scalar_t>();
    const uint8_t* ap = ac.const_data_ptr<uint8_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    std::vector<double> sum_g(g.C, 0.0), sum_gx(g.C, 0.0);
    if (batch_stats || weight || bias) {
      if (cl) {
        grad_sums_nhwc<scalar_t>(dyp, ap, xp, ch, g, sum_g.data(), sum_gx.data());
      } else {
        grad_sums_nchw<scalar_t>(dyp, ap, xp, ch, g, sum_g.data(), sum_gx.data());
      }
    }
    Coefs<acc_t> k{std::vector<acc_t>(g.C), std::vector<acc_t>(g.C), std::vector<acc_t>(g.C)};
    const int64_t count = g.N * g.H * g.W;
    for (int64_t c = 0; c < g.C; ++c) {
      const auto kc = brp::grad_coefs<acc_t>(ch.weight[c], ch.invstd[c], acc_t(sum_g[c]), acc_t(sum_gx[c]), count,
                                             batch_stats);
      k.k_g[c] = kc.k_g;
      k.k_0[c] = kc.k_0;
      k.k_x[c] = kc.k_x;
      if (weight) dw.data_ptr<acc_t>()[c] = acc_t(sum_gx[c]);
      if (bias) db.data_ptr<acc_t>()[c] = acc_t(sum_g[c]);
    }
    if (cl) {
      input_grad_nhwc<scalar_t>(dyp, ap, xp, ch, k, g, dx.data_ptr<scalar_t>());
    } else {
      input_grad_nchw<scalar_t>(dyp, ap, xp, ch, k, g, dx.data_ptr<scalar_t>());
    }
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def(
      "bn_stats(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps)"
      " -> (Tensor, Tensor)");
  m.def(
      "bn_relu_pool_fwd(Tensor x, Tensor? mean, Tensor? invstd, Tensor? weight, Tensor? bias, int[2] kernel,"
      " int[2] stride, int[2] padding) -> (Tensor, Tensor)");
  m.def(
      "bn_relu_pool_bwd(Tensor dy, Tensor argmax, Tensor x, Tensor? mean, Tensor? invstd, Tensor? weight,"
      " Tensor? bias, bool batch_stats, int[2] kernel, int[2] stride, int[2] padding) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hetrain_C, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_relu_pool_fwd", &bn_relu_pool_fwd_cpu);
  m.impl("bn_relu_pool_bwd", &bn_relu_pool_bwd_cpu);
}

}  // namespace hetrain
