// Torch face of the CUDA dropout + add + LayerNorm (dropout_add_layer_norm_kernel.cu): input checks,
// allocation, the device and stream, and registration for CUDA tensors under the schemas declared in
// csrc/dropout_add_layer_norm.cpp. Outputs match the CPU kernel: y, mean, rstd (float32 stats, float64
// for float64); dx, dres, dw or empty, db or empty. The seed is a CPU tensor read on the host (no device
// sync), or under a CUDA graph capture a tensor on x's device the kernels read. Built only against a CUDA build
// of torch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "binding.h"
#include "dropout_add_layer_norm_kernel.h"
#include "rows.h"

namespace hetrain {
namespace dropout_add_layer_norm {

// Defined in csrc/dropout_add_layer_norm.cpp, shared with the CPU kernels.
void check_forward_args(const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, double eps);
void check_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual,
                         const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace dropout_add_layer_norm

namespace {

using cuda::check_on_device;
using cuda::mutable_ptr;
using cuda::ptr;
std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_fwd_cuda(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& seed, double p, double eps) {
  dropout_add_layer_norm::check_forward_args(x, residual, weight, bias, eps);
  check_on_device("dropout_add_layer_norm_fwd", "x", x, x);
  const dropout::Call drop = device_dropout_call("dropout_add_layer_norm", seed, p, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = x.size(1);
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(xc);
  at::Tensor mean = at::empty({M}, x.options().dtype(stats_dtype(x.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_add_layer_norm_fwd_cuda", [&] {
    using acc_t = dropout_add_layer_norm::acc_type<cuda::kernel_t<scalar_t>>;
    C10_CUDA_CHECK(dropout_add_layer_norm::cuda_forward(ptr<scalar_t>(xc), ptr<scalar_t>(rc), ptr<scalar_t>(wc),
                                                        ptr<scalar_t>(bc), mutable_ptr<scalar_t>(y),
                                                        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), drop, M, N,
                                                        eps, stream));
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_layer_norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& seed, double p, bool has_bias) {
  dropout_add_layer_norm::check_backward_args(dy, x, residual, weight, mean, rstd);
  check_on_device("dropout_add_layer_norm_bwd", "x", x, x);
  const int64_t M = x.size(0), N = x.size(1);
  const dropout::Call drop = device_dropout_call("dropout_add_layer_norm", seed, p, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous(), rc = residual.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor mc = mean.contiguous(), sc = rstd.contiguous();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor dres = at::empty_like(xc);
  cuda::ParamGrads g(x, wc.defined(), has_bias);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_add_layer_norm_bwd_cuda", [&] {
    using acc_t = dropout_add_layer_norm::acc_type<cuda::kernel_t<scalar_t>>;
    C10_CUDA_CHECK(dropout_add_layer_norm::cuda_backward(
        ptr<scalar_t>(dyc), ptr<scalar_t>(xc), ptr<scalar_t>(rc), ptr<scalar_t>(wc), mc.const_data_ptr<acc_t>(),
        sc.const_data_ptr<acc_t>(), drop, mutable_ptr<scalar_t>(dx), mutable_ptr<scalar_t>(dres),
        g.dw_out<scalar_t>(), g.db_out<scalar_t>(), g.w_workspace<acc_t>(), g.b_workspace<acc_t>(), g.parts, M, N,
        stream));
  });
  return {dx, dres, g.dw, g.db};
}

}  // namespace

TORCH_LIBRARY_IMPL(hetrain_C, CUDA, m) {
  m.impl("dropout_add_layer_norm_fwd", &dropout_add_layer_norm_fwd_cuda);
  m.impl("dropout_add_layer_norm_bwd", &dropout_add_layer_norm_bwd_cuda);
}

}  // namespace hetrain
