// Torch face of the CUDA BatchNorm -> ReLU -> MaxPool2d epilogue (bn_relu_pool_kernel.cu): input checks,
// allocation, the device and stream, and registration for CUDA tensors under the schemas declared in
// csrc/bn_relu_pool.cpp. Outputs match the CPU kernel: layouts follow x (channels_last stays
// channels_last, anything else becomes contiguous NCHW); per-channel tensors are float32 (float64 for
// float64 inputs). Built only against a CUDA build of torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>

#include "binding.h"
#include "bn_relu_pool_kernel.h"

namespace hetrain {
namespace bn_relu_pool {

// Defined in csrc/bn_relu_pool.cpp, shared with the CPU kernel.
at::ScalarType stats_dtype(at::ScalarType t);
bool is_channels_last(const at::Tensor& x);
void check_forward_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding);
void check_stats_args(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var, double eps);
void check_backward_args(const at::Tensor& dy, const at::Tensor& argmax, const at::Tensor& x,
                         const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& invstd,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         bool batch_stats, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding);

namespace {

using cuda::kernel_t;
using cuda::on_kernel_device;
using cuda::mutable_ptr;
using cuda::ptr;
using cuda::sm_count;

template <typename acc_t>
const acc_t* acc_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

at::MemoryFormat layout(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

at::Tensor contiguous_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

void check_cuda(const char* op, const at::Tensor& x) {
  TORCH_CHECK(on_kernel_device(x), "hetrain.", op, ": x must be a CUDA tensor, got one on ", x.device());
  const int64_t big = std::max(x.numel(), x.size(0) * x.size(1) * (x.size(2) + 2) * (x.size(3) + 2));
  TORCH_CHECK(big < INT_MAX, "hetrain.", op, ": the CUDA kernel indexes in 32 bits; x of shape ", x.sizes(),
              " is too large: split the batch");
}

// A stride past the padded input pools one window on its axis, as a stride of the padded size does: clamped to
// that, it fits the kernel's int (check_cuda bounds the padded size) instead of wrapping.
int pooling_stride(int64_t stride, int64_t size, int64_t padding) {
  return static_cast<int>(std::min(stride, size + 2 * padding));
}

Geometry geometry(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                  bool channels_last) {
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0,
             static_cast<int>(kernel[0]), static_cast<int>(kernel[1]),
             pooling_stride(stride[0], x.size(2), padding[0]), pooling_stride(stride[1], x.size(3), padding[1]),
             static_cast<int>(padding[0]), static_cast<int>(padding[1]), channels_last};
  g.OH = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  return g;
}

// The per-channel reductions' channel tiles must fit the grid's y (kMaxChannelTiles).
void check_channel_tiles(const char* op, const Geometry& g) {
  const int64_t most = g.channels_last ? 32 * kMaxChannelTiles : kMaxChannelTiles;
  TORCH_CHECK(channel_tiles(g) <= kMaxChannelTiles, "hetrain.", op, ": the CUDA kernel reduces at most ", most,
              " channels of ", g.channels_last ? "a channels_last" : "an NCHW", " x, got ", g.C,
              g.channels_last ? ": split the channels"
                              : ": make x channels_last (x.contiguous(memory_format=torch.channels_last))");
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                                                 const std::optional<at::Tensor>& running_var, double momentum,
                                                 double eps) {
  check_stats_args(x, running_mean, running_var, eps);
  check_cuda("bn_stats", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = is_channels_last(x);
  const at::Tensor xc = x.contiguous(layout(cl));
  const Geometry g = geometry(x, {1, 1}, {1, 1}, {0, 0}, cl);
  if (g.N * g.H * g.W > 0) check_channel_tiles("bn_stats", g);
  const auto sdt = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({g.C}, sdt);
  at::Tensor invstd = at::empty({g.C}, sdt);
  const int64_t parts = reduce_parts(g, g.N * g.H * g.W, sm_count(x));
  at::Tensor workspace = at::empty({stats_workspace(g, parts)}, sdt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = acc_type<kernel_t<scalar_t>>;
    C10_CUDA_CHECK(cuda_stats(ptr<scalar_t>(xc), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
                              running_mean ? running_mean->data_ptr<acc_t>() : nullptr,
                              running_var ? running_var->data_ptr<acc_t>() : nullptr, momentum, eps,
                              workspace.data_ptr<acc_t>(), parts, g, stream));
  });
  return {mean, invstd};
}

std::tuple<at::Tensor, at::Tensor> bn_relu_pool_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mean,
                                                         const std::optional<at::Tensor>& invstd,
                                                         const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         at::IntArrayRef kernel, at::IntArrayRef stride,
                                                         at::IntArrayRef padding) {
  check_forward_args("bn_relu_pool_fwd", x, mean, invstd, weight, bias, kernel, stride, padding);
  check_cuda("bn_relu_pool_fwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = is_channels_last(x);
  const at::Tensor xc = x.contiguous(layout(cl));
  const at::Tensor mc = contiguous_or_empty(mean), ic = contiguous_or_empty(invstd);
  const at::Tensor wc = contiguous_or_empty(weight), bc = contiguous_or_empty(bias);
  const Geometry g = geometry(x, kernel, stride, padding, cl);
  at::Tensor y = at::empty({g.N, g.C, g.OH, g.OW}, x.options().memory_format(layout(cl)));
  at::Tensor arg = at::empty({g.N, g.C, g.OH, g.OW}, x.options().dtype(at::kByte).memory_format(layout(cl)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_pool_fwd_cuda", [&] {
    using acc_t = acc_type<kernel_t<scalar_t>>;
    C10_CUDA_CHECK(cuda_forward(ptr<scalar_t>(xc), acc_ptr<acc_t>(mc), acc_ptr<acc_t>(ic), acc_ptr<acc_t>(wc),
                                acc_ptr<acc_t>(bc), mutable_ptr<scalar_t>(y), arg.data_ptr<uint8_t>(), g, stream));
  });
  return {y, arg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& argmax, const at::Tensor& x, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool batch_stats, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding) {
  check_backward_args(dy, argmax, x, mean, invstd, weight, bias, batch_stats, kernel, stride, padding);
  check_cuda("bn_relu_pool_bwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = is_channels_last(x);
  const at::Tensor xc = x.contiguous(layout(cl)), dyc = dy.contiguous(layout(cl)), ac = argmax.contiguous(layout(cl));
  const at::Tensor mc = contiguous_or_empty(mean), ic = contiguous_or_empty(invstd);
  const at::Tensor wc = contiguous_or_empty(weight), bc = contiguous_or_empty(bias);
  const Geometry g = geometry(x, kernel, stride, padding, cl);
  // Only the sums of dz reduce over channels (as cuda_backward decides).
  if ((batch_stats || weight || bias) && g.N * g.OH * g.OW > 0) check_channel_tiles("bn_relu_pool_bwd", g);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(layout(cl)));
  const auto sdt = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor dw = at::empty({weight ? g.C : 0}, sdt);
  at::Tensor db = at::empty({bias ? g.C : 0}, sdt);
  const int64_t parts = reduce_parts(g, g.N * g.OH * g.OW, sm_count(x));
  at::Tensor workspace = at::empty({backward_workspace(g, parts)}, sdt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_pool_bwd_cuda", [&] {
    using acc_t = acc_type<kernel_t<scalar_t>>;
    C10_CUDA_CHECK(cuda_backward(ptr<scalar_t>(dyc), ac.const_data_ptr<uint8_t>(), ptr<scalar_t>(xc),
                                 acc_ptr<acc_t>(mc), acc_ptr<acc_t>(ic), acc_ptr<acc_t>(wc), acc_ptr<acc_t>(bc),
                                 batch_stats, mutable_ptr<scalar_t>(dx), weight ? dw.data_ptr<acc_t>() : nullptr,
                                 bias ? db.data_ptr<acc_t>() : nullptr, workspace.data_ptr<acc_t>(), parts, g,
                                 stream));
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace bn_relu_pool

TORCH_LIBRARY_IMPL(hetrain_C, CUDA, m) {
  m.impl("bn_stats", &bn_relu_pool::bn_stats_cuda);
  m.impl("bn_relu_pool_fwd", &bn_relu_pool::bn_relu_pool_fwd_cuda);
  m.impl("bn_relu_pool_bwd", &bn_relu_pool::bn_relu_pool_bwd_cuda);
}

}  // namespace hetrain
