// Torch face of the CUDA bias + GELU (bias_gelu_kernel.cu): input checks, allocation, the device and
// stream, and registration for CUDA tensors under the schemas declared in csrc/bias_gelu.cpp. Outputs
// match the CPU kernel: y; dx and db in x's dtype. Built only against a CUDA build of torch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"
#include "binding.h"
#include "bias_gelu_kernel.h"

namespace hetrain {
namespace bias_gelu {

// Defined in csrc/bias_gelu.cpp, shared with the CPU kernels.
bool is_tanh(const std::string& approximate);
void check_bias(const char* op, const at::Tensor& x, const at::Tensor& bias);

}  // namespace bias_gelu

namespace {

using bias_gelu::check_bias;
using bias_gelu::is_tanh;

using cuda::check_on_device;
using cuda::mutable_ptr;
using cuda::ptr;

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x, const at::Tensor& bias, std::string approximate) {
  check_bias("bias_gelu_fwd", x, bias);
  check_on_device("bias_gelu_fwd", "x", x, x);
  const bool tanh = is_tanh(approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), bc = bias.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t M = x.size(0), N = x.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_fwd_cuda", [&] {
    C10_CUDA_CHECK(bias_gelu::cuda_forward(ptr<scalar_t>(xc), ptr<scalar_t>(bc), mutable_ptr<scalar_t>(y), tanh, M, N,
                                           stream));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& bias, std::string approximate) {
  check_bias("bias_gelu_bwd", x, bias);
  check_on_device("bias_gelu_bwd", "x", x, x);
  check_like("bias_gelu backward", "dy", dy, x);
  const bool tanh = is_tanh(approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dyc = dy.contiguous(), xc = x.contiguous(), bc = bias.contiguous();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor db = at::empty_like(bc);
  const int64_t M = x.size(0), N = x.size(1);
  const int64_t parts = bias_gelu::backward_parts(M, N, static_cast<int>(x.element_size()), cuda::sm_count(x));
  at::Tensor b_part = cuda::partial_rows(true, parts, N, x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_bwd_cuda", [&] {
    using acc_t = bias_gelu::acc_type<cuda::kernel_t<scalar_t>>;
    C10_CUDA_CHECK(bias_gelu::cuda_backward(ptr<scalar_t>(dyc), ptr<scalar_t>(xc), ptr<scalar_t>(bc),
                                            mutable_ptr<scalar_t>(dx), mutable_ptr<scalar_t>(db),
                                            b_part.data_ptr<acc_t>(), tanh, parts, M, N, stream));
  });
  return {dx, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(hetrain_C, CUDA, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
}

}  // namespace hetrain
