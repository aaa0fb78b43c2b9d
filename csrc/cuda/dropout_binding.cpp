// Torch face of the CUDA dropout (dropout_kernel.cu): checks, allocation, the device and stream, and
// registration for CUDA tensors under the schema declared in csrc/dropout.cpp: a contiguous tensor of x's
// shape, for forward (x) and backward (dy) alike. The seed is a CPU tensor read on the host (no device sync), or
// under a CUDA graph capture a tensor on x's device the kernel reads. Built only against a CUDA build of torch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "binding.h"
#include "dropout_kernel.h"

namespace hetrain {
namespace {

using cuda::mutable_ptr;
using cuda::ptr;

at::Tensor dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "hetrain.dropout: x must be a floating tensor, got ",
              x.scalar_type());
  cuda::check_on_device("dropout", "x", x, x);
  const dropout::Call mask = device_dropout_call("dropout", seed, p, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_cuda", [&] {
    C10_CUDA_CHECK(dropout::cuda_dropout(ptr<scalar_t>(xc), mutable_ptr<scalar_t>(y), xc.numel(), mask, stream));
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(hetrain_C, CUDA, m) { m.impl("dropout_fwd", &dropout_cuda); }

}  // namespace hetrain
