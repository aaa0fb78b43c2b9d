// LayerNorm over the last dimension on a CUDA device, behind plain launch functions: raw pointers,
// sizes and a stream, no torch headers, so nvcc checks this kernel on a machine without a CUDA torch.
// Instantiated for float, double, __half and __nv_bfloat16; statistics are float (double for double).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace hetrain {
namespace layer_norm {

// Accumulation and statistics type, as in the CPU kernel: double for double, float otherwise.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// y = (x - mean) * rstd * w + b per row of N; writes mean and rstd per row. w and b may be null.
template <typename T>
cudaError_t cuda_forward(const T* x, const T* w, const T* b, T* y, acc_type<T>* mean, acc_type<T>* rstd, int64_t M,
                         int64_t N, double eps, cudaStream_t stream);

// dx for every row; dw (if non-null) and db (if non-null) summed over rows through the
// workspaces w_part / b_part of parts * N values each (null where the gradient is not wanted).
// parts must lie in [1, max(M, 1)]; cuda::backward_parts (rows.h) gives the usual choice.
template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* w, const acc_type<T>* mean, const acc_type<T>* rstd,
                          T* dx, T* dw, T* db, acc_type<T>* w_part, acc_type<T>* b_part, int64_t parts, int64_t M,
                          int64_t N, cudaStream_t stream);

}  // namespace layer_norm
}  // namespace hetrain
