// RMSNorm over the last dimension on a CUDA device, behind plain launch functions: raw pointers, sizes
// and a stream, no torch headers, so nvcc checks this kernel on a machine without a CUDA torch.
// Instantiated for float, double, __half and __nv_bfloat16; rstd is float (double for double).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace hetrain {
namespace rms_norm {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// y = x * rstd * w per row of N; writes rstd per row. w may be null.
template <typename T>
cudaError_t cuda_forward(const T* x, const T* w, T* y, acc_type<T>* rstd, int64_t M, int64_t N, double eps,
                         cudaStream_t stream);

// dx for every row; dw (if non-null) summed over rows through the workspace w_part of parts * N values.
// parts must lie in [1, max(M, 1)]; cuda::backward_parts (rows.h) gives the usual choice.
template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* w, const acc_type<T>* rstd, T* dx, T* dw,
                          acc_type<T>* w_part, int64_t parts, int64_t M, int64_t N, cudaStream_t stream);

}  // namespace rms_norm
}  // namespace hetrain
