// Torch face of the CUDA RMSNorm (rms_norm_kernel.cu): input checks, allocation, the device and stream,
// and registration for CUDA tensors under the schemas declared in csrc/rms_norm.cpp. Outputs match the
// CPU kernel: y and rstd (float32, float64 for float64); dx and dw (empty without a weight).
// Built only against a CUDA build of torch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "binding.h"
#include "rms_norm_kernel.h"
#include "rows.h"

namespace hetrain {
namespace rms_norm {

// Defined in csrc/rms_norm.cpp, shared with the CPU kernels.
void check_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps);
void check_backward_args(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const at::Tensor& rstd);

}  // namespace rms_norm

namespace {

using cuda::check_on_device;
using cuda::mutable_ptr;
using cuda::ptr;

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                     double eps) {
  rms_norm::check_forward_args(x, weight, eps);
  check_on_device("rms_norm_fwd", "x", x, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = x.size(1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(xc);
  at::Tensor rstd = at::empty({M}, x.options().dtype(stats_dtype(x.scalar_type())));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_fwd_cuda", [&] {
    using acc_t = rms_norm::acc_type<cuda::kernel_t<scalar_t>>;
    C10_CUDA_CHECK(rms_norm::cuda_forward(ptr<scalar_t>(xc), ptr<scalar_t>(wc), mutable_ptr<scalar_t>(y),
                                          rstd.data_ptr<acc_t>(), M, N, eps, stream));
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight,
                                                     const at::Tensor& rstd) {
  rms_norm::check_backward_args(dy, x, weight, rstd);
  check_on_device("rms_norm_bwd", "x", x, x);
  const int64_t M = x.size(0), N = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous(), rc = rstd.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(xc);
  cuda::ParamGrads g(x, wc.defined(), false);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_bwd_cuda", [&] {
    using acc_t = rms_norm::acc_type<cuda::kernel_t<scalar_t>>;
    C10_CUDA_CHECK(rms_norm::cuda_backward(ptr<scalar_t>(dyc), ptr<scalar_t>(xc), ptr<scalar_t>(wc),
                                           rc.const_data_ptr<acc_t>(), mutable_ptr<scalar_t>(dx), g.dw_out<scalar_t>(),
                                           g.w_workspace<acc_t>(), g.parts, M, N, stream));
  });
  return {dx, g.dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(hetrain_C, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
}

}  // namespace hetrain
